"""Metric rules on tiny hand-made arrays; every expected value is worked out by hand in comments."""
from __future__ import annotations

import numpy as np
import pytest

from mosaic_toolkit.core.dataset import label_components
from mosaic_toolkit.evaluation.metrics import (
    BLACK,
    BLUE,
    GREEN,
    RED,
    WHITE,
    comparison_image,
    drop_specks,
    mean_metrics,
    pixel_metrics,
    tile_matches,
    tile_metrics,
)


# --------------------------------------------------------------------------------------------
# Pixel metrics
# --------------------------------------------------------------------------------------------
def test_pixel_metrics_by_hand():
    gt = np.array([[1, 1, 0, 0],
                   [1, 1, 0, 0]], dtype=bool)
    pred = np.array([[1, 0, 1, 0],
                     [1, 1, 0, 0]], dtype=bool)
    # tp = 3, fp = 1 (0,2), fn = 1 (0,1), tn = 3 of 8 pixels.
    m = pixel_metrics(pred, gt)
    assert m == pytest.approx({
        "iou": 3 / 5,  # tp / (tp + fp + fn)
        "dice": 6 / 8,  # 2tp / (2tp + fp + fn)
        "accuracy": 6 / 8,  # (tp + tn) / 8
        "recall": 3 / 4,  # tp / (tp + fn)
        "precision": 3 / 4,  # tp / (tp + fp)
    })


def test_pixel_metrics_both_empty_is_perfect():
    empty = np.zeros((3, 3), dtype=bool)
    assert pixel_metrics(empty, empty) == {
        "iou": 1.0, "dice": 1.0, "accuracy": 1.0, "recall": 1.0, "precision": 1.0
    }


def test_pixel_metrics_one_side_empty():
    some = np.array([[1, 0, 0, 0]], dtype=bool)
    none = np.zeros((1, 4), dtype=bool)
    # Prediction on an empty ground truth: tp = 0, fp = 1, tn = 3; recall 0/0 -> 0.
    assert pixel_metrics(some, none) == {
        "iou": 0.0, "dice": 0.0, "accuracy": 3 / 4, "recall": 0.0, "precision": 0.0
    }
    # Empty prediction on a non-empty ground truth: fn = 1, tn = 3; precision 0/0 -> 0.
    assert pixel_metrics(none, some) == {
        "iou": 0.0, "dice": 0.0, "accuracy": 3 / 4, "recall": 0.0, "precision": 0.0
    }


def test_pixel_metrics_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


# --------------------------------------------------------------------------------------------
# Per-tessera metrics
# --------------------------------------------------------------------------------------------
def test_tile_metrics_by_hand():
    # Ground truth: T1 (8 px), T2 (8 px), T3 (4 px).
    gt = np.array([
        [1, 1, 1, 1, 0, 0, 2, 2, 2, 2],
        [1, 1, 1, 1, 0, 0, 2, 2, 2, 2],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [3, 3, 0, 0, 0, 0, 0, 0, 0, 0],
        [3, 3, 0, 0, 0, 0, 0, 0, 0, 0],
    ])
    # Prediction: R1 (2 px) and R2 (8 px) split T1; R3 (12 px) covers T2 and spills below;
    # R4 (4 px) touches no tile; T3 is missed.
    pred = np.array([
        [1, 2, 2, 2, 2, 0, 3, 3, 3, 3],
        [1, 2, 2, 2, 2, 0, 3, 3, 3, 3],
        [0, 0, 0, 0, 0, 0, 3, 3, 3, 3],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 4, 4, 0, 0, 0],
        [0, 0, 0, 0, 0, 4, 4, 0, 0, 0],
    ])
    # T1: overlaps R1 by 2 and R2 by 6 -> R2: |T∩R|/|R| = 6/8, |T∩R|/|T| = 6/8.
    # T2: R3 -> 8/12 and 8/8.   T3: no region -> 0 and 0.
    precision = (6 / 8 + 8 / 12 + 0) / 3  # = 17/36
    recall = (6 / 8 + 1 + 0) / 3  # = 7/12
    m = tile_metrics(gt, pred)
    assert m == pytest.approx({
        "count_error": 1 / 3,  # |3 - 4| / 3
        "precision": 17 / 36,
        "recall": 7 / 12,
        "f_measure": 2 * precision * recall / (precision + recall),  # = 119/228
        "n_gt": 3,
        "n_pred": 4,
    })
    assert m["f_measure"] == pytest.approx(119 / 228)
    assert isinstance(m["n_gt"], int) and isinstance(m["n_pred"], int)

    matches = tile_matches(gt, pred)
    assert matches.region.tolist() == [2, 3, 0]  # largest overlap; 0 = no region
    assert matches.intersection.tolist() == [6, 8, 0]
    assert matches.tile_area.tolist() == [8, 8, 4]
    assert matches.region_area.tolist() == [8, 12, 0]


