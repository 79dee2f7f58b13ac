"""The classical (no-weights) engine: output contract, accuracy floors, clicks, determinism."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from mosaic_toolkit.classical import ClassicalEngine, ClassicalParams, estimate_tessera_size
from mosaic_toolkit.core.dataset import label_components
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.evaluation.metrics import pixel_metrics, tile_matches, tile_metrics
from mosaic_toolkit.data.synth import synth_mosaic

GROUT_RGB = (150, 148, 138)
PALETTE = np.array(
    [[200, 60, 50], [60, 90, 160], [220, 200, 120], [40, 40, 45], [90, 140, 80], [230, 230, 220]],
    dtype=np.float64,
)


def grid_mosaic(
    seed: int, rows: int = 6, cols: int = 6, pitch: int = 36, grout: int = 4, margin: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Square tesserae of palette colours on grey grout, slightly jittered, noisy and blurred.

    ``margin`` adds that many columns of plain grout on the right (an area without tesserae).
    """
    rng = np.random.default_rng(seed)
    height = rows * pitch + grout
    width = cols * pitch + grout + margin
    instances = np.zeros((height, width), np.int32)
    side = pitch - grout - 1
    k = 0
    for r in range(rows):
        for c in range(cols):
            k += 1
            y0 = grout + r * pitch + int(rng.integers(0, 2))
            x0 = grout + c * pitch + int(rng.integers(0, 2))
            instances[y0:y0 + side, x0:x0 + side] = k
    colours = np.vstack([GROUT_RGB, PALETTE[rng.integers(0, len(PALETTE), k)]])
    image = colours[instances] + rng.normal(0, 3.0, (height, width, 3))
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.7)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), instances


