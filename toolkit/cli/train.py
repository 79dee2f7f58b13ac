"""`mosaic-toolkit train`: fine-tune SAM 2's prompt encoder and mask decoder on a dataset.

Several GPUs: run the same command under torchrun, e.g.
``torchrun --nproc-per-node 4 -m mosaic_toolkit.cli.train DATASET --base ... --out ...``.
"""
from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from ..sam.params import TRAINED_OUTPUTS
from ..training.config import DEFAULTS, DICE_MODES, LIMITS
from .options import device_option, handle_errors


def _range(name: str) -> click.ParamType:
    """The click type of a TrainConfig field, from its default's type and its range."""
    limit = LIMITS[name]
    if isinstance(getattr(DEFAULTS, name), int):
        return click.IntRange(min=int(limit.low) + int(limit.low_open))
    return click.FloatRange(min=limit.low, min_open=limit.low_open)


@click.command("train")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--base", required=True,
    help="Model to start from: a model name (see `mosaic-toolkit weights list`), a SAM 2 "
    "checkpoint file, or a fine-tune file.",
)
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Run folder: finetune.pt (best epoch), last.pt, metrics.csv, training.png, tb/, cache/.",
)
@click.option("--epochs", type=_range("epochs"), default=DEFAULTS.epochs, show_default=True, help="Training epochs.")
@click.option(
    "--batch-size", type=_range("batch_size"), default=DEFAULTS.batch_size, show_default=True,
    help="Images per optimizer step (per process under torchrun).",
)
@click.option("--lr", type=_range("lr"), default=DEFAULTS.lr, show_default=True,
              help="Initial learning rate (AdamW).")
@click.option(
    "--min-lr", type=click.FloatRange(min=0), default=None,
    help="Learning rate at the end of the cosine schedule  [default: --lr / 100]",
)
@click.option("--weight-decay", type=_range("weight_decay"), default=DEFAULTS.weight_decay, show_default=True,
              help="AdamW weight decay.")
@click.option(
    "--score-weight", type=_range("score_weight"), default=DEFAULTS.score_weight, show_default=True,
    help="λ: weight of |predicted IoU - actual IoU| added to the Dice loss.",
)
@click.option(
    "--max-prompts", type=_range("max_prompts"), default=DEFAULTS.max_prompts, show_default=True,
    help="Tesserae prompted per image and step (sampled when an image has more); 0 = all.",
)
@click.option(
    "--val-every", type=_range("val_every"), default=DEFAULTS.val_every, show_default=True,
    help="Validate (full-image segmentation of the val split) every N epochs and after the last.",
)
@click.option(
    "--output", type=click.Choice(TRAINED_OUTPUTS), default=DEFAULTS.output, show_default=True,
    help="Mask-decoder output to train, recorded in the fine-tune and the only one it is served "
    "with (clicks, fast, stock, tune): single = SAM 2's single-mask token; multimask-first = the "
    "first multimask token, as the thesis trained.",
)
@click.option(
    "--dice", type=click.Choice(DICE_MODES), default=DEFAULTS.dice, show_default=True,
    help="Dice loss per prompt (averaged over an image's prompts) or one Dice over all prompts "
    "of an image (the thesis's).",
)
@device_option(
    help="Torch device, e.g. cuda, cuda:1, cpu  [default: CUDA if available, else MPS, else CPU]",
)
@click.option(
    "--workers", type=click.IntRange(min=0), default=0, show_default=True,
    help="Data-loading worker processes.",
)
@click.option(
    "--cache/--no-cache", "cache", default=True, show_default=True,
    help="Encode each training image once and reuse its embeddings (the encoder is frozen); "
    "--no-cache re-encodes every image at every step.",
)
@click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Embedding cache folder, shareable between runs (entries are keyed by image and "
    "model)  [default: OUT/cache]",
)
@click.option(
    "--image-size", type=click.IntRange(min=32), default=None,
    help="Model input resolution (multiple of 32)  [default: the model's, 1024]; recorded in "
    "the fine-tune file. Smaller is faster for quick experiments.",
)
@click.option(
    "--seed", type=_range("seed"), default=DEFAULTS.seed, show_default=True,
    help="Random seed of the data order and of the prompts sampled per image.",
)
@click.option(
    "--resume", is_flag=True,
    help="Continue the run in OUT from its last completed epoch; options not repeated keep "
    "the run's values.",
)
@click.option(
    "--overwrite", is_flag=True,
    help="Start afresh in a non-empty OUT (its run files are removed; the cache is kept).",
)
@handle_errors
def command(
    dataset: Path,
    base: str,
    out: Path,
    epochs: int,
    batch_size: int,
    lr: float,
    min_lr: float | None,
    weight_decay: float,
    score_weight: float,
    max_prompts: int,
    val_every: int,
    output: str,
    dice: str,
    device: str | None,
    workers: int,
    cache: bool,
    cache_dir: Path | None,
    image_size: int | None,
    seed: int,
    resume: bool,
    overwrite: bool,
) -> None:
    """Fine-tune SAM 2 on DATASET (its manifest's train split; the val split picks the best epoch).

    The image encoder stays frozen; the prompt encoder and mask decoder learn to segment each
    tessera from its point (loss: Dice + λ·|predicted - actual IoU|, AdamW, cosine learning
    rate). After each epoch validation measures the prompted score (mean IoU of the mask decoded
    at each val tessera's point) and the Dice of prompt-free segmentation, as at inference. The
    kept epoch (OUT/finetune.pt, usable by `segment` and the backend) is the best by Dice when
    the Dice values differ by more than 0.005, else by the prompted score; ties go to the later
    epoch.
    """
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    from ..training.distributed import is_main_process  # imports torch: only now
    from ..training.outputs import recorded_config
    from ..training.trainer import train

    hyper = dict(
        epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
        score_weight=score_weight, max_prompts=max_prompts, seed=seed, image_size=image_size,
        val_every=val_every, val_params=None, output=output, dice=dice,
    )
    recorded = recorded_config(out) if resume else None
    if recorded:  # --resume: options not given again keep the run's recorded values
        ctx = click.get_current_context()
        for name in hyper:
            if name in recorded and (name == "val_params" or ctx.get_parameter_source(name) is ParameterSource.DEFAULT):
                hyper[name] = recorded[name]
    result = train(
        dataset, base, out, **hyper, device=device, resume=resume, overwrite=overwrite,
        num_workers=workers, cache_embeddings=cache, cache_dir=cache_dir,
    )
    if is_main_process():
        from ..training.selection import PROMPT_KEY

        prompted = (result.best_scores or {}).get(PROMPT_KEY)
        click.echo(
            f"best epoch {result.best_epoch}/{hyper['epochs']}: validation Dice "
            f"{result.best_dice:.4f}"
            + (f", prompted IoU {prompted:.4f}" if prompted is not None else "")
            + f" -> {result.finetune}"
        )


if __name__ == "__main__":  # torchrun -m mosaic_toolkit.cli.train ...
    command()
