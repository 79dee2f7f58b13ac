"""Synthetic mosaics: exact, valid ground truth, determinism, dataset layout and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mosaic_toolkit.cli import main
from mosaic_toolkit.core.dataset import (
    Dataset,
    instances_to_mask,
    label_components,
    tessera_points,
)
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.data.synth import STYLES, draw_params, render_mosaic, synth_dataset, synth_mosaic


def assert_valid_instances(instances: np.ndarray) -> int:
    """Ids 1..N, each one 4-connected piece, no two ids 4-adjacent; returns N."""
    assert instances.dtype == np.int32
    n = int(instances.max())
    assert n > 0
    assert np.array_equal(np.unique(instances), np.arange(n + 1))
    for a, b in (
        (instances[:, :-1], instances[:, 1:]),
        (instances[:-1, :], instances[1:, :]),
    ):
        assert not np.any((a > 0) & (b > 0) & (a != b)), "two tesserae touch 4-connectedly"
    # With no touching ids, one component per id means exactly N components in the foreground.
    pieces, count = label_components(instances > 0)
    assert count == n, f"{count} 4-connected pieces for {n} tesserae"
    owner = np.zeros(count + 1, dtype=np.int64)
    owner[pieces.ravel()] = instances.ravel()
    assert len(np.unique(owner[1:])) == n
    return n


def centroids_outside(instances: np.ndarray) -> int:
    """How many tesserae have their rounded centroid outside themselves (concave tiles)."""
    n = int(instances.max())
    rows, cols = np.nonzero(instances)
    ids = instances[rows, cols]
    count = np.bincount(ids, minlength=n + 1)[1:]
    cy = np.rint(np.bincount(ids, weights=rows, minlength=n + 1)[1:] / count).astype(int)
    cx = np.rint(np.bincount(ids, weights=cols, minlength=n + 1)[1:] / count).astype(int)
    return int(np.sum(instances[cy, cx] != np.arange(1, n + 1)))


def test_same_seed_same_mosaic_other_seed_differs():
    image_a, inst_a = synth_mosaic(np.random.default_rng(5), 300, 240)
    image_b, inst_b = synth_mosaic(np.random.default_rng(5), 300, 240)
    image_c, inst_c = synth_mosaic(np.random.default_rng(6), 300, 240)
    assert image_a.shape == (240, 300, 3) and image_a.dtype == np.uint8
    assert inst_a.shape == (240, 300)
    assert np.array_equal(image_a, image_b) and np.array_equal(inst_a, inst_b)
    assert not np.array_equal(inst_a, inst_c)
    assert not np.array_equal(image_a, image_c)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instances_valid_and_count_plausible(style, seed):
    rng = np.random.default_rng(seed)
    params = draw_params(rng, 320, 280, style=style)
    image, instances = render_mosaic(rng, params)
    n = assert_valid_instances(instances)
    expected = 320 * 280 / params.tessera_size**2
    # A border band of smaller tesserae (realism) can hold up to 4x as many per area.
    upper = 1.6 if params.realism == 0 else 3.0
    assert 0.5 * expected <= n <= upper * expected, (n, expected)
    # Tiles and grout are rendered differently: the image is not one flat colour.
    assert image.reshape(-1, 3).std(axis=0).max() > 5


def test_default_tessera_size_gives_a_few_hundred_tesserae_at_1000_px():
    _, instances = synth_mosaic(np.random.default_rng(0), 1000, 1000, style="irregular")
    assert 150 <= instances.max() <= 700


def test_forced_tessera_size_sets_the_count():
    counts = {}
    for size in (20, 40):
        _, instances = synth_mosaic(np.random.default_rng(3), 300, 300, tessera_size=size)
        counts[size] = assert_valid_instances(instances)
    # A quarter of the area per tile: about four times as many tiles.
    assert 2.5 <= counts[20] / counts[40] <= 6


def test_both_styles_are_drawn_when_mixed():
    styles = {draw_params(np.random.default_rng(seed), 300, 300).style for seed in range(20)}
    assert styles == set(STYLES)


def test_bad_parameters_are_clear_errors():
    with pytest.raises(MosaicError, match="style"):
        draw_params(np.random.default_rng(0), 300, 300, style="herringbone")
    with pytest.raises(MosaicError, match="tessera size"):
        draw_params(np.random.default_rng(0), 300, 300, tessera_size=2)


def test_chipped_tiles_are_concave_and_points_stay_inside():
    outside = 0
    for seed in range(5):
        _, instances = synth_mosaic(np.random.default_rng(seed), 300, 300)
        outside += centroids_outside(instances)
        points = tessera_points(instances)
        assert len(points) == instances.max()
        for tile_id, (x, y) in enumerate(points, start=1):
            assert instances[y, x] == tile_id
    assert outside >= 1, "no chipped tile moved its centroid outside itself"


def test_dataset_layout_readable(tmp_path):
    out = tmp_path / "synthetic"
    samples = synth_dataset(out, 3, seed=1, min_size=200, max_size=300)
    ds = Dataset.open(out)
    assert [s.stem for s in ds.samples] == [s.stem for s in samples]
    assert ds.info["synthetic"]["seed"] == 1
    for sample in ds.samples:
        assert sample.split is None
        assert 200 <= max(sample.width, sample.height) <= 300
        assert sample.source["synthetic"]["style"] in STYLES
        assert sample.source["synthetic"]["seed"] == 1
        image = ds.image(sample)
        instances = ds.instances(sample)
        assert image.shape == (sample.height, sample.width, 3)
        assert assert_valid_instances(instances) == sample.tesserae
        assert np.array_equal(ds.mask(sample), instances_to_mask(instances))
        points = ds.points(sample)
        assert len(points) == sample.tesserae
        for tile_id, (x, y) in enumerate(points, start=1):
            assert instances[y, x] == tile_id


def test_dataset_byte_identical_for_same_seed(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    synth_dataset(tmp_path / "a", 2, seed=4, min_size=150, max_size=200)
    synth_dataset(tmp_path / "b", 2, seed=4, min_size=150, max_size=200)
    synth_dataset(tmp_path / "c", 2, seed=5, min_size=150, max_size=200)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == 2 * 4 + 1  # image, mask, instances, points per sample + manifest
    assert a == b
    assert a["images/synth_00000.png"] != c["images/synth_00000.png"]


def test_style_and_format_options(tmp_path):
    out = tmp_path / "opus"
    samples = synth_dataset(
        out, 2, seed=2, min_size=150, max_size=200, style="opus", image_format="jpg"
    )
    assert all(s.source["synthetic"]["style"] == "opus" for s in samples)
    ds = Dataset.open(out)
    for sample in ds.samples:
        assert sample.image.endswith(".jpg")
        assert ds.image(sample).shape == (sample.height, sample.width, 3)


def test_dataset_rejects_bad_sizes_without_output(tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(MosaicError, match="min-size"):
        synth_dataset(out, 1, min_size=500, max_size=400)
    with pytest.raises(MosaicError, match="16-bit"):
        synth_dataset(out, 1, min_size=300, max_size=3000, tessera_size=5)
    assert not out.exists()


def test_cli_writes_dataset_and_refuses_existing_output(tmp_path):
    out = tmp_path / "cli-out"
    args = ["synth", "--out", str(out), "--n", "2", "--seed", "3",
            "--min-size", "150", "--max-size", "200"]
    runner = CliRunner()
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    total = sum(s["tesserae"] for s in manifest["samples"])
    assert f"2 synthetic mosaics, {total} tesserae" in result.output
    assert str(out) in result.output
    before = (out / "images" / "synth_00000.png").read_bytes()

    refused = runner.invoke(main, args)
    assert refused.exit_code != 0
    assert "cli-out" in refused.output
    assert (out / "images" / "synth_00000.png").read_bytes() == before

    again = runner.invoke(main, [*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    assert (out / "images" / "synth_00000.png").read_bytes() == before


def test_cli_bad_sizes_exit_1(tmp_path):
    result = CliRunner().invoke(
        main, ["synth", "--out", str(tmp_path / "x"), "--min-size", "900", "--max-size", "400"]
    )
    assert result.exit_code == 1
    assert "min-size" in result.output


@pytest.mark.parametrize("style", STYLES)
def test_realism_keeps_the_ground_truth_exact_and_changes_the_image(style):
    """Full realism (mixed sizes, perspective, bevels, highlights, glass, uneven grout,
    vignetting, camera noise): the instance map is still a valid partition whose tiles are
    where the image shows tiles; realism 0 is the clean rendering."""
    for seed in range(4):
        image, instances = synth_mosaic(np.random.default_rng(seed), 360, 300, style=style,
                                        realism=1.0)
        assert_valid_instances(instances)
        clean, clean_instances = synth_mosaic(np.random.default_rng(seed), 360, 300,
                                              style=style, realism=0.0)
        assert_valid_instances(clean_instances)
        assert not np.array_equal(image, clean)
    # Highlights and bevels raise the brightness spread inside tiles.
    spread = []
    for realism in (0.0, 1.0):
        image, instances = synth_mosaic(np.random.default_rng(7), 400, 400, style="irregular",
                                        tessera_size=40, realism=realism)
        grey = image.mean(axis=2)
        ids = instances[instances > 0]
        means = np.bincount(ids, grey[instances > 0]) / np.maximum(np.bincount(ids), 1)
        spread.append(float(np.mean(np.abs(grey[instances > 0] - means[ids]))))
    assert spread[1] > 1.3 * spread[0], spread
    with pytest.raises(MosaicError, match="realism"):
        draw_params(np.random.default_rng(0), 100, 100, realism=1.5)


def test_weathering_tight_low_contrast_grout_same_ground_truth(tmp_path):
    """--weathering: the ground truth stays a valid partition with one-pixel grout, the grout is
    closer to the tiles' colour than without it (weathered floors: grout worn flush, stained),
    and the CLI writes it into the manifest."""
    def contrast(image, instances):
        tile, grout = image[instances > 0].mean(axis=0), image[instances == 0].mean(axis=0)
        return float(np.linalg.norm(tile - grout))

    for seed in range(3):
        params = draw_params(np.random.default_rng(seed), 300, 240, tessera_size=10,
                             realism=1.0, weathering=1.0)
        assert params.grout_width == 1.0 and params.missing_fraction >= 0.03
        image, instances = synth_mosaic(np.random.default_rng(seed), 300, 240, tessera_size=10,
                                        realism=1.0, weathering=1.0)
        assert_valid_instances(instances)
        plain, plain_instances = synth_mosaic(np.random.default_rng(seed), 300, 240,
                                              tessera_size=10, realism=1.0)
        assert contrast(image, instances) < contrast(plain, plain_instances)
    assert "weathering" not in draw_params(np.random.default_rng(0), 100, 100).to_json()
    with pytest.raises(MosaicError, match="weathering"):
        draw_params(np.random.default_rng(0), 100, 100, weathering=2)
    out = tmp_path / "weathered"
    result = CliRunner().invoke(main, ["synth", "--out", str(out), "--n", "1", "--min-size", "64",
                                       "--max-size", "96", "--tessera-size", "8",
                                       "--weathering", "0.8"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["synthetic"]["weathering"] == 0.8
    help_text = CliRunner().invoke(main, ["synth", "--help"]).output
    assert "--weathering" in help_text and "tight" in help_text
