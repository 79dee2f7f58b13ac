"""`mosaic-toolkit stats`: tessera statistics and a self-contained HTML report per mosaic."""
from __future__ import annotations

from pathlib import Path

import click

from ..stats.report import stats_report
from .options import handle_errors, overwrite_option

_FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command("stats")
@click.argument("inputs", nargs=-1, required=True, type=_FOLDER)
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Report folder to create: index.html and one folder per mosaic (report.html, "
    "tesserae.csv, summary.json, plots).",
)
@click.option(
    "--pixel-size", type=click.FloatRange(min=0, min_open=True), default=None,
    show_default="none: pixels",
    help="Millimetres per pixel: lengths in mm, areas in mm², density per cm².",
)
@click.option(
    "--images", type=_FOLDER, default=None,
    help="Where to find the images by stem (a folder of images or a dataset) when an input "
    "holds none, e.g. a `segment` output. Without images, colour columns stay empty.",
)
@click.option(
    "--compare", is_flag=True,
    help="Also write compare.html: every INPUT is a group (one INPUT: every mosaic), summaries "
    "side by side and overlaid histograms.",
)
@overwrite_option
@handle_errors
def command(
    inputs: tuple[Path, ...],
    out: Path,
    pixel_size: float | None,
    images: Path | None,
    compare: bool,
    overwrite: bool,
) -> None:
    """Measure every tessera of the mosaics in INPUTS and write a report to OUT.

    INPUTS are dataset folders (ground truth) or `segment` output folders (instances/<stem>.png).
    Per tessera: area, perimeter, equivalent diameter, orientation, elongation, solidity,
    neighbours, mean Lab colour. Per mosaic: count, density, medians and IQRs, grout fraction
    and width, dominant orientation and its coherence. Every header states its unit.
    """
    result = stats_report(inputs, out, pixel_size=pixel_size, images=images, compare=compare,
                          overwrite=overwrite)
    for rel, summary in result["mosaics"].items():
        orientation = summary["orientation"]
        click.echo(
            f"{rel}: {summary['tesserae']} tesserae, grout fraction {summary['grout_fraction']}, "
            f"local orientation coherence {orientation['coherence_local']}"
        )
    click.echo(f"Report written to {out / 'index.html'}", err=True)
