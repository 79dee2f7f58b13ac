"""Tiling of large images: tile plans, and merging tile results without duplicates or cuts.

The merge logic is isolated with an exact *oracle*: a segment function that returns the ground
truth of the crop it is given. Merged, the oracle's tiles must give back the ground truth
exactly. The classical engine then checks that tiling a real segmentation changes little.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from mosaic_toolkit.classical import ClassicalEngine
from mosaic_toolkit.core.dataset import FOUR_CONNECTED, relabel_sequential
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.evaluation.metrics import pixel_metrics, tile_metrics
from mosaic_toolkit.data.synth import synth_mosaic
from mosaic_toolkit.core.tiling import (
    choose_overlap,
    choose_tile_size,
    plan_tiles,
    resolve_tiling,
    segment_tiled,
)

TESSERA = 30.0  # forced synthetic tessera pitch (px)


def mosaic(style: str, width: int = 900, height: int = 700, seed: int = 3):
    return synth_mosaic(np.random.default_rng(seed), width, height, style=style, tessera_size=TESSERA)


class Oracle:
    """segment_fn returning the ground truth of each crop; crops must come in plan order."""

    def __init__(self, image: np.ndarray, truth: np.ndarray, tile: int, overlap: int):
        self.image, self.truth = image, truth
        self.tiles = iter(plan_tiles(*truth.shape, tile, overlap))
        self.calls = 0

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        y0, x0, y1, x1 = next(self.tiles)
        assert np.array_equal(crop, self.image[y0:y1, x0:x1]), "crop is not the planned tile"
        self.calls += 1
        return self.truth[y0:y1, x0:x1].copy()


def assert_valid(instances: np.ndarray, shape: tuple[int, int]) -> None:
    """int32, ids 1..N in raster order, every id a single 4-connected region."""
    assert instances.dtype == np.int32 and instances.shape == shape
    assert np.array_equal(instances, relabel_sequential(instances))
    for k, sl in enumerate(ndi.find_objects(instances), start=1):
        assert sl is not None
        _, pieces = ndi.label(instances[sl] == k, structure=FOUR_CONNECTED)
        assert pieces == 1, f"tessera {k} has {pieces} pieces"


# ------------------------------------------------------------------------------ plans
@pytest.mark.parametrize(
    "height,width,tile,overlap",
    [(700, 900, 256, 64), (1000, 1000, 512, 100), (513, 257, 256, 0), (300, 2000, 1024, 200)],
)
def test_plan_tiles_covers_the_image_with_flush_full_size_tiles(height, width, tile, overlap):
    tiles = plan_tiles(height, width, tile, overlap)
    covered = np.zeros((height, width), dtype=np.int32)
    for y0, x0, y1, x1 in tiles:
        assert 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width
        assert y1 - y0 == min(tile, height) and x1 - x0 == min(tile, width)
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    assert max(t[2] for t in tiles) == height and max(t[3] for t in tiles) == width
    # Neighbours along each axis overlap by at least `overlap`.
    for axis_starts, axis_ends in (
        (sorted({t[0] for t in tiles}), sorted({t[2] for t in tiles})),
        (sorted({t[1] for t in tiles}), sorted({t[3] for t in tiles})),
    ):
        for start, prev_end in zip(axis_starts[1:], axis_ends[:-1]):
            assert prev_end - start >= overlap


def test_plan_tiles_single_tile_and_bad_arguments():
    assert plan_tiles(200, 300, 512, 64) == [(0, 0, 200, 300)]
    with pytest.raises(MosaicError, match="overlap"):
        plan_tiles(1000, 1000, 256, 256)
    with pytest.raises(MosaicError, match="tile size"):
        plan_tiles(1000, 1000, 0, 0)


def test_tile_size_holds_about_100_tesserae_and_overlap_two_diameters():
    assert choose_tile_size(30) == 304  # 10 diameters, multiple of 16
    assert choose_tile_size(5) == 256 and choose_tile_size(200) == 1024  # clipped
    assert choose_tile_size(60, target_tesserae=25) == 304
    assert choose_overlap(30, 304) == 60
    assert choose_overlap(200, 1024) == 400
    assert choose_overlap(400, 1024) == 512  # at most half a tile
    # A small image fits one tile: no overlap needed, given sizes win.
    assert resolve_tiling(np.zeros((200, 200, 3), np.uint8), tessera_size=30) == (304, 0)
    assert resolve_tiling(np.zeros((900, 700, 3), np.uint8), tile=256, tessera_size=30) == (256, 60)


# ------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("style", ["irregular", "opus"])
def test_oracle_tiles_merge_back_to_the_exact_ground_truth(style):
    image, truth = mosaic(style)
    tile, overlap = 256, choose_overlap(TESSERA, 256)
    oracle = Oracle(image, truth, tile, overlap)
    merged = segment_tiled(image, oracle, tile=tile, overlap=overlap, progress=False)
    assert oracle.calls == len(plan_tiles(*truth.shape, tile, overlap)) > 4
    # Same tessera set, same pixels: every GT tessera matched once with IoU 1, no extras.
    assert merged.max() == truth.max()
    assert np.array_equal(merged, relabel_sequential(truth))


def test_oracle_with_automatic_tiling_from_tessera_size():
    image, truth = mosaic("irregular", 1300, 800, seed=5)
    tile, overlap = resolve_tiling(image, tessera_size=TESSERA)
    oracle = Oracle(image, truth, tile, overlap)
    merged = segment_tiled(image, oracle, tessera_size=TESSERA, progress=False)
    assert oracle.calls > 1
    assert np.array_equal(merged, relabel_sequential(truth))


@pytest.mark.parametrize("style", ["irregular", "opus"])
def test_inconsistent_tiles_give_no_duplicates_misses_or_fragments(style):
    """Each tile sees the ground truth shifted by a different pixel offset, so tiles disagree
    near the seams (the real case: two tiles segment one tessera a little differently)."""
    image, truth = mosaic(style, 800, 600, seed=7)
    tile, overlap = 256, 60
    tiles = iter(plan_tiles(*truth.shape, tile, overlap))
    shifts = iter([(1, 0), (0, 1), (-1, 0), (0, -1), (1, 1)] * 10)
    padded = np.pad(truth, 1)  # shifts without wrapping around the image border

    def disagreeing(crop: np.ndarray) -> np.ndarray:
        y0, x0, y1, x1 = next(tiles)
        dy, dx = next(shifts)
        return padded[1 - dy + y0 : 1 - dy + y1, 1 - dx + x0 : 1 - dx + x1].copy()

    merged = segment_tiled(image, disagreeing, tile=tile, overlap=overlap, progress=False)
    assert_valid(merged, truth.shape)
    n_gt, n_pred = int(truth.max()), int(merged.max())
    assert abs(n_pred - n_gt) <= 0.01 * n_gt
    joint = np.bincount(truth.ravel() * (n_pred + 1) + merged.ravel(),
                        minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)
    inter = joint[1:, 1:]
    union = joint[1:].sum(1)[:, None] + joint[:, 1:].sum(0)[None, :] - inter
    iou = inter / union
    # No misses: (nearly) every GT tessera has its predicted tessera (a shift costs some IoU).
    assert (iou.max(axis=1) > 0.5).mean() > 0.98
    # No duplicates or fragments: no GT tessera holds most of two sizeable predicted regions,
    # and no tiny leftover pieces.
    area = joint[:, 1:].sum(0)
    main = np.argmax(inter, axis=0)
    sizeable = area > 0.05 * TESSERA**2
    assert np.bincount(main[sizeable], minlength=n_gt).max() == 1
    # Away from the image border (where the shifts crop tesserae), no region is smaller than
    # synth's smallest tessera: no slivers left over from the seams.
    inner = np.array([sl[0].start > 1 and sl[1].start > 1 and sl[0].stop < truth.shape[0] - 1
                      and sl[1].stop < truth.shape[1] - 1 for sl in ndi.find_objects(merged)])
    assert area[inner].min() >= 0.02 * TESSERA**2


def test_image_within_one_tile_is_segmented_whole():
    image, truth = mosaic("opus", 300, 200)
    seen = []

    def whole(crop: np.ndarray) -> np.ndarray:
        seen.append(crop.shape)
        return truth.copy()

    out = segment_tiled(image, whole, tile=512, progress=False)
    assert seen == [(200, 300, 3)]
    assert np.array_equal(out, relabel_sequential(truth))


def test_empty_tiles_and_bad_tile_results():
    image = np.zeros((600, 600, 3), np.uint8)
    empty = segment_tiled(image, lambda c: np.zeros(c.shape[:2], np.int32), tile=256, overlap=32,
                          progress=False)
    assert empty.dtype == np.int32 and not empty.any()
    with pytest.raises(MosaicError, match="returned shape"):
        segment_tiled(image, lambda c: np.zeros((5, 5), np.int32), tile=256, overlap=32, progress=False)
    with pytest.raises(MosaicError, match="integer ids"):
        segment_tiled(image, lambda c: np.zeros(c.shape[:2], np.float32), tile=256, overlap=32,
                      progress=False)


def test_classical_engine_tiled_matches_untiled():
    image, truth = mosaic("irregular", 900, 700, seed=11)
    engine = ClassicalEngine()
    whole = engine.segment(image)
    tiled = segment_tiled(image, engine.segment, tile=512, overlap=60, progress=False)
    assert_valid(tiled, truth.shape)
    agreement = pixel_metrics(tiled > 0, whole > 0)["dice"]
    assert agreement > 0.97
    dice_whole = pixel_metrics(whole > 0, truth > 0)["dice"]
    dice_tiled = pixel_metrics(tiled > 0, truth > 0)["dice"]
    assert abs(dice_tiled - dice_whole) < 0.01
    f_whole, f_tiled = tile_metrics(truth, whole)["f_measure"], tile_metrics(truth, tiled)["f_measure"]
    assert abs(f_tiled - f_whole) < 0.02
