"""`mosaic-toolkit tune`: search the mask generator's thresholds with Optuna."""
from __future__ import annotations

from pathlib import Path

import click

from ..core.dataset import SPLITS
from .options import (
    device_option,
    handle_errors,
    method_option,
    base_option,
    model_option,
    output_option,
    seed_option,
    split_option,
    tile_option,
)


@click.command("tune")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@model_option(
    required=True,
    help="SAM 2 model to tune: a model name (see `mosaic-toolkit weights list`), a checkpoint "
    "file or a fine-tune file (updated in place with the best parameters).",
)
@base_option()
@output_option()
@click.option(
    "--trials", type=click.IntRange(min=1), default=30, show_default=True,
    help="Trials this run adds to the study (a study continues where it stopped).",
)
@click.option(
    "--storage", default=None, show_default="SQLite file <model stem>.optuna.db beside the model",
    help="Optuna storage: a SQLAlchemy URL (e.g. postgresql://user@host/db, so several machines "
    "share one study) or a SQLite file path.",
)
@click.option(
    "--study", "study_name", default=None, show_default="<model stem>-generator",
    help="Study name in the storage; the same name continues the study.",
)
@split_option(
    SPLITS, default="val",
    help="Dataset split whose images score each trial.",
)
@click.option(
    "--max-images", type=click.IntRange(min=1), default=None, show_default="all of the split",
    help="Score trials on the first N images of the split only.",
)
@method_option(
    show_default="the model's setting, else guided",
    help="Whole-image method to tune. guided and fast reuse decoded prompts across trials; stock "
    "re-runs SAM 2's automatic mask generator in every trial (slow).",
)
@tile_option(
    help="Tile side for images larger than a tile, as `segment --tile`; 0 = automatic.",
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
    show_default="<model dir>/<model stem>-tune",
    help="Folder (replaced each run) for tune.json, trials.csv, history.png, importances.png and, "
    "for a base checkpoint, tuned.pt.",
)
@device_option()
@click.option(
    "--memo-gb", type=click.FloatRange(min=0), default=2.0, show_default=True,
    help="Memory for decoded prompts kept across trials (beyond it, the least recently used "
    "are decoded again when needed).",
)
@seed_option(0)
@handle_errors
def command(
    dataset: Path,
    model: str,
    base: str | None,
    output: str | None,
    trials: int,
    storage: str | None,
    study_name: str | None,
    split: str,
    max_images: int | None,
    method: str | None,
    tile: int,
    out: Path | None,
    device: str | None,
    memo_gb: float,
    seed: int,
) -> None:
    """Search the generator's thresholds and post-processing on DATASET with Optuna.

    Searches pred_iou_thresh, stability_score_thresh, stability_score_offset, mask_threshold,
    opening, min_area and erosion, maximising the mean pixel Dice (the per-tessera F is recorded
    too). The study's best parameters are written into the model's metadata, so `segment` uses
    them without flags: a fine-tune file is updated in place, a base checkpoint gets OUT/tuned.pt.
    """
    import optuna

    from ..training.tune import SEARCHED, tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar reports trials
    result = tune(
        dataset, model, trials=trials, storage=storage, study_name=study_name, split=split,
        max_images=max_images, method=method, tile=tile or None, seed=seed, device=device,
        out=out, memo_bytes=int(memo_gb * 2**30), output=output, base=base,
    )
    summary = result.to_json()
    click.echo(f"Study {result.study!r} in {result.storage}: {result.trials_complete} completed trials")
    click.echo(f"Best trial {result.best_trial}: Dice {result.best_dice:.4f}, "
               f"per-tessera F {result.best_tile_f:.4f}")
    params = result.best_params.to_dict()
    click.echo("  " + ", ".join(f"{k}={params[k]:.4g}" if isinstance(params[k], float) else f"{k}={params[k]}"
                                for k in SEARCHED))
    seconds = summary["seconds"]
    if seconds["median_later_trial"] is not None:
        click.echo(f"Seconds per trial: first {seconds['first_trial']} (encodes the images), "
                   f"then {seconds['median_later_trial']} (median)")
    if result.written_to.parent == result.out:
        click.echo(f"Best parameters written to {result.written_to} (a fine-tune file with the "
                   f"base's own weights): use `segment --model {result.written_to}`")
    else:
        click.echo(f"Best parameters written into {result.written_to}")
    for note in result.notes:
        click.echo(f"Note: {note}", err=True)
    click.echo(f"Report: {result.out}", err=True)