def test_missed_tile_scores_zero():
    gt = np.array([[1, 1, 0, 2, 2]])
    pred = np.array([[1, 1, 0, 0, 0]])
    # T1 found exactly (1, 1); T2 missed (0, 0): P = R = 1/2, F = 1/2, count error |2-1|/2.
    assert tile_metrics(gt, pred) == pytest.approx({
        "count_error": 0.5, "precision": 0.5, "recall": 0.5, "f_measure": 0.5,
        "n_gt": 2, "n_pred": 1,
    })


def test_one_region_can_serve_several_tiles():
    gt = np.array([[1, 1, 0, 2, 2]])
    pred = np.array([[7, 7, 7, 7, 7]])
    # Both tiles pick the one 5-px region: precision 2/5 each, recall 1 each.
    # F = 2 * 0.4 * 1 / 1.4 = 4/7; count error |2 - 1| / 2.
    assert tile_metrics(gt, pred) == pytest.approx({
        "count_error": 0.5, "precision": 0.4, "recall": 1.0, "f_measure": 4 / 7,
        "n_gt": 2, "n_pred": 1,
    })


@pytest.mark.parametrize("pred", [[[5, 5, 2, 2]], [[2, 2, 5, 5]]])
def test_tie_goes_to_smallest_region_id(pred):
    gt = np.array([[1, 1, 1, 1]])
    # Regions 2 and 5 both overlap the tile by 2 px: region 2 (index 1 of [2, 5]) wins.
    matches = tile_matches(gt, np.array(pred))
    assert matches.region.tolist() == [1]
    assert matches.intersection.tolist() == [2]


def test_ids_need_not_be_consecutive():
    gt = np.array([[3, 3, 0, 9, 9]], dtype=np.uint16)
    pred = np.array([[40, 40, 0, 1000, 1000]], dtype=np.int32)
    assert tile_metrics(gt, pred) == pytest.approx({
        "count_error": 0.0, "precision": 1.0, "recall": 1.0, "f_measure": 1.0,
        "n_gt": 2, "n_pred": 2,
    })


def test_huge_ids_are_handled():
    # An id larger than the image takes the sorting path instead of a lookup table.
    gt = np.array([[1, 1, 0, 2]])
    pred = np.array([[2**40, 2**40, 0, 0]], dtype=np.int64)
    # T1 exact (1, 1), T2 missed (0, 0); 2 tiles, 1 region.
    assert tile_metrics(gt, pred) == pytest.approx({
        "count_error": 0.5, "precision": 0.5, "recall": 0.5, "f_measure": 0.5,
        "n_gt": 2, "n_pred": 1,
    })


def test_regions_from_a_binary_prediction_are_4_connected():
    gt = np.array([[1, 0],
                   [0, 2]])
    pred_fg = np.array([[1, 0],
                        [0, 1]], dtype=bool)
    # Diagonal neighbours are two regions, so every tile is matched exactly.
    regions, n = label_components(pred_fg)
    assert n == 2
    m = tile_metrics(gt, regions)
    assert (m["n_pred"], m["precision"], m["recall"], m["count_error"]) == (2, 1.0, 1.0, 0.0)


def test_tile_metrics_without_ground_truth_tiles():
    empty = np.zeros((2, 2), dtype=np.int32)
    some = np.array([[0, 1], [0, 0]])
    assert tile_metrics(empty, empty) == {
        "count_error": 0.0, "precision": 1.0, "recall": 1.0, "f_measure": 1.0,
        "n_gt": 0, "n_pred": 0,
    }
    # Regions where there are no tiles: the count error divides by zero -> None.
    assert tile_metrics(empty, some) == {
        "count_error": None, "precision": 0.0, "recall": 0.0, "f_measure": 0.0,
        "n_gt": 0, "n_pred": 1,
    }


def test_nothing_predicted():
    gt = np.array([[1, 0, 2]])
    # Every tile missed: P = R = F = 0; count error |2 - 0| / 2 = 1.
    assert tile_metrics(gt, np.zeros_like(gt)) == {
        "count_error": 1.0, "precision": 0.0, "recall": 0.0, "f_measure": 0.0,
        "n_gt": 2, "n_pred": 0,
    }


def test_tile_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        tile_metrics(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="integer"):
        tile_metrics(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match=">= 0"):
        tile_metrics(np.full((2, 2), -1), np.zeros((2, 2), int))


