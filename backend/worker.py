"""Training runs, worker side: ``python -m mosaic_backend.worker RUN_DIR/job.json``.

Exports the Label Studio project, augments it, measures the current model, fine-tunes it and
stores the result as a new version (steps in ``jobs.py``'s docstring); ``jobs.TrainingManager``
starts this process and reads the ``status.json`` it writes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from mosaic_toolkit.core.io import atomic_output_dir, write_json
from mosaic_toolkit.core.errors import MosaicError

from .jobs import API_KEY_ENV, STATUS, now, read_json, should_promote, worker_main
from .versions import FINETUNE, METADATA, ModelStore

log = logging.getLogger(__name__)


def run_job(job_path: Path, api_key: str) -> int:
    """Export, augment, train and store one run (module docstring); 0 on success."""
    job = json.loads(job_path.read_text(encoding="utf-8"))
    run_dir = Path(job["run_dir"])
    status_path = run_dir / STATUS
    started = time.monotonic()

    def update(**fields: Any) -> None:
        write_json(status_path, {**read_json(status_path), **fields})
        if "stage" in fields:
            print(f"[{time.monotonic() - started:7.1f} s] {fields['stage']}", flush=True)

    try:
        update(stage="exporting", worker_pid=os.getpid())
        counts = export_project(job, api_key, run_dir, update)
        update(stage="augmenting", **counts)
        augment(job, run_dir, update)
        result = train_and_store(job, run_dir, update)
        # "done", not yet "succeeded": the server decides that once it has switched (or not)
        update(stage="done", seconds=round(time.monotonic() - started, 1), **result)
        return 0
    except MosaicError as exc:
        update(state="failed", stage="failed", error=str(exc))
        print(f"error: {exc}", flush=True)
    except Exception as exc:  # noqa: BLE001 (reported, not hidden: the traceback goes to the log)
        traceback.print_exc()
        update(state="failed", stage="failed", error=f"{type(exc).__name__}: {exc}")
    return 1


def export_project(job: dict[str, Any], api_key: str, run_dir: Path,
                   update: Callable[..., None]) -> dict[str, Any]:
    """Step 1: the project's annotations as a dataset in RUN_DIR/export."""
    from mosaic_toolkit.data.export import export_dataset, fetch_tasks, label_studio_resolver

    url, project = job["label_studio_url"], job["project"]
    tasks = fetch_tasks(url, api_key, project)
    with tempfile.TemporaryDirectory(prefix="mosaic-backend-images-") as cache:
        summary = export_dataset(tasks, label_studio_resolver(url, api_key, cache),
                                 run_dir / "export", project=project, partial=True)
    if not summary.samples:  # one mosaic is enough: augment splits it spatially
        raise MosaicError(
            f"project {project}: no annotated task with tesserae; training needs at least one"
            + (f" ({len(summary.skipped)} skipped: {summary.skipped[0].reason}, ...)" if summary.skipped else ""))
    return {"tasks": len(tasks), "annotated_tasks": len(summary.samples),
            "skipped_tasks": len(summary.skipped), "tesserae": summary.tesserae}


def augment(job: dict[str, Any], run_dir: Path, update: Callable[..., None]) -> None:
    """Step 2: crops, rotations and flips in RUN_DIR/augmented, split per mosaic (one mosaic:
    split spatially into bands, see ``mosaic_toolkit.data.augment``)."""
    from mosaic_toolkit.data.augment import augment_dataset

    opts = job["augment"]
    summary = augment_dataset(
        run_dir / "export", run_dir / "augmented", tesserae_per_crop=opts["tesserae_per_crop"],
        max_side=opts["max_side"], split=tuple(opts["split"]), seed=opts["seed"])
    update(train_images=summary.per_split.get("train", 0), val_images=summary.per_split.get("val", 0))


def train_and_store(job: dict[str, Any], run_dir: Path, update: Callable[..., None]) -> dict[str, Any]:
    """Steps 3 and 4: baseline Dice, fine-tuning, the new version and the verdict."""
    import torch

    from mosaic_toolkit.training.trainer import TrainConfig, Trainer
    from mosaic_toolkit.sam.models import ModelSpec, model_version, resolve_model

    base = job["base"]
    spec = ModelSpec.from_json(base)
    update(stage="loading")
    torch.manual_seed(job["train"]["seed"])
    trainer = Trainer(run_dir / "augmented", spec, run_dir / "train", TrainConfig(**job["train"]),
                      device=job["device"], progress=False)
    update(stage="baseline")
    baseline = trainer.validate()  # the current model on the same validation images
    update(stage="training", baseline_dice=baseline["val_dice"],
           baseline_prompt_iou=baseline["val_prompt_iou"])
    result = trainer.run()
    if result.finetune is None:
        raise MosaicError(f"run {job['run']}: no epoch was validated, nothing to keep")
    best = result.best_scores or {"val_dice": result.best_dice}
    update(stage="saving", val_dice=result.best_dice, val_prompt_iou=best.get("val_prompt_iou"),
           best_epoch=result.best_epoch)
    version = model_version(resolve_model(result.finetune, base=spec.base_checkpoint))
    promote, reason = should_promote(job["promote"], best, baseline)
    store_version(Path(job["models_dir"]), version, result.finetune, {
        "version": version, "created": now(), "run": job["run"], "project": job["project"],
        "parent": job["base_version"], "val_dice": result.best_dice, "baseline_dice": baseline["val_dice"],
        "val_prompt_iou": best.get("val_prompt_iou"), "baseline_prompt_iou": baseline["val_prompt_iou"],
        "best_epoch": result.best_epoch, "epochs": len(result.history)})
    return {"version": version, "val_dice": result.best_dice, "baseline_dice": baseline["val_dice"],
            "val_prompt_iou": best.get("val_prompt_iou"), "baseline_prompt_iou": baseline["val_prompt_iou"],
            "promote": promote, "reason": reason}


def store_version(models_dir: Path, version: str, finetune: Path, metadata: dict[str, Any]) -> None:
    """Write versions/<version>/ (fine-tune file + metadata) atomically. The name holds the
    file's hash, so an existing folder of that name already holds the same weights."""
    target = ModelStore(models_dir).versions_dir / version
    if (target / FINETUNE).is_file():
        return
    with atomic_output_dir(target, overwrite=True) as tmp:
        shutil.copyfile(finetune, tmp / FINETUNE)
        write_json(tmp / METADATA, metadata)


def main(argv: list[str] | None = None) -> int:
    """``python -m mosaic_backend.worker JOB.json`` (the API key comes in the environment)."""
    return worker_main(argv, "python -m mosaic_backend.worker RUN_DIR/job.json", run_job, API_KEY_ENV)


if __name__ == "__main__":
    sys.exit(main())
