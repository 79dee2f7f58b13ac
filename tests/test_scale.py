"""The tessera scale estimator: the grout network's period, on mosaics of known tessera size."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.core.scale import estimate_scale, estimate_tessera_size, radial_autocorrelation
from mosaic_toolkit.data.synth import STYLES, synth_mosaic


def median_diameter(instances: np.ndarray) -> float:
    areas = np.bincount(instances.ravel())[1:]
    return float(2 * np.sqrt(np.median(areas[areas > 0]) / np.pi))


def test_estimate_within_15_percent_on_synthetic_mosaics():
    """Both styles, 12-80 px tesserae, three seeds each, clean (realism 0) and at full realism
    (texture, glass, bevels, highlights, mixed sizes, perspective, uneven grout, camera noise;
    blur and JPEG as drawn): at least 55 of the 60 within 15 %.

    The misses are images of 12-20 px tesserae with 1-px grout under blur and JPEG, where no
    period or a multiple of it wins (measured rate: docs/decisions/0001-tessera-scale-from-the-
    grout-period.md)."""
    misses = []
    for realism in (0.0, 1.0):
        for style in STYLES:
            for size in (12, 20, 35, 55, 80):
                side = max(600, 12 * size)  # at least 12 tesserae across
                for seed in (1, 2, 3):
                    image, instances = synth_mosaic(np.random.default_rng(seed), side,
                                                    int(side * 0.8), style=style,
                                                    tessera_size=size, realism=realism)
                    ratio = estimate_scale(image).diameter / median_diameter(instances)
                    if abs(ratio - 1) > 0.15:
                        misses.append((realism, style, size, seed, round(ratio, 2)))
    assert len(misses) <= 5, misses


def test_square_grid_of_known_pitch_any_orientation():
    """Square tiles of side 26 px on a 30 px pitch: equivalent diameter 29.3 px."""
    yy, xx = np.mgrid[0:600, 0:600].astype(np.float64)
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 230, (60, 60, 3))
    for angle in (0.0, 0.4, 0.9):
        u = xx * np.cos(angle) + yy * np.sin(angle)
        v = yy * np.cos(angle) - xx * np.sin(angle)
        tile = ((u % 30) < 26) & ((v % 30) < 26)
        image = colours[(u // 30).astype(int) % 60, (v // 30).astype(int) % 60].astype(np.float64)
        image[~tile] = (150, 148, 140)
        image += rng.normal(0, 6, image.shape)  # grain
        image = np.clip(image, 0, 255).astype(np.uint8)
        assert estimate_tessera_size(image) == pytest.approx(2 * 26 / np.sqrt(np.pi), rel=0.1)


def test_texture_inside_tiles_does_not_shrink_the_estimate():
    """Strong fine texture (stone grain of a few px, +-25 levels) inside 40 px tiles leaves the
    estimate alone."""
    rng = np.random.default_rng(1)
    image, instances = synth_mosaic(rng, 640, 520, style="irregular", tessera_size=40,
                                    realism=0.0)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (520, 640)).astype(np.float32), (0, 0), 1.5)
    grain = grain[..., None] / grain.std() * 25
    textured = np.where(instances[..., None] > 0, image + grain, image)
    textured = np.clip(textured, 0, 255).astype(np.uint8)
    truth = median_diameter(instances)
    assert estimate_tessera_size(textured) == pytest.approx(truth, rel=0.15)


def test_featureless_image_falls_back_and_bad_input_is_an_error():
    flat = np.full((200, 300, 3), 128, np.uint8)
    estimate = estimate_scale(flat)
    assert not estimate.found and estimate.diameter == pytest.approx(10.0)
    with pytest.raises(MosaicError, match="too small"):
        estimate_scale(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(MosaicError, match="uint8"):
        estimate_scale(np.zeros((64, 64, 3), np.float32))


def test_radial_autocorrelation_peaks_at_the_period():
    dots = np.zeros((256, 256))
    for dy in range(3):
        for dx in range(3):
            dots[dy::16, dx::16] = 1.0  # 3x3 dots on a 16 px lattice
    prof = radial_autocorrelation(dots, 40)
    assert prof[0] == pytest.approx(1.0)
    assert np.argmax(prof[10:20]) + 10 == 16


# --------------------------------------------------------------------------------------------
# Photographs unlike the butterfly: weathered floors with tight grout, whole panels
# --------------------------------------------------------------------------------------------
def test_tight_grout_small_stone_tesserae_within_25_percent():
    """Weathered stone floors with one-pixel grout close to the stone's colour, 10-16 px
    tesserae (detail photographs of Roman floors): the autocorrelation alone picked a design's
    period on such images (3-7x too large); with the spectrum's lattice every one is within 25 %
    and none is called too coarse."""
    for size in (10, 12, 16):
        for seed in (1, 2):
            image, instances = synth_mosaic(np.random.default_rng(seed), 640, 512,
                                            tessera_size=size, realism=1.0, weathering=1.0)
            estimate = estimate_scale(image)
            truth = median_diameter(instances)
            assert estimate.diameter == pytest.approx(truth, rel=0.25), (size, seed, estimate)
            assert not estimate.coarse


def test_design_period_does_not_win_over_a_fine_lattice():
    """10 px irregular tesserae under a design of broad colour areas: the autocorrelation's
    most prominent peak is the design's (~70 px); the estimate is the tesserae', and it says
    it is not the agreed kind."""
    image, instances = synth_mosaic(np.random.default_rng(10), 600, 480, style="irregular",
                                    tessera_size=10, realism=1.0)
    estimate = estimate_scale(image)
    assert estimate.diameter == pytest.approx(median_diameter(instances), rel=0.25)
    assert any(source == "autocorrelation" and period > 40
               for source, period, _ in estimate.alternatives)


def test_whole_panel_tesserae_under_6_px_are_too_coarse():
    """Whole-panel photographs: 5 px tesserae, clean and weathered. The estimate says the
    photograph is too coarse and what resolution would do, instead of a figure-sized size."""
    coarse = 0
    for weathering, seed in ((0.0, 1), (1.0, 1), (1.0, 2), (1.0, 3)):
        image, _ = synth_mosaic(np.random.default_rng(seed), 700, 560, style="opus",
                                tessera_size=5, realism=1.0, weathering=weathering)
        estimate = estimate_scale(image)
        # never figure-sized: too coarse, or at worst a size near the tesserae' (a warning then)
        assert estimate.coarse or estimate.diameter < 8, (weathering, seed, estimate)
        if estimate.coarse:
            coarse += 1
            message = estimate.warning()
            assert "too coarse" in message and "resolution" in message
    assert coarse >= 2  # measured: 2 of the 4 flagged, the other two estimated at 6.5-6.8 px


def test_estimate_reports_confidence_and_alternatives():
    image, _ = synth_mosaic(np.random.default_rng(1), 600, 480, style="irregular",
                            tessera_size=24, realism=1.0)
    estimate = estimate_scale(image)
    record = estimate.to_json()
    assert record["method"] == "agreed" and record["confidence"] > 0.5 and not record["coarse"]
    sources = {a["source"] for a in record["alternatives"]}
    assert sources == {"autocorrelation", "spectrum"}
    assert estimate.warning() is None
    flat = estimate_scale(np.full((200, 300, 3), 128, np.uint8))
    assert flat.to_json()["confidence"] == 0 and "no tessera lattice" in flat.warning()
