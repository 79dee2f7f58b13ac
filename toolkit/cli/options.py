"""Options and helpers shared by the commands."""
from __future__ import annotations

import functools

import click

from ..core.errors import MosaicError
from ..sam.params import OUTPUTS


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and the noun, singular or plural: "1 mosaic", "2 mosaics", "0 tasks"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def overwrite_option(f):
    return click.option(
        "--overwrite",
        is_flag=True,
        help="Replace OUT if it exists (only once the new output is complete).",
    )(f)


def seed_option(default: int = 0):
    return click.option(
        "--seed", type=int, default=default, show_default=True,
        help="Random seed; the same seed gives byte-identical output.",
    )


def handle_errors(f):
    """Turn MosaicError into a one-line message on stderr and exit status 1."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except MosaicError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


# Options shared by several commands (as rasterio's rio/options.py): one definition each.
DEVICE_HELP = "Torch device (cpu, cuda, cuda:1, mps)  [default: CUDA, else MPS, else CPU]"
METHODS = ("guided", "fast", "stock")  # = mosaic_toolkit.sam.params.METHODS (kept here: no torch import)


def device_option(help: str = DEVICE_HELP):
    return click.option("--device", default=None, help=help)


def model_option(help: str, required: bool = False):
    return click.option("--model", default=None, required=required, help=help)


BASE_HELP = (
    "Base SAM 2 checkpoint (path or installed name) of a fine-tune file given as --model, when "
    "it is neither in the model cache nor at the path the fine-tune recorded; its sha256 must "
    "match the one recorded  [default: found from the fine-tune file]"
)


def base_option(help: str = BASE_HELP):
    return click.option("--base", default=None, help=help)


def check_base(base: str | None, model: str | None) -> None:
    """A usage error when --base is given without the fine-tune file (--model) it belongs to."""
    if base and not model:
        raise click.UsageError("--base applies to a fine-tune file given as --model")


def engine_option(choices, help: str):
    return click.option("--engine", type=click.Choice(choices), default="auto", show_default=True, help=help)


def method_option(help: str, show_default: str | None = None):
    return click.option("--method", type=click.Choice(METHODS), default=None,
                        show_default=show_default, help=help)


def tile_option(help: str):
    return click.option("--tile", type=click.IntRange(min=0), default=0, show_default=True, help=help)


def split_option(choices, help: str, default: str | None = None, show_default: str | bool | None = True):
    return click.option("--split", type=click.Choice(choices), default=default, show_default=show_default,
                        help=help)


OUTPUT_HELP = (
    "Mask-decoder output a SAM 2 checkpoint was fine-tuned on, served and no other: single "
    "(token 0), multimask-first (token 1, the thesis's checkpoints), sam2 (SAM 2's own choice, "
    "an untrained decoder)  [default: a fine-tune file's recorded output, else sam2]"
)


def output_option(help: str = OUTPUT_HELP):
    return click.option("--output", type=click.Choice(OUTPUTS), default=None, help=help)