def tile_ious(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every ground-truth tile with the predicted region overlapping it most."""
    m = tile_matches(gt, pred)
    return m.intersection / (m.tile_area + m.region_area - m.intersection)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a & b) / max(np.count_nonzero(a | b), 1))


@pytest.fixture(scope="module")
def engine() -> ClassicalEngine:
    return ClassicalEngine()


@pytest.fixture(scope="module")
def grid() -> tuple[np.ndarray, np.ndarray]:
    return grid_mosaic(seed=0)


# --------------------------------------------------------------------------------------------
# Output contract
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["opus", "irregular"])
def test_output_contract(engine, style):
    image, _ = synth_mosaic(np.random.default_rng([1, len(style)]), 300, 260, style=style)
    out = engine.segment(image)
    assert out.dtype == np.int32 and out.shape == image.shape[:2]
    n = int(out.max())
    assert n > 20
    assert np.array_equal(np.unique(out), np.arange(n + 1)), "ids are not 0..N without gaps"
    # No two tesserae 4-adjacent: grout (0) separates them, like in the ground truth ...
    for a, b in ((out[:, :-1], out[:, 1:]), (out[:-1], out[1:])):
        assert not np.any((a > 0) & (b > 0) & (a != b))
    # ... so one 4-connected component per id means exactly N foreground components.
    _, count = label_components(out > 0)
    assert count == n
    assert 0.03 < np.mean(out == 0) < 0.5, "grout should be a thin network, not nothing or most"


def test_accepts_grey_and_rgba_and_rejects_bad_input(engine, grid):
    image, _ = grid
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    assert engine.segment(grey).max() > 0
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    assert np.array_equal(engine.segment(rgba), engine.segment(image))
    with pytest.raises(MosaicError, match="uint8"):
        engine.segment(image.astype(np.float32))
    with pytest.raises(MosaicError, match="too small"):
        engine.segment(image[:4, :4])


def test_featureless_image_gives_no_tesserae(engine):
    assert not engine.segment(np.full((64, 80, 3), 128, np.uint8)).any()


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------
def test_clean_grid_is_segmented_tile_for_tile(engine, grid):
    image, gt = grid
    out = engine.segment(image)
    assert out.max() == gt.max() == 36
    ious = tile_ious(gt, out)
    assert ious.min() > 0.9, f"worst tile IoU {ious.min():.3f}"  # measured: 0.995


# Varied synthetic mosaics: both styles, tesserae 20-80 px (the last one large enough to be
# segmented at half scale), every degradation synth draws (two have grout coloured like a tile).
SYNTH_CASES = [  # (seed, width, height, style, tessera size)
    (11, 320, 300, "irregular", 26.0),
    (12, 340, 280, "opus", 30.0),
    (13, 300, 320, "irregular", 40.0),
    (14, 320, 320, "opus", 20.0),
    (15, 480, 420, "irregular", 80.0),
]


def test_accuracy_floor_on_synthetic_mosaics(engine):
    """Measured on these five: pixel Dice 0.908 / 0.943 / 0.982 / 0.932 / 0.940 (mean 0.941),
    per-tessera F 0.861 / 0.842 / 0.906 / 0.854 / 0.931 (mean 0.879). The floors sit about
    0.03-0.04 below. `bench/bench_classical.py` scores larger images the same way."""
    dice, f = [], []
    for seed, width, height, style, size in SYNTH_CASES:
        image, gt = synth_mosaic(
            np.random.default_rng(seed), width, height, style=style, tessera_size=size
        )
        out = engine.segment(image)
        dice.append(pixel_metrics(out > 0, gt > 0)["dice"])
        f.append(tile_metrics(gt, out)["f_measure"])
    assert min(dice) >= 0.87 and np.mean(dice) >= 0.91, dice
    assert min(f) >= 0.80 and np.mean(f) >= 0.84, f


def test_estimate_tessera_size(grid):
    image, gt = grid
    true = 2 * np.sqrt(np.median(np.bincount(gt.ravel())[1:]) / np.pi)
    assert estimate_tessera_size(image) == pytest.approx(true, rel=0.15)


# --------------------------------------------------------------------------------------------
# Clicks (the Label Studio backend without SAM 2 weights)
# --------------------------------------------------------------------------------------------
def test_predict_point_returns_the_clicked_tile(grid):
    image, gt = grid
    engine = ClassicalEngine()
    for tile in (1, 8, 29):
        rows, cols = np.nonzero(gt == tile)
        mask = engine.predict_point(image, int(cols.mean()), int(rows.mean()))
        assert mask is not None and mask.dtype == bool and mask.shape == gt.shape
        assert mask_iou(mask, gt == tile) > 0.9


def test_predict_point_on_grout_gives_the_nearest_tile(grid):
    image, gt = grid
    engine = ClassicalEngine()
    rows, cols = np.nonzero(gt == 8)  # row 1, column 1 of the grid
    y = int(rows.mean())
    x = int(cols.max()) + 2  # in the grout just right of tile 8, nearer to it than to tile 9
    assert gt[y, x] == 0
    mask = engine.predict_point(image, x, y)
    assert mask is not None and mask_iou(mask, gt == 8) > 0.9


def test_predict_point_far_from_tiles_or_outside_is_none():
    image, gt = grid_mosaic(seed=1, margin=140)
    engine = ClassicalEngine()
    height, width = gt.shape
    assert not gt[:, width - 130:].any()
    # The plain grout is background, not a huge tessera ...
    assert not engine.segment(image)[:, width - 130:].any()
    # ... so a click there finds no tile within two tessera sizes.
    assert engine.predict_point(image, width - 20, height // 2) is None
    assert engine.predict_point(image, -5, 10) is None
    assert engine.predict_point(image, 10, height) is None


def test_predict_point_segments_an_image_once(grid):
    image, _ = grid
    engine = ClassicalEngine()
    calls = []
    segment = engine.segment
    engine.segment = lambda img: calls.append(1) or segment(img)  # count, keep the real work
    first = engine.predict_point(image, 20, 20)
    second = engine.predict_point(image.copy(), 20, 20)  # equal bytes, another array
    engine.predict_point(image, 100, 100)
    assert len(calls) == 1
    assert np.array_equal(first, second)
    changed = image.copy()
    changed[0, 0] ^= 1
    engine.predict_point(changed, 20, 20)
    assert len(calls) == 2


# --------------------------------------------------------------------------------------------
# Determinism and parameters
# --------------------------------------------------------------------------------------------
def test_deterministic():
    image, _ = synth_mosaic(np.random.default_rng(5), 256, 256, tessera_size=24.0)
    first = ClassicalEngine().segment(image)
    engine = ClassicalEngine()
    engine.segment(grid_mosaic(seed=3)[0])  # a previous image must not change the next result
    assert np.array_equal(first, engine.segment(image))


def test_params_round_trip_and_errors():
    params = ClassicalParams(sigma=1.5, min_area=0.1)
    data = params.to_dict()
    assert data["sigma"] == 1.5 and ClassicalParams.from_dict(data) == params
    assert ClassicalParams.from_dict({"sigma": 2}) == ClassicalParams(sigma=2.0)
    with pytest.raises(MosaicError, match="unknown key"):
        ClassicalParams.from_dict({"sigmaa": 1.0})
    with pytest.raises(MosaicError, match="classical parameters"):
        ClassicalParams.from_dict({"sigma": "wide"})


def test_params_change_the_result(grid):
    image, _ = grid
    default = ClassicalEngine().segment(image)
    coarse = ClassicalEngine(ClassicalParams(min_area=3.0)).segment(image)  # drops every tile
    assert default.max() == 36 and coarse.max() == 0
