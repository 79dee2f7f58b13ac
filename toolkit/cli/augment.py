"""`mosaic-toolkit augment`: crop, rotate and flip a dataset; split it per source mosaic."""
from __future__ import annotations

from pathlib import Path

import click

from ..data.augment import DEFAULT_SPLIT, TRANSFORMS, augment_dataset, parse_split, parse_transform_names
from ..core.dataset import SPLITS
from .options import count, handle_errors, overwrite_option, seed_option


@click.command("augment")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(path_type=Path),
    help="Folder for the augmented dataset (must not exist or be empty, see --overwrite).",
)
@click.option(
    "--tesserae-per-crop", type=click.IntRange(min=1), default=100, show_default=True,
    help="About how many tesserae one crop holds; images with at most 1.5x this stay whole.",
)
@click.option(
    "--min-visible", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
    help="Keep a tessera cut by a crop border only if this share of its area is in the crop.",
)
@click.option(
    "--max-side", type=click.IntRange(min=1), default=1024, show_default=True,
    help="Shrink every crop so its longest side is at most this many pixels.",
)
@click.option(
    "--transforms", "transforms_text", default=",".join(TRANSFORMS), show_default=True,
    help="Comma-separated variants written per crop (rot90 turns counter-clockwise).",
)
@click.option(
    "--split", "split_text", default=",".join(f"{f:g}" for f in DEFAULT_SPLIT),
    show_default=True,
    help="Train,val,test fractions (sum 1), assigned per source mosaic, never per crop.",
)
@click.option(
    "--keep-splits", is_flag=True,
    help="Keep the input manifest's splits (every sample must have one) instead of --split.",
)
@seed_option()
@overwrite_option
@handle_errors
def command(
    dataset: Path,
    out: Path,
    tesserae_per_crop: int,
    min_visible: float,
    max_side: int,
    transforms_text: str,
    split_text: str,
    keep_splits: bool,
    seed: int,
    overwrite: bool,
) -> None:
    """Crop DATASET into ~N-tessera tiles, rotate and flip each, and write a new dataset.

    Every crop is written as is and rotated by 90/180/270 degrees and flipped left-right and
    top-bottom; masks, instances and points are recomputed for every output. Splits are drawn
    per source mosaic (manifest source.mosaic, else the Label Studio task, else the image), so
    no mosaic appears in two splits. The same --seed gives the same output.
    """
    summary = augment_dataset(
        dataset,
        out,
        tesserae_per_crop=tesserae_per_crop,
        min_visible=min_visible,
        max_side=max_side,
        transforms=parse_transform_names(transforms_text),
        split=parse_split(split_text),
        keep_splits=keep_splits,
        seed=seed,
        overwrite=overwrite,
    )
    per_split = ", ".join(
        f"{name} {summary.per_split[name]} ({count(summary.mosaics_per_split[name], 'mosaic')})"
        for name in SPLITS
    )
    skipped = f", {count(summary.skipped_empty, 'empty crop')} skipped" if summary.skipped_empty else ""
    click.echo(
        f"{count(summary.parents, 'image')} from {count(summary.mosaics, 'mosaic')} -> "
        f"{count(summary.crops, 'crop')}{skipped} -> {count(summary.outputs, 'sample')} in {out}"
    )
    click.echo(f"splits: {per_split}")
    note = summary.spatial_note()
    if note:
        click.echo(note)
