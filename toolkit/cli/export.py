"""`mosaic-toolkit export`: turn Label Studio annotations into a ground-truth dataset."""
from __future__ import annotations

from pathlib import Path

import click

from ..data.export import export
from .options import handle_errors, overwrite_option


@click.command("export")
@click.argument(
    "export_json", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
    help="Folder holding the task images, found by file name (with or without Label Studio's "
    "upload prefix). Required with EXPORT_JSON.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Dataset folder to create (images/, masks/, instances/, points/, manifest.json).",
)
@click.option(
    "--url", envvar="LABEL_STUDIO_URL", show_envvar=True, default=None,
    help="Pull the export and the images from this running Label Studio instead of EXPORT_JSON.",
)
@click.option(
    "--api-key", envvar="LABEL_STUDIO_API_KEY", show_envvar=True, default=None,
    help="Label Studio API key (legacy token or personal access token), used with --url.",
)
@click.option("--project", type=int, default=None, help="Label Studio project id, used with --url.")
@click.option(
    "--label", "labels", multiple=True,
    help="Only brush/polygon regions with this label are tesserae (repeatable).  "
    "[default: every brush and polygon region]",
)
@click.option(
    "--coco", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Also write the tesserae as a COCO instances file (RLE segmentations).",
)
@click.option(
    "--partial", is_flag=True,
    help="Export a tiled mosaic (crop tasks from `mosaic-toolkit tasks`) even when some of its "
    "crops are not annotated: the area nobody annotated is written as unknown/<stem>.png and "
    "kept out of training and metrics. Without it such a mosaic is skipped and reported.",
)
@overwrite_option
@handle_errors
def command(
    export_json: Path | None,
    images: Path | None,
    out: Path,
    url: str | None,
    api_key: str | None,
    project: int | None,
    labels: tuple[str, ...],
    coco: Path | None,
    partial: bool,
    overwrite: bool,
) -> None:
    """Turn Label Studio annotations into a ground-truth dataset OUT.

    Reads a Label Studio JSON export EXPORT_JSON with its images in --images, or pulls both
    from a running Label Studio (--url, --api-key, --project).

    Per task the annotation that counts is never a cancelled one; a ground-truth annotation
    comes first, otherwise the most recently updated. Brush and polygon regions are tesserae
    (each 4-connected piece is one tessera; where regions overlap, the earlier region keeps the
    pixels); keypoints and rectangles are SAM prompts and are ignored. Tasks without a usable
    annotation are skipped and listed in the summary.

    Crop tasks of a large mosaic (made by `mosaic-toolkit tasks`) are put back together: one
    sample per mosaic, each tessera once, also where a crop border cut it.
    """
    if url is None and export_json is None:
        raise click.UsageError("give EXPORT_JSON (with --images) or --url, --api-key, --project")
    # LABEL_STUDIO_URL in the environment must not clash with an export file given explicitly.
    source = click.get_current_context().get_parameter_source("url")
    if export_json is not None and source is click.core.ParameterSource.ENVIRONMENT:
        url = None
    summary = export(
        out,
        export_json=export_json,
        images=images,
        url=url,
        api_key=api_key,
        project=project,
        labels=labels or None,
        coco=coco,
        overwrite=overwrite,
        partial=partial,
    )
    click.echo("\n".join(summary.lines()))
    click.echo(f"Dataset written to {out}" + (f", COCO file {coco}" if coco else ""), err=True)
