"""`mosaic-toolkit eval`: score predicted masks against a ground-truth dataset."""
from __future__ import annotations

from pathlib import Path

import click

from ..core.dataset import SPLITS
from ..core.errors import MosaicError
from ..evaluation.evaluate import evaluate, markdown_table
from .options import base_option, device_option, handle_errors, overwrite_option, split_option

_FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)


def _parse_models(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    from ..evaluation.compare import parse_models

    try:
        return parse_models(value)
    except MosaicError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("eval")
@click.option(
    "--pred", "pred", default=None, type=_FOLDER,
    help="Folder of predicted masks PRED/<stem>.png (tesserae black on white); optional "
    "PRED/instances/<stem>.png holds predicted tessera ids. Give --pred or --models.",
)
@click.option(
    "--models", default=None, callback=_parse_models,
    help="Segment the split with each model and compare them: LABEL=MODEL,... where MODEL is "
    "a SAM 2 name, checkpoint or fine-tune file, or classical (a bare 'classical' is its own "
    "label), e.g. base=sam2.1-large,finetuned=run/finetune.pt,classical. A checkpoint "
    "fine-tuned elsewhere takes its decoder output as a suffix: thesis=ckpt.pt@multimask-first "
    "(single, multimask-first or sam2; a fine-tune file records its own).",
)
@click.option(
    "--gt", "gt", required=True, type=_FOLDER,
    help="Ground-truth dataset folder (masks/, optional instances/, manifest.json).",
)
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Report folder to create: metrics.json, metrics.csv, comparison/ with --baseline; with "
    "--models comparison.md/.csv/.json/.png, comparison/, pred/ and eval/ per model.",
)
@click.option(
    "--baseline", type=_FOLDER, default=None,
    help="Second prediction folder; writes comparison pictures (white both correct, green only "
    "PRED, red only BASELINE, blue missed by both, black background). With --pred only.",
)
@split_option(
    SPLITS, show_default="all samples with --pred, test with --models",
    help="Evaluate only this split of the manifest.",
)
@click.option(
    "--per-image", is_flag=True,
    help="List every image in the table printed on stdout, not only the mean. With --pred only.",
)
@device_option(
    help="Torch device for SAM 2 models with --models (cpu, cuda, cuda:1, mps) "
    "[default: CUDA, else MPS, else CPU].",
)
@base_option(
    help="Base SAM 2 checkpoint of the fine-tune files in --models, when they find theirs neither "
    "in the model cache nor at the path they recorded; its sha256 must match the recorded one.",
)
@overwrite_option
@handle_errors
def command(
    pred: Path | None,
    models: list[tuple[str, str]] | None,
    gt: Path,
    out: Path,
    baseline: Path | None,
    split: str | None,
    per_image: bool,
    device: str | None,
    base: str | None,
    overwrite: bool,
) -> None:
    """Score predicted masks PRED against the ground-truth dataset GT (pixel and per-tessera).

    Pixel metrics: IoU, Dice, accuracy, recall, precision (tesserae are the foreground).
    Per-tessera metrics: count error, precision, recall, F (each ground-truth tessera against the
    predicted region overlapping it most). Prints a Markdown table (shares in %) of the mean.

    With --models instead of --pred, each model segments the split (default test) and one table
    compares them, with a bar plot and the comparison pictures of the first two models (green
    only the second, red only the first).
    """
    if (pred is None) == (models is None):
        raise click.UsageError("give either --pred (a folder of predictions) or --models (models to compare)")
    if models is not None:
        for flag, used in (("--baseline", baseline is not None), ("--per-image", per_image)):
            if used:
                raise click.UsageError(f"{flag} applies to --pred; --models compares the first two models itself")
        from ..evaluation.compare import compare_models

        summary = compare_models(models, gt, out, split=split or "test", device=device, overwrite=overwrite,
                                 base=base)
        click.echo(markdown_table({m["label"]: m["mean"] for m in summary["models"]}))
        click.echo(f"Comparison written to {out}", err=True)
        return
    if device is not None or base is not None:
        raise click.UsageError("--device and --base apply to --models")
    report = evaluate(pred, gt, out, baseline=baseline, split=split, overwrite=overwrite)
    rows = dict(report["images"]) if per_image else {}
    rows["**mean**"] = report["mean"]
    click.echo(markdown_table(rows))
    click.echo(f"Report written to {out}", err=True)
