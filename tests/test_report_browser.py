"""The stats report opens in a real browser (headless Chromium) with no server and is not blank."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mosaic_toolkit.stats.report import stats_report
from mosaic_toolkit.data.synth import synth_dataset

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
# The units note's background (#fff6e0 in the report's CSS): proof the page is ours, not an
# error page.
UNITS_NOTE_RGB = (255, 246, 224)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed (/usr/bin/chromium); `make test` installs it",
)


def screenshot(page: Path, png: Path, tmp_path: Path, height: int = 1600) -> np.ndarray:
    """Render ``page`` from file:// with headless Chromium; the screenshot as an RGB array."""
    profile = tmp_path / f"profile-{png.stem}"
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={png}",
        f"--window-size=1200,{height}", page.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert png.is_file(), (
        f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB"))


def assert_not_blank(pixels: np.ndarray, min_std: float, min_colours: int) -> None:
    """Pixel variance, many distinct colours and the report's own units note."""
    assert pixels.shape == (1600, 1200, 3)
    std = float(pixels.astype(np.float64).std())
    assert std > min_std, f"screenshot is (nearly) uniform: std {std:.1f}"
    packed = pixels.astype(np.uint32)
    colours = np.unique((packed[..., 0] << 16) | (packed[..., 1] << 8) | packed[..., 2])
    assert len(colours) > min_colours, f"only {len(colours)} distinct colours"
    assert np.all(pixels == UNITS_NOTE_RGB, axis=2).sum() > 1000, "the units note is not shown"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    synth_dataset(root / "ds", 2, seed=11, min_size=160, max_size=220)
    out = root / "report"
    stats_report([root / "ds"], out, pixel_size=0.3, compare=True)
    return out


@pytest.mark.parametrize("page", ["synth_00000/report.html", "compare.html", "index.html"])
def test_report_renders_in_chromium(report, tmp_path, page):
    ARTIFACTS.mkdir(exist_ok=True)
    name = "stats_" + page.replace("/", "_").replace(".html", ".png")
    png = tmp_path / name
    pixels = screenshot(report / page, png, tmp_path)
    shutil.copyfile(png, ARTIFACTS / name)  # kept for a person to look at
    if page == "index.html":  # a short table on white
        assert_not_blank(pixels, min_std=5, min_colours=50)
    else:
        assert_not_blank(pixels, min_std=20, min_colours=500)
        # The embedded plots are drawn: saturated plot colours appear in quantity.
        saturated = (pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 60
        assert saturated.sum() > 5000, "no plot visible"


def test_blank_page_is_caught(tmp_path):
    """The check itself: an empty page fails it."""
    page = tmp_path / "blank.html"
    page.write_text("<!DOCTYPE html><html><body></body></html>\n")
    pixels = screenshot(page, tmp_path / "blank.png", tmp_path)
    with pytest.raises(AssertionError, match="uniform"):
        assert_not_blank(pixels, min_std=5, min_colours=50)