# --------------------------------------------------------------------------------------------
# Means and the comparison picture
# --------------------------------------------------------------------------------------------
def _metrics(value: float, count_error: float | None, n_gt: int) -> dict:
    pixel = dict.fromkeys(("iou", "dice", "accuracy", "recall", "precision"), value)
    tile = {"count_error": count_error, "precision": value, "recall": value, "f_measure": value,
            "n_gt": n_gt, "n_pred": n_gt + 1}
    return {"pixel": pixel, "tile": tile}


def test_mean_skips_none():
    mean = mean_metrics([_metrics(0.5, None, 2), _metrics(1.0, 0.25, 5)])
    assert mean["pixel"] == pytest.approx(dict.fromkeys(
        ("iou", "dice", "accuracy", "recall", "precision"), 0.75))
    assert mean["tile"] == pytest.approx({
        "count_error": 0.25,  # the None is left out, not counted as 0
        "precision": 0.75, "recall": 0.75, "f_measure": 0.75,
        "n_gt": 3.5, "n_pred": 4.5,
    })
    assert mean_metrics([_metrics(1.0, None, 0)])["tile"]["count_error"] is None


def test_comparison_image_colours():
    gt = np.array([[1, 1, 1, 1, 0]], dtype=bool)
    pred = np.array([[1, 1, 0, 0, 1]], dtype=bool)
    base = np.array([[1, 0, 1, 0, 1]], dtype=bool)
    # Pixel by pixel: both right, only pred, only baseline, both missed, background.
    picture = comparison_image(gt, pred, base)
    assert picture.dtype == np.uint8 and picture.shape == (1, 5, 3)
    assert [tuple(c) for c in picture[0]] == [WHITE, GREEN, RED, BLUE, BLACK]
    assert (WHITE, GREEN, RED, BLUE, BLACK) == (
        (255, 255, 255), (0, 255, 0), (255, 0, 0), (0, 0, 255), (0, 0, 0))


def test_comparison_image_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        comparison_image(np.zeros((1, 2), bool), np.zeros((1, 2), bool), np.zeros((2, 1), bool))


def _naive_tile_metrics(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float, int, int]:
    """The definition, tile by tile, with Python loops: (precision, recall, n_gt, n_pred)."""
    tiles = [t for t in np.unique(gt) if t != 0]
    regions = [r for r in np.unique(pred) if r != 0]
    precisions, recalls = [], []
    for t in tiles:
        inside = gt == t
        best, best_overlap = None, 0
        for r in regions:  # increasing id: a tie keeps the smaller id
            overlap = int(np.count_nonzero(inside & (pred == r)))
            if overlap > best_overlap:
                best, best_overlap = r, overlap
        if best is None:
            precisions.append(0.0)
            recalls.append(0.0)
        else:
            precisions.append(best_overlap / np.count_nonzero(pred == best))
            recalls.append(best_overlap / np.count_nonzero(inside))
    return float(np.mean(precisions)), float(np.mean(recalls)), len(tiles), len(regions)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matches_the_definition(seed):
    # Random blocky maps (many ties, misses and shared regions) against the loop version.
    rng = np.random.default_rng(seed)
    gt = np.kron(rng.integers(0, 12, (6, 8)), np.ones((3, 3), dtype=int))
    pred = np.kron(rng.integers(0, 9, (9, 12)), np.ones((2, 2), dtype=int))
    m = tile_metrics(gt, pred)
    precision, recall, n_gt, n_pred = _naive_tile_metrics(gt, pred)
    assert (m["n_gt"], m["n_pred"]) == (n_gt, n_pred)
    assert m["precision"] == pytest.approx(precision)
    assert m["recall"] == pytest.approx(recall)
    assert m["count_error"] == pytest.approx(abs(n_gt - n_pred) / n_gt)


def test_reference_specks_are_dropped_by_size_relative_to_the_median():
    gt = np.zeros((40, 40), dtype=np.int32)
    gt[0:10, 0:10] = 1  # three tesserae of 100 px
    gt[0:10, 20:30] = 2
    gt[20:30, 0:10] = 3
    gt[25, 25] = 4  # a 1-px speck left in the grout by thresholding
    gt[35:37, 35:37] = 5  # a 4-px chip: over 2 % of 100 px, kept
    cleaned, n = drop_specks(gt)
    assert n == 1
    assert set(np.unique(cleaned)) == {0, 1, 2, 3, 5}
    assert drop_specks(cleaned)[1] == 0
    assert drop_specks(np.zeros((3, 3), np.int32))[1] == 0
    # the speck no longer costs a segmentation that found every tessera
    pred = np.where(np.isin(gt, [1, 2, 3, 5]), gt, 0)
    assert tile_metrics(gt, pred)["f_measure"] < 0.95
    assert tile_metrics(cleaned, pred)["f_measure"] == pytest.approx(1.0)
