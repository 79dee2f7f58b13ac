"""`mosaic-toolkit tasks`: cut large mosaics into Label Studio tasks of a few hundred tesserae."""
from __future__ import annotations

from pathlib import Path

import click

from .options import base_option, check_base, count, handle_errors, overwrite_option


@click.command("tasks")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Folder to create: OUT/images/<mosaic>_r<row>c<col>.png crops and OUT/tasks.json, the "
    "Label Studio import file.",
)
@click.option(
    "--max-tesserae", type=click.IntRange(min=1), default=300, show_default=True,
    help="About this many tesserae per crop at most (from the tessera size estimate). Label "
    "Studio's editor opens a 300-tessera task in 2-5 s; a 2,000-tessera one in 20-35 s, with "
    "about 2 GiB of browser memory.",
)
@click.option(
    "--tessera-size", type=click.FloatRange(min=0, min_open=True), default=None,
    help="Typical tessera diameter in pixels [default: estimated per mosaic].",
)
@click.option(
    "--document-root", envvar="LOCAL_FILES_DOCUMENT_ROOT", show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Label Studio's local-files document root (OUT must lie inside it): tasks name their "
    "crops as /data/local-files/?d=... URLs.",
)
@click.option(
    "--url-prefix", default=None,
    help="Instead of local files: tasks name their crops as this prefix + images/<file> "
    "(e.g. https://host/mosaics/ or s3://bucket/crops/, where you copy OUT).",
)
@click.option(
    "--prelabel", is_flag=True,
    help="Segment each mosaic and give every task its pre-labels (light polygons) as a "
    "prediction with the engine's model version.",
)
@click.option(
    "--engine", type=click.Choice(["auto", "sam2", "classical"]), default="auto", show_default=True,
    help="Engine for --prelabel: sam2, classical, or auto (SAM 2 when a model is given or "
    "installed, else classical).",
)
@click.option("--model", default=None, help="SAM 2 model for --prelabel (name, checkpoint or fine-tune).")
@base_option()
@click.option("--device", default=None, help="Torch device for SAM 2 (cpu, cuda, mps).")
@click.option(
    "--polygon-iou", type=click.FloatRange(min=0, max=1, min_open=True), default=0.97, show_default=True,
    help="Fineness of pre-label polygons: the fewest vertices keeping at least this IoU with "
    "each tessera's pixels (1 = exact pixel outlines, heavy in the editor).",
)
@overwrite_option
@handle_errors
def command(images: tuple[Path, ...], out: Path, max_tesserae: int, tessera_size: float | None,
            document_root: Path | None, url_prefix: str | None, prelabel: bool, engine: str,
            model: str | None, base: str | None, device: str | None, polygon_iou: float, overwrite: bool) -> None:
    """Cut the mosaics IMAGES (files or folders) into overlapping crops of at most about
    --max-tesserae tesserae, as Label Studio tasks.

    Import OUT/tasks.json into a project (Data Manager -> Import, or the API). Annotate every
    tessera you see in each crop, also those cut by its border; `mosaic-toolkit export` puts the
    crops back together into one sample per mosaic, each tessera once.
    """
    from ..data.tasks import make_tasks
    from ..engines import describe_engine, engine_info, open_engine
    from ..segment import collect_images

    if (engine != "auto" or model or base or device) and not prelabel:
        raise click.UsageError("--engine, --model, --base and --device apply with --prelabel")
    check_base(base, model)
    if url_prefix is not None and click.get_current_context().get_parameter_source(
            "document_root") is click.core.ParameterSource.ENVIRONMENT:
        document_root = None
    paths = collect_images(images)
    chosen = version = None
    if prelabel:
        chosen = open_engine(engine, model, device, base=base)
        version = engine_info(chosen)["model_version"]
        click.echo(describe_engine(chosen), err=True)
    tasks = make_tasks(paths, out, max_tesserae=max_tesserae, tessera_size=tessera_size,
                       engine=chosen, model_version=version, iou=polygon_iou,
                       document_root=document_root, url_prefix=url_prefix, overwrite=overwrite)
    regions = sum(len(p["result"]) for t in tasks for p in t.get("predictions", []))
    click.echo(f"{count(len(paths), 'mosaic')} -> {count(len(tasks), 'task')}"
               + (f", {regions} pre-labelled regions ({version})" if prelabel else "")
               + f"; import {out / 'tasks.json'}")
