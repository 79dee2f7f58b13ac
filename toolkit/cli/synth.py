"""`mosaic-toolkit synth`: synthetic mosaics with exact ground truth, in the dataset layout."""
from __future__ import annotations

from pathlib import Path

import click

from ..data.synth import IMAGE_FORMATS, STYLES, synth_dataset
from .options import handle_errors, overwrite_option, seed_option


@click.command("synth")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the dataset (must not exist or be empty, see --overwrite).",
)
@click.option(
    "--n", "n", type=click.IntRange(min=1), default=8, show_default=True,
    help="Number of mosaics to generate.",
)
@seed_option()
@click.option(
    "--min-size", type=click.IntRange(min=32), default=300, show_default=True,
    help="Smallest longest side in pixels (drawn uniformly between --min-size and --max-size).",
)
@click.option(
    "--max-size", type=click.IntRange(min=32), default=1200, show_default=True,
    help="Largest longest side in pixels.",
)
@click.option(
    "--style", type=click.Choice(["mixed", *STYLES]), default="mixed", show_default=True,
    help="Row-laid tiles (opus), Voronoi-like irregular tiles, or a random mix.",
)
@click.option(
    "--tessera-size", type=click.FloatRange(min=4), default=None,
    help="Force the tessera pitch in pixels, grout included "
    "[default: about 1.8*sqrt(longest side), varied per image].",
)
@click.option(
    "--realism", type=click.FloatRange(0, 1), default=None,
    help="Strength of the photographic effects (texture, bevels, highlights, glass, uneven and "
    "recessed grout, mixed sizes, perspective, vignetting, camera noise), 0 = clean tiles "
    "[default: drawn per mosaic, 0.5-1 for most].",
)
@click.option(
    "--weathering", type=click.FloatRange(0, 1), default=0.0, show_default=True,
    help="A weathered stone floor, like ancient floors photographed today: tight one-pixel "
    "grout close to the stone's colour, worn and stained stone, cracks, pits and gaps filled "
    "with mortar; 0 = none. With a small --tessera-size (5-12) it imitates detail and "
    "whole-panel photographs of Roman floors.",
)
@click.option(
    "--format", "image_format", type=click.Choice(IMAGE_FORMATS), default="png",
    show_default=True,
    help="Image file format (jpg is ~10x smaller; the JPEG noise is simulated in both).",
)
@overwrite_option
@handle_errors
def command(
    out: Path,
    n: int,
    seed: int,
    min_size: int,
    max_size: int,
    style: str,
    tessera_size: float | None,
    realism: float | None,
    weathering: float,
    image_format: str,
    overwrite: bool,
) -> None:
    """Generate N synthetic mosaics with exact masks, instance maps and prompt points.

    Tesserae are row-laid (opus) or irregular, with grout of varying width and colour
    (sometimes close to a tile colour), missing and chipped tiles, a lighting gradient, blur,
    noise and JPEG artefacts; only the image is degraded, the ground truth stays exact.
    The same --seed gives byte-identical files.
    """
    samples = synth_dataset(
        out,
        n,
        seed=seed,
        min_size=min_size,
        max_size=max_size,
        style=None if style == "mixed" else style,
        tessera_size=tessera_size,
        realism=realism,
        weathering=weathering,
        image_format=image_format,
        overwrite=overwrite,
    )
    total = sum(s.tesserae for s in samples)
    click.echo(f"{len(samples)} synthetic mosaics, {total} tesserae -> {out}")
