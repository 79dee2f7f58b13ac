"""Score a folder of predicted masks against a ground-truth dataset and write a report.

```
PRED/<stem>.png              black-on-white predicted mask (tesserae dark), one per sample
PRED/instances/<stem>.png    optional predicted tessera ids (16-bit); if the folder exists it
                             must hold every stem, else regions are the mask's 4-connected parts
REPORT/metrics.json          {"images": {stem: {"pixel": {...}, "tile": {...}}},
                              "mean": {"pixel": {...}, "tile": {...}}}   (fractions 0..1)
REPORT/metrics.csv           one row per image and a final "mean" row
REPORT/comparison/<stem>.png with a baseline: the thesis's comparison picture
```
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from ..core.dataset import Dataset, Sample, label_components, mask_foreground
from ..core.io import atomic_output_dir, read_instances, read_mask, write_image, write_json
from ..core.errors import MosaicError
from ..core.predictions import INSTANCES_DIR, check_out_is_separate
from .metrics import (
    PIXEL_KEYS,
    TILE_KEYS,
    comparison_image,
    drop_specks,
    mean_metrics,
    pixel_metrics,
    tile_metrics,
)

COMPARISON_DIR = "comparison"

# Markdown columns: (group, key, header, scale, decimals). Shares shown as percentages, the count
# error as a fraction and tile counts as numbers, as in the thesis's tables.
_TABLE_COLUMNS = (
    ("pixel", "iou", "IoU %", 100, 2),
    ("pixel", "dice", "Dice %", 100, 2),
    ("pixel", "accuracy", "Accuracy %", 100, 2),
    ("pixel", "recall", "Recall %", 100, 2),
    ("pixel", "precision", "Precision %", 100, 2),
    ("tile", "count_error", "Count error", 1, 3),
    ("tile", "precision", "Tile precision %", 100, 2),
    ("tile", "recall", "Tile recall %", 100, 2),
    ("tile", "f_measure", "Tile F %", 100, 2),
    ("tile", "n_gt", "Tesserae (GT)", 1, 1),
    ("tile", "n_pred", "Regions (pred)", 1, 1),
)


def evaluate(
    pred_dir: str | os.PathLike,
    gt_dataset: str | os.PathLike,
    out: str | os.PathLike,
    baseline: str | os.PathLike | None = None,
    split: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score every sample of ``gt_dataset`` (or of one ``split``) and write the report to ``out``.

    Every sample needs ``pred_dir/<stem>.png`` (and ``baseline/<stem>.png`` with a baseline) of
    the ground truth's size; a missing or mismatched file is a MosaicError naming it, and then
    nothing is written (missing files are found before any image is scored). Predictions for
    stems outside the dataset or split are ignored. Returns the content of ``metrics.json``.
    """
    pred_dir, out = Path(pred_dir), Path(out)
    baseline = Path(baseline) if baseline is not None else None
    dataset = Dataset.open(gt_dataset)
    samples = dataset.split(split)
    if not samples:
        raise MosaicError(f"{dataset.root}: no samples in split {split!r}")
    check_out_is_separate(out, [pred_dir, dataset.root] + ([baseline] if baseline else []))
    _check_files(pred_dir, samples, "prediction")
    if (pred_dir / INSTANCES_DIR).is_dir():
        _check_files(pred_dir / INSTANCES_DIR, samples, "predicted instance map")
    if baseline is not None:
        _check_files(baseline, samples, "baseline")

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        images = {}
        for sample in tqdm(samples, desc="eval", unit="image", disable=None):
            images[sample.stem] = _evaluate_sample(dataset, sample, pred_dir, baseline, tmp)
        report = {"images": images, "mean": mean_metrics(images.values())}
        write_json(tmp / "metrics.json", report)
        write_csv(tmp / "metrics.csv", report)
    return report


