"""Segment a dataset split with several models and compare them (`eval --models`).

The thesis's Table 4.2 compares models on the test split by IoU, accuracy, Dice and recall; here
each model (a SAM 2 name, checkpoint or fine-tune file, or the classical engine) segments the
split's images as ``segment`` would, is scored as ``eval`` would, and one table compares them,
with the per-tessera columns too::

    REPORT/comparison.md         Markdown table, one row per model (mean over the images)
    REPORT/comparison.csv        the same numbers as fractions, one row per model
    REPORT/comparison.json       per model: spec, engine and parameters, seconds, mean metrics
    REPORT/comparison.png        grouped bar plot of the shares (pixel and per-tessera)
    REPORT/comparison/<stem>.png the thesis's comparison picture of the first two models: white
                                 both right, green only the second, red only the first (the
                                 baseline), blue missed by both, black background
    REPORT/pred/<label>/         each model's segmentation (``segment`` output)
    REPORT/eval/<label>/         each model's per-image report (``eval`` output)
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

from ..core.dataset import Dataset, mask_foreground
from ..core.io import atomic_output_dir, read_mask, write_image, write_json
from ..core.errors import MosaicError
from .evaluate import COMPARISON_DIR, csv_columns, evaluate, markdown_table
from .metrics import PIXEL_KEYS, TILE_KEYS, comparison_image
from ..engines import engine_info, open_engine
from ..segment import segment_paths

CLASSICAL = "classical"
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # labels name folders
# Bars of the plot: (group, key, label); shares only (the count error has no 0..1 scale).
BAR_METRICS = (
    ("pixel", "iou", "IoU"),
    ("pixel", "accuracy", "accuracy"),
    ("pixel", "dice", "Dice"),
    ("pixel", "recall", "recall"),
    ("tile", "precision", "tile precision"),
    ("tile", "recall", "tile recall"),
    ("tile", "f_measure", "tile F"),
)


def parse_models(text: str) -> list[tuple[str, str]]:
    """``"base=sam2.1-large,finetuned=run/finetune.pt,classical"`` -> [(label, spec), ...].

    Every entry is LABEL=MODEL; a bare ``classical`` is both label and model. Labels name the
    output folders, so they are letters, digits, ``.``, ``_`` and ``-``, and unique. A SAM 2
    checkpoint fine-tuned elsewhere is declared with its decoder output as a suffix,
    ``thesis=ckpt.pt@multimask-first`` (see :func:`split_output`).
    """
    models: list[tuple[str, str]] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            raise MosaicError(f"models {text!r}: empty entry (entries are LABEL=MODEL, comma-separated)")
        if "=" not in entry:
            if entry != CLASSICAL:
                raise MosaicError(
                    f"models: {entry!r} needs a label, e.g. base={entry} "
                    f"(only {CLASSICAL!r} stands alone)"
                )
            label, spec = entry, entry
        else:
            label, spec = (s.strip() for s in entry.split("=", 1))
        if not label or not spec:
            raise MosaicError(f"models: {entry!r} needs both a label and a model (LABEL=MODEL)")
        if not LABEL_PATTERN.match(label):
            raise MosaicError(
                f"models: label {label!r} may only hold letters, digits, '.', '_' and '-' "
                "(it names a folder)"
            )
        if label in (m[0] for m in models):
            raise MosaicError(f"models: label {label!r} is given twice")
        models.append((label, spec))
    return models


def split_output(spec: str) -> tuple[str, str | None]:
    """``"ckpt.pt@multimask-first"`` -> ("ckpt.pt", "multimask-first"); no such suffix -> (spec, None)."""
    from ..sam.params import OUTPUTS

    model, sep, output = spec.rpartition("@")
    if sep and model and output in OUTPUTS:
        return model, output
    return spec, None


def _is_finetune(name: str) -> bool:
    """Whether the model ``name`` is a fine-tune file (the ones ``--base`` applies to)."""
    from ..sam.models import is_finetune_file

    path = Path(name).expanduser()
    return path.is_file() and is_finetune_file(path)


def _check_models(models: list[tuple[str, str]], base: str | os.PathLike | None = None) -> None:
    """Resolve every SAM 2 model now, so a typo fails before hours of segmentation."""
    from ..sam.models import resolve_model

    if not models:
        raise MosaicError("models: give at least one model")
    for label, spec in models:
        if spec != CLASSICAL:
            try:
                name, output = split_output(spec)
                resolve_model(name, base=base if _is_finetune(name) else None, output=output)
            except MosaicError as exc:
                raise MosaicError(f"model {label!r}: {exc}") from exc


def compare_models(
    models: list[tuple[str, str]],
    gt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = "test",
    device: str | None = None,
    tile: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    base: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Segment ``split`` of the dataset ``gt`` with every ``(label, spec)`` model, score each and
    write the comparison report to ``out`` (module docstring). Returns comparison.json's content.

    ``spec`` is "classical" or a SAM 2 model name, checkpoint or fine-tune file (its tuned
    parameters apply); ``base`` is the base checkpoint of the fine-tune files among them, when
    they cannot find their own. Nothing is written unless every model finishes.
    """
    out = Path(out)
    dataset = Dataset.open(gt)
    samples = dataset.split(split)
    if not samples:
        raise MosaicError(f"{dataset.root}: no samples in split {split!r}")
    root, report = dataset.root.resolve(), out.resolve()
    if report == root or report in root.parents:  # --overwrite would delete the dataset
        raise MosaicError(f"{out}: the report folder must not be or contain the dataset {gt}")
    _check_models(models, base)
    images = [dataset.image_path(s) for s in samples]

    rows: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for label, spec in models:
            name, output = (None, None) if spec == CLASSICAL else split_output(spec)
            engine = open_engine(CLASSICAL if spec == CLASSICAL else "sam2", name, device, output=output,
                                 base=base if spec != CLASSICAL and _is_finetune(name) else None)
            segmented = segment_paths(images, tmp / "pred" / label, engine, tile=tile, progress=progress)
            info = engine_info(engine)
            del engine  # one model in memory at a time
            result = evaluate(tmp / "pred" / label, dataset.root, tmp / "eval" / label, split=split)
            rows[label] = result["mean"]
            records.append({
                "label": label, "spec": spec, **info,
                "seconds": round(sum(r["seconds"] for r in segmented), 3),
                "mean": result["mean"],
            })
        if len(models) >= 2:
            (first, _), (second, _) = models[:2]
            for sample in samples:
                name = f"{sample.stem}.png"
                picture = comparison_image(
                    mask_foreground(dataset.mask(sample)),
                    mask_foreground(read_mask(tmp / "pred" / second / name)),
                    mask_foreground(read_mask(tmp / "pred" / first / name)),
                )
                write_image(tmp / COMPARISON_DIR / name, picture)
        summary = {
            "version": 1, "gt": str(root), "split": split, "images": len(samples),
            "pictures": None if len(models) < 2 else {"green": models[1][0], "red": models[0][0]},
            "models": records,
        }
        write_json(tmp / "comparison.json", summary)
        write_table_csv(tmp / "comparison.csv", records)
        images_text = f"{len(samples)} image{'s' * (len(samples) != 1)}, split {split or 'all'}"
        (tmp / "comparison.md").write_text(
            f"Mean per image over {images_text} of {root}.\n\n{markdown_table(rows)}\n"
        )
        bar_plot(tmp / "comparison.png", rows, images_text)
    return summary


def write_table_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """comparison.csv: ``model``, ``spec`` and every metric column of metrics.csv (fractions)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "spec"] + csv_columns())
        for rec in records:
            values = [rec["mean"]["pixel"][k] for k in PIXEL_KEYS] + [rec["mean"]["tile"][k] for k in TILE_KEYS]
            writer.writerow([rec["label"], rec["spec"]] + ["" if v is None else v for v in values])


def bar_plot(path: Path, rows: dict[str, dict[str, Any]], subtitle: str) -> None:
    """Grouped bars: one group per metric (BAR_METRICS), one bar per model, in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(rows)
    x = np.arange(len(BAR_METRICS))
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    for i, label in enumerate(labels):
        values = [100 * (rows[label][g][k] or 0.0) for g, k, _ in BAR_METRICS]
        bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, [name for _, _, name in BAR_METRICS])
    ax.set_ylabel("%")
    ax.set_ylim(0, 118)  # room for the legend above the bars
    ax.set_title(f"Model comparison ({subtitle})")
    ax.legend(loc="upper center", ncol=len(labels), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
