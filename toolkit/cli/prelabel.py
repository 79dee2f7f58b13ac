"""`mosaic-toolkit prelabel`: pre-annotate every task of a Label Studio project (resumable)."""
from __future__ import annotations

import click

from .options import base_option, check_base, handle_errors


def _task_ids(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        ids = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected task ids like 1,2,3, got {value!r}") from None
    if not ids:
        raise click.BadParameter("give at least one task id")
    return ids


@click.command("prelabel")
@click.option(
    "--url", envvar="LABEL_STUDIO_URL", show_envvar=True, required=True,
    help="Label Studio's address, e.g. http://localhost:8080.",
)
@click.option(
    "--api-key", envvar="LABEL_STUDIO_API_KEY", show_envvar=True, required=True,
    help="Label Studio API key (legacy token or personal access token).",
)
@click.option("--project", type=int, required=True, help="Label Studio project id.")
@click.option(
    "--engine", type=click.Choice(["auto", "sam2", "classical"]), default="auto", show_default=True,
    help="sam2, classical, or auto: SAM 2 when --model is given or a SAM 2 model is installed, "
    "else the classical engine.",
)
@click.option("--model", default=None, help="SAM 2 model: an installed name, a checkpoint or a fine-tune file.")
@base_option()
@click.option("--device", default=None, help="Torch device for SAM 2 (cpu, cuda, cuda:1, mps).")
@click.option(
    "--tasks", "task_ids", callback=_task_ids, default=None, metavar="1,2,...",
    help="Only these task ids [default: every task of the project].",
)
@click.option(
    "--polygon-iou", type=click.FloatRange(min=0, max=1, min_open=True), default=0.97, show_default=True,
    help="Fineness of the polygons: the fewest vertices keeping at least this IoU with each "
    "tessera's pixels.",
)
@handle_errors
def command(url: str, api_key: str, project: int, engine: str, model: str | None, base: str | None,
            device: str | None, task_ids: list[int] | None, polygon_iou: float) -> None:
    """Pre-label every task of a Label Studio project that has no prediction from this model
    version yet, one prediction per task (light polygons, or brush masks when the labeling
    config has no PolygonLabels).

    Runs outside Label Studio's 100 s predict timeout, with a progress bar. Stop it any time
    (Ctrl-C): what is stored stays, and the next run does only what is missing. Tasks deleted
    meanwhile are skipped; a task that fails is reported and the others go on.
    """
    from ..data.prelabel import prelabel_project
    from ..engines import describe_engine, engine_info, open_engine

    check_base(base, model)
    chosen = open_engine(engine, model, device, base=base)
    version = engine_info(chosen)["model_version"]
    click.echo(describe_engine(chosen), err=True)
    summary = prelabel_project(url.rstrip("/"), api_key, project, chosen, model_version=version,
                               tasks=task_ids, iou=polygon_iou)
    click.echo("\n".join(summary.lines()))
    if summary.failed:
        raise SystemExit(1)