def _evaluate_sample(
    dataset: Dataset, sample: Sample, pred_dir: Path, baseline: Path | None, tmp: Path
) -> dict[str, dict[str, Any]]:
    """Metrics of one sample; with a baseline, also writes its comparison picture into ``tmp``."""
    gt_path = dataset.root / "masks" / f"{sample.stem}.png"
    gt_fg = mask_foreground(dataset.mask(sample))
    gt_instances = dataset.instances(sample)
    _check_shape(dataset.root / INSTANCES_DIR / f"{sample.stem}.png", gt_instances, gt_fg, gt_path)
    gt_instances, _ = drop_specks(gt_instances)  # not tesserae: not scored (metrics.SPECK_FRACTION)

    pred_path = pred_dir / f"{sample.stem}.png"
    pred_fg = mask_foreground(read_mask(pred_path))
    _check_shape(pred_path, pred_fg, gt_fg, gt_path)
    instances_path = pred_dir / INSTANCES_DIR / f"{sample.stem}.png"
    if instances_path.is_file():
        pred_instances = read_instances(instances_path)
        _check_shape(instances_path, pred_instances, gt_fg, gt_path)
    else:
        pred_instances, _ = label_components(pred_fg)

    if baseline is not None:
        base_path = baseline / f"{sample.stem}.png"
        base_fg = mask_foreground(read_mask(base_path))
        _check_shape(base_path, base_fg, gt_fg, gt_path)
        write_image(
            tmp / COMPARISON_DIR / f"{sample.stem}.png", comparison_image(gt_fg, pred_fg, base_fg)
        )
    unknown = dataset.unknown(sample)
    if unknown is not None:  # nobody annotated there (partial export): neither right nor wrong
        # pixels: only the known ones count; tesserae: those touching the unknown area (in the
        # ground truth or the prediction) may be incomplete on either side and are left out
        near = ndi.binary_dilation(unknown)
        gt_instances = _without_ids(gt_instances, near)
        pred_instances = _without_ids(pred_instances, near)
        return {"pixel": pixel_metrics(pred_fg[~unknown], gt_fg[~unknown]),
                "tile": tile_metrics(gt_instances, pred_instances)}
    return {
        "pixel": pixel_metrics(pred_fg, gt_fg),
        "tile": tile_metrics(gt_instances, pred_instances),
    }


def _without_ids(instances: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The instance map without the ids that have a pixel in ``where``."""
    drop = np.unique(instances[where])
    return np.where(np.isin(instances, drop[drop > 0]), 0, instances)


def _check_files(folder: Path, samples: list[Sample], what: str) -> None:
    """Every sample has ``folder/<stem>.png``; otherwise name the first missing file."""
    paths = [folder / f"{s.stem}.png" for s in samples]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MosaicError(f"{missing[0]}: {what} file not found{more}")


def _check_shape(path: Path, array: np.ndarray, gt_fg: np.ndarray, gt_path: Path) -> None:
    if array.shape[:2] != gt_fg.shape:
        (h, w), (gh, gw) = array.shape[:2], gt_fg.shape
        raise MosaicError(
            f"{path}: size {w}x{h} differs from the ground truth {gt_path} ({gw}x{gh})"
        )


def csv_columns() -> list[str]:
    """The metric columns of metrics.csv, e.g. ``pixel_iou`` and ``tile_f_measure``."""
    return [f"pixel_{k}" for k in PIXEL_KEYS] + [f"tile_{k}" for k in TILE_KEYS]


def write_csv(path: str | os.PathLike, report: Mapping[str, Any]) -> None:
    """metrics.csv: a ``stem`` column, one row per image, then the ``mean`` row (empty = null)."""
    rows = list(report["images"].items()) + [("mean", report["mean"])]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stem"] + csv_columns())
        for stem, metrics in rows:
            values = [metrics["pixel"][k] for k in PIXEL_KEYS]
            values += [metrics["tile"][k] for k in TILE_KEYS]
            writer.writerow([stem] + ["" if v is None else v for v in values])


def markdown_table(rows: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """A Markdown table, one row per name (an image, a model...) of ``{"pixel", "tile"}`` metrics.

    Shares are shown as percentages (the headers say so), the count error as a fraction; a
    missing value (None) shows as "n/a".
    """
    header = ["name"] + [col[2] for col in _TABLE_COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(_TABLE_COLUMNS),
    ]
    for name, metrics in rows.items():
        cells = [str(name)]
        for group, key, _, scale, decimals in _TABLE_COLUMNS:
            value = metrics[group][key]
            if value is None:
                cells.append("n/a")
            elif isinstance(value, int):
                cells.append(str(value))
            else:
                cells.append(f"{value * scale:.{decimals}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
