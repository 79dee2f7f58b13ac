"""`mosaic-toolkit eval`: score predicted masks against a ground-truth dataset."""
from __future__ import annotations

from pathlib import Path

import click

from ..dataset import SPLITS
from ..evaluate import evaluate, markdown_table
from .options import handle_errors, overwrite_option

_FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command("eval")
@click.option(
    "--pred", "pred", required=True, type=_FOLDER,
    help="Folder of predicted masks PRED/<stem>.png (tesserae black on white); optional "
    "PRED/instances/<stem>.png holds predicted tessera ids.",
)
@click.option(
    "--gt", "gt", required=True, type=_FOLDER,
    help="Ground-truth dataset folder (masks/, optional instances/, manifest.json).",
)
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Report folder to create: metrics.json, metrics.csv, comparison/ with --baseline.",
)
@click.option(
    "--baseline", type=_FOLDER, default=None,
    help="Second prediction folder; writes comparison pictures (white both correct, green only "
    "PRED, red only BASELINE, blue missed by both, black background).",
)
@click.option(
    "--split", type=click.Choice(SPLITS), default=None, show_default="all samples",
    help="Evaluate only this split of the manifest.",
)
@click.option(
    "--per-image", is_flag=True,
    help="List every image in the table printed on stdout, not only the mean.",
)
@overwrite_option
@handle_errors
def command(
    pred: Path,
    gt: Path,
    out: Path,
    baseline: Path | None,
    split: str | None,
    per_image: bool,
    overwrite: bool,
) -> None:
    """Score predicted masks PRED against the ground-truth dataset GT (pixel and per-tessera).

    Pixel metrics: IoU, Dice, accuracy, recall, precision (tesserae are the foreground).
    Per-tessera metrics: count error, precision, recall, F (each ground-truth tessera against the
    predicted region overlapping it most). Prints a Markdown table (shares in %) of the mean.
    """
    report = evaluate(pred, gt, out, baseline=baseline, split=split, overwrite=overwrite)
    rows = dict(report["images"]) if per_image else {}
    rows["**mean**"] = report["mean"]
    click.echo(markdown_table(rows))
    click.echo(f"Report written to {out}", err=True)
