"""`mosaic-toolkit segment`: segment every tessera of images into an eval-ready folder."""
from __future__ import annotations

from pathlib import Path

import click

from ..engines import ENGINES, FETCH_COMMAND, describe_engine, open_engine
from ..segment import segment_paths
from .options import (
    device_option,
    engine_option,
    handle_errors,
    method_option,
    base_option,
    check_base,
    model_option,
    output_option,
    overwrite_option,
    tile_option,
)

MIN_TILE_OPTION = 64  # smaller tiles hold too little context to segment anything


@click.command("segment")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Folder to create: OUT/<stem>.png masks, OUT/instances/, OUT/overlays/, segment.json.",
)
@engine_option(
    ENGINES,
    help="sam2, classical, or auto: SAM 2 when --model is given or a SAM 2 model is installed, "
    "else the classical engine.",
)
@model_option(
    help="SAM 2 model: an installed name (see `weights list`), a checkpoint or a fine-tune file "
    "[default: the best installed model].",
)
@base_option()
@output_option()
@device_option(
    help="Torch device for SAM 2 (cpu, cuda, cuda:1, mps) [default: CUDA, else MPS, else CPU].",
)
@method_option(
    help="SAM 2 whole-image method: guided lets SAM 2 outline each tessera the classical engine "
    "proposes (one prompt per tessera; the right choice for a base model), fast prompts at likely "
    "tessera centres without proposals, stock is SAM 2's automatic mask generator "
    "[default: the model's tuned setting, else guided].",
)
@tile_option(
    help="Tile side in pixels for large images; 0 = automatic (about 100 tesserae per tile for "
    "SAM 2, 1024 for the classical engine).",
)
@click.option(
    "--tessera-size", type=click.FloatRange(min=0, min_open=True), default=None,
    help="Typical tessera diameter in pixels (median equivalent diameter), for every image "
    "[default: estimated per image from the period of the grout network]. Sets the tile size "
    "(about 100 tesserae for SAM 2) and the classical engine's scale; recorded in segment.json.",
)
@overwrite_option
@handle_errors
def command(
    images: tuple[Path, ...],
    out: Path,
    engine: str,
    model: str | None,
    base: str | None,
    output: str | None,
    device: str | None,
    method: str | None,
    tile: int,
    tessera_size: float | None,
    overwrite: bool,
) -> None:
    """Segment every tessera of IMAGES (image files, folders of images, or dataset folders).

    Writes OUT/<stem>.png (tesserae black on white), OUT/instances/<stem>.png (16-bit ids) and
    OUT/overlays/<stem>.jpg (outlines over the image); OUT can be scored directly with
    `mosaic-toolkit eval --pred OUT --gt DATASET`. Large images are segmented in overlapping
    tiles at native resolution.

    The tessera size is estimated per image, with a confidence (segment.json: "scale"); an
    uncertain estimate prints a warning. An image whose tesserae measure under ~6 px is too
    coarse to segment tesserae one by one: it gets a warning (what resolution would do) and an
    empty mask instead of figure-sized regions, and the other images are segmented as usual
    (exit status 0; segment.json records the warning).
    """
    if 0 < tile < MIN_TILE_OPTION:
        raise click.BadParameter(f"use 0 (automatic) or at least {MIN_TILE_OPTION}", param_hint="--tile")
    check_base(base, model)
    chosen = open_engine(engine, model, device, {"method": method} if method else None, output=output,
                         base=base)
    click.echo(describe_engine(chosen), err=True)
    if chosen.name == "classical" and engine == "auto":
        click.echo(f"No SAM 2 weights are installed (to use SAM 2: `{FETCH_COMMAND}`).", err=True)
    if chosen.name == "classical" and (device or method):
        click.echo("Note: --device and --method apply to SAM 2 only; ignored.", err=True)
    records = segment_paths(images, out, chosen, overwrite=overwrite, tile=tile or None,
                            tessera_size=tessera_size)
    for r in records:
        scale = r.get("scale")
        if scale is not None:
            click.echo(f"{r['stem']}: tessera size {r['tessera_size_px']:g} px (confidence "
                       f"{scale['confidence']:.2f}, {scale['method']}), {r['tesserae']} tesserae",
                       err=True)
        if r.get("warning"):
            click.echo(f"Warning: {r['image']}: {r['warning']}", err=True)
    total = sum(r["tesserae"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    coarse = sum(1 for r in records if r.get("scale", {}).get("coarse"))
    skipped = f" ({coarse} too coarse: no regions, see the warnings)" if coarse else ""
    click.echo(f"{len(records)} images, {total} tesserae in {seconds:.1f} s -> {out}{skipped}")
