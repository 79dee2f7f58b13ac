"""Pixel and per-tessera metrics, and the thesis's comparison picture (pure, vectorised).

All metric values are fractions in 0..1 (tables may show them as percentages).

Pixel metrics treat tesserae as foreground. Per-tessera ("tile") metrics follow the mosaic
literature (Fenu et al., restated in the thesis): for every ground-truth tile T take the predicted
region R with the largest overlap; then

- Count error = |N_gt - N_pred| / N_gt
- Precision   = mean over tiles of |T ∩ R| / |R|
- Recall      = mean over tiles of |T ∩ R| / |T|   (a tile no region touches scores 0 on both)
- F           = 2 P R / (P + R)

Reference specks: a ground-truth component smaller than ``SPECK_FRACTION`` of the median
ground-truth tessera (a pixel or two left in the grout by thresholding a drawn mask, a sliver cut
by the image border) is not a tessera; ``drop_specks`` removes them before the tile metrics
(``evaluate``, ``tune``), so no segmentation is charged for missing them.

Empty cases follow one rule: an empty ground truth scores 1 when the prediction is empty too and 0
otherwise; a value that stays undefined (the count error of regions predicted where the ground truth
has none) is ``None`` (``null`` in JSON) and is left out of means.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np

SPECK_FRACTION = 0.02  # of the median reference tessera area: smaller components are specks

PIXEL_KEYS = ("iou", "dice", "accuracy", "recall", "precision")
TILE_KEYS = ("count_error", "precision", "recall", "f_measure", "n_gt", "n_pred")

# Comparison picture colours (RGB).
WHITE = (255, 255, 255)  # tessera pixel both predictions got
GREEN = (0, 255, 0)  # only the evaluated prediction got it
RED = (255, 0, 0)  # only the baseline got it
BLUE = (0, 0, 255)  # missed by both
BLACK = (0, 0, 0)  # background


def _ratio(num: int, den: int, both_empty: bool) -> float:
    """num / den, with 0/0 defined as 1.0 when both masks are empty and 0.0 otherwise."""
    if den == 0:
        return 1.0 if both_empty else 0.0
    return num / den


def pixel_metrics(pred_fg: np.ndarray, gt_fg: np.ndarray) -> dict[str, float]:
    """IoU, Dice, accuracy, recall and precision of a boolean prediction against ground truth.

    Both arrays are boolean with True on tessera pixels. 0/0 cases: when both masks are empty
    every metric is 1.0 (nothing to find, nothing wrongly found); recall with an empty ground truth
    but a non-empty prediction, and precision with an empty prediction but a non-empty ground
    truth, are 0.0.
    """
    pred_fg = np.asarray(pred_fg, dtype=bool)
    gt_fg = np.asarray(gt_fg, dtype=bool)
    if pred_fg.shape != gt_fg.shape:
        raise ValueError(f"prediction shape {pred_fg.shape} != ground-truth shape {gt_fg.shape}")
    if pred_fg.size == 0:
        raise ValueError("cannot score an empty image")
    n_pred = int(np.count_nonzero(pred_fg))
    n_gt = int(np.count_nonzero(gt_fg))
    tp = int(np.count_nonzero(pred_fg & gt_fg))
    fp = n_pred - tp
    fn = n_gt - tp
    tn = pred_fg.size - tp - fp - fn
    both_empty = n_pred == 0 and n_gt == 0
    return {
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "accuracy": (tp + tn) / pred_fg.size,
        "recall": _ratio(tp, n_gt, both_empty),
        "precision": _ratio(tp, n_pred, both_empty),
    }


def _dense_ids(instances: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber the ids present in an instance map to 1..n (0 stays 0), keeping their order.

    Gaps in the numbering (ids without pixels) disappear, so ``n`` counts the regions present.
    """
    if not np.issubdtype(instances.dtype, np.integer):
        raise ValueError(f"instance maps must hold integer ids, not {instances.dtype}")
    if instances.size and int(instances.min()) < 0:
        raise ValueError("instance ids must be >= 0")
    max_id = int(instances.max()) if instances.size else 0
    if max_id <= instances.size:
        # A lookup table no larger than the image: one gather, no sort.
        present = np.bincount(instances.ravel(), minlength=max_id + 1) > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.int32)
        lut[~present] = 0
        return lut[instances], int(lut[-1])
    ids, inverse = np.unique(instances, return_inverse=True)
    dense = inverse.reshape(instances.shape) + (0 if ids[0] == 0 else 1)
    return dense, int(np.count_nonzero(ids))


def drop_specks(instances: np.ndarray, fraction: float = SPECK_FRACTION) -> tuple[np.ndarray, int]:
    """``instances`` without the components under ``fraction`` of the median area, and their count.

    The median is over the map's own components, so the rule follows the tessera scale (2 % of a
    37-px tessera is about 20 px; real chips and cut tesserae are larger).
    """
    areas = np.bincount(np.asarray(instances).ravel())
    ids = np.flatnonzero(areas)
    ids = ids[ids > 0]
    if ids.size == 0:
        return instances, 0
    specks = ids[areas[ids] < fraction * float(np.median(areas[ids]))]
    if specks.size == 0:
        return instances, 0
    return np.where(np.isin(instances, specks), 0, instances), int(specks.size)


class TileMatches(NamedTuple):
    """Every ground-truth tile (in increasing id order) with its best predicted region."""

    intersection: np.ndarray  # |T ∩ R| per tile
    tile_area: np.ndarray  # |T| per tile
    region_area: np.ndarray  # |R| per tile, 0 where no region touches the tile
    region: np.ndarray  # R's index among the predicted regions (1..n_pred), 0 for none
    n_pred: int  # number of predicted regions


def tile_matches(gt_instances: np.ndarray, pred_instances: np.ndarray) -> TileMatches:
    """Match every ground-truth tile to the predicted region that overlaps it most.

    Ties in the largest overlap go to the region with the smallest id, so results are
    deterministic. Cost: a few vectorised passes over the pixels plus a sort of the runs of
    equal (tile, region) pairs along image rows, not of the pixels.
    """
    gt_instances = np.asarray(gt_instances)
    pred_instances = np.asarray(pred_instances)
    if gt_instances.shape != pred_instances.shape:
        raise ValueError(
            f"prediction shape {pred_instances.shape} != ground-truth shape {gt_instances.shape}"
        )
    g, n_gt = _dense_ids(gt_instances)
    p, n_pred = _dense_ids(pred_instances)
    gt_area = np.bincount(g.ravel(), minlength=n_gt + 1)
    pred_area = np.bincount(p.ravel(), minlength=n_pred + 1)

    # Overlap count of every (tile, region) pair, keyed tile * (n_pred + 1) + region. Overlapping
    # pixels come in raster order, so equal keys form long runs (a tile's row inside one region):
    # collapsing runs first leaves far fewer keys to sort than there are pixels.
    both = (g > 0) & (p > 0)
    key = g[both].astype(np.int64) * (n_pred + 1) + p[both]
    new_run = np.ones(key.size, dtype=bool)
    new_run[1:] = key[1:] != key[:-1]
    run_start = np.flatnonzero(new_run)
    run_length = np.diff(np.append(run_start, key.size))
    pair_keys, inverse = np.unique(key[run_start], return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=run_length, minlength=pair_keys.size)
    counts = counts.astype(np.int64)
    rows, cols = np.divmod(pair_keys, n_pred + 1)
    # Per tile: largest overlap first, then smallest region id; keep the first pair of each tile.
    order = np.lexsort((cols, -counts, rows))
    rows, cols, counts = rows[order], cols[order], counts[order]
    first = np.ones(rows.size, dtype=bool)
    first[1:] = rows[1:] != rows[:-1]

    intersection = np.zeros(n_gt + 1, dtype=np.int64)
    match = np.zeros(n_gt + 1, dtype=np.int64)
    intersection[rows[first]] = counts[first]
    match[rows[first]] = cols[first]
    region_area = np.where(match > 0, pred_area[match], 0)
    return TileMatches(intersection[1:], gt_area[1:], region_area[1:], match[1:], n_pred)


def tile_metrics(gt_instances: np.ndarray, pred_instances: np.ndarray) -> dict[str, Any]:
    """Count error, precision, recall and F-measure per tessera, plus N_gt and N_pred.

    Both inputs are integer instance maps (0 = background); ids need not be consecutive.
    Predicted regions are taken as given: pass the 4-connected components of a binary prediction
    (``dataset.label_components``) when no instance map was predicted.

    With no ground-truth tile: precision, recall and F are 1.0 and the count error 0.0 when
    nothing is predicted either; otherwise precision, recall and F are 0.0 and the count error
    (a division by zero) is None.
    """
    intersection, tile_area, region_area, _, n_pred = tile_matches(gt_instances, pred_instances)
    n_gt = int(tile_area.size)
    if n_gt == 0:
        perfect = n_pred == 0
        return {
            "count_error": 0.0 if perfect else None,
            "precision": float(perfect),
            "recall": float(perfect),
            "f_measure": float(perfect),
            "n_gt": 0,
            "n_pred": n_pred,
        }
    # A tile that no region touches has region_area 0: it scores 0 on both.
    precision = float(np.mean(intersection / np.maximum(region_area, 1)))
    recall = float(np.mean(intersection / tile_area))
    f_measure = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "count_error": abs(n_gt - n_pred) / n_gt,
        "precision": precision,
        "recall": recall,
        "f_measure": f_measure,
        "n_gt": n_gt,
        "n_pred": n_pred,
    }


def mean_metrics(per_image: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The mean over images of every metric, group by group (``{"pixel": {...}, "tile": {...}}``).

    None values are left out of their mean; a metric that is None everywhere stays None. The mean
    of per-image F-measures is reported (not the F of the mean precision and recall).
    """
    per_image = list(per_image)
    groups = {"pixel": PIXEL_KEYS, "tile": TILE_KEYS}
    out: dict[str, dict[str, Any]] = {}
    for group, keys in groups.items():
        out[group] = {}
        for key in keys:
            values = [m[group][key] for m in per_image if m[group][key] is not None]
            out[group][key] = float(np.mean(values)) if values else None
    return out


def comparison_image(
    gt_fg: np.ndarray, pred_fg: np.ndarray, baseline_fg: np.ndarray
) -> np.ndarray:
    """The thesis's comparison picture as an RGB uint8 image.

    On ground-truth tessera pixels: white where both predictions have foreground, green where
    only ``pred_fg`` has it, red where only ``baseline_fg`` has it, blue where both miss it.
    Ground-truth background is black whatever the predictions say.
    """
    gt_fg = np.asarray(gt_fg, dtype=bool)
    pred_fg = np.asarray(pred_fg, dtype=bool)
    baseline_fg = np.asarray(baseline_fg, dtype=bool)
    if not gt_fg.shape == pred_fg.shape == baseline_fg.shape:
        raise ValueError(
            f"shapes differ: ground truth {gt_fg.shape}, prediction {pred_fg.shape}, "
            f"baseline {baseline_fg.shape}"
        )
    # Index 0..3 = pred correct * 2 + baseline correct; 4 = background.
    palette = np.array([BLUE, RED, GREEN, WHITE, BLACK], dtype=np.uint8)
    code = pred_fg.astype(np.uint8) * 2 + baseline_fg.astype(np.uint8)
    code[~gt_fg] = 4
    return palette[code]
