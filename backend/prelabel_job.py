"""Batch pre-annotation of a whole project, run by the backend in a worker process.

Label Studio asks for pre-labels inside a request it abandons after 100 s. ``POST /prelabel
{"project": ID}`` (optionally ``"tasks": [...]``) instead starts a job: a child process
(``python -m mosaic_backend.prelabel_job JOB_DIR/job.json``) that runs
``mosaic_toolkit.data.prelabel.prelabel_project`` (the same job as ``mosaic-toolkit prelabel``)
with the model version being served when the job starts: every task of the project without
a prediction of that version gets one, stored through label-studio-sdk. ``GET /jobs`` shows
the progress (tasks done, skipped, failed, of how many).

One pre-label job runs at a time (``prelabel.lock`` in the models folder, an exclusive
``flock``, so also across server processes); it runs next to a training run, which has its own
lock. A job folder ``jobs/<job id>/`` holds ``job.json`` (no secrets: the API key reaches the
worker in its environment), ``status.json`` (rewritten atomically) and ``worker.log``.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from mosaic_toolkit.classical import ClassicalEngine
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.core.io import write_json

from .errors import BackendError
from .jobs import JOB, LOG, STATUS, WorkerJobs, now, read_json, tail, worker_main
from .versions import engine_version, job_base_spec

log = logging.getLogger(__name__)

LOCK = "prelabel.lock"
JOBS_DIR = "jobs"
API_KEY_ENV = "MOSAIC_BACKEND_PRELABEL_API_KEY"
MAX_LISTED = 20  # GET /jobs lists this many most recent jobs


class PrelabelJobs(WorkerJobs):
    """Starts, watches and lists pre-label jobs (module docstring). Closing it stops a running
    worker: the predictions stored so far stay, and a new job does only what is missing."""

    lock_name = LOCK
    module = "mosaic_backend.prelabel_job"
    api_key_env = API_KEY_ENV

    @property
    def root(self) -> Path:
        return self.store.root / JOBS_DIR

    def start(self, body: Any) -> dict[str, Any]:
        """``{"project": ID, "tasks": [ids] (optional)}`` -> the job started, or the one running."""
        if not isinstance(body, dict):
            raise BackendError('prelabel: expected {"project": <id>} (and optionally "tasks": [ids])')
        project, tasks = body.get("project"), body.get("tasks")
        if isinstance(project, bool) or not isinstance(project, int) or project < 1:
            raise BackendError(f"prelabel: 'project' must be a project id, got {project!r}")
        if tasks is not None and (not isinstance(tasks, list) or not tasks or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in tasks)):
            raise BackendError("prelabel: 'tasks' must be a non-empty list of task ids")
        url, key = self.link.require("pre-labelling a project")
        latest = self._latest()
        if self._process is not None and latest is not None and read_json(latest / STATUS).get("state") != "running":
            self.wait(30)  # our worker has written its result and is exiting: let it finish
        with self._lock:
            lock = self._try_lock()
            if lock is None:
                running = self._latest()
                return {"status": "already running", "job": running.name if running else None}
            try:
                job_dir = self._new_job_dir(self.root)
                job = self._job(job_dir, project, tasks, url)
                write_json(job_dir / JOB, job)
                write_json(job_dir / STATUS, {
                    "job": job_dir.name, "kind": "prelabel", "state": "running", "project": project,
                    "model_version": job["model_version"], "started": now(), "finished_tasks": 0,
                    "total_tasks": None, "done": 0, "skipped": 0, "failed": 0})
                process = self._spawn(job_dir, key)
            except BaseException:
                lock.close()
                raise
            self._start_watching(process, job_dir, lock, f"prelabel {job_dir.name}")
        log.info("pre-label job %s started for project %s with %s, worker pid %s", job_dir.name,
                 project, job["model_version"], process.pid)
        self.metrics.event("prelabel", "started")
        return {"status": "started", "job": job_dir.name, "model_version": job["model_version"]}

    def _job(self, job_dir: Path, project: int, tasks: list[int] | None, url: str) -> dict[str, Any]:
        engine = self.engines.active
        job: dict[str, Any] = {
            "job": job_dir.name, "job_dir": str(job_dir), "project": project, "tasks": tasks,
            "label_studio_url": url, "model_version": engine_version(engine),
            "polygon_iou": self.settings.polygon_iou, "device": self.settings.device,
            "engine": "classical" if isinstance(engine, ClassicalEngine) else "sam2"}
        if job["engine"] == "sam2":
            job["spec"] = job_base_spec(engine)
            job["params"] = engine.params.to_dict()
            job["cache_bytes"] = self.settings.embedding_cache_mb * 2**20
        return job

    def _watch(self, process: subprocess.Popen, job_dir: Path) -> None:
        try:
            code = process.wait()
            status = read_json(job_dir / STATUS)
            if code != 0 and status.get("state") == "running":
                status.update(state="failed",
                              error=f"the worker exited with status {code}:\n{tail(job_dir / LOG)}")
            status.setdefault("finished", now())
            write_json(job_dir / STATUS, status)
            self.metrics.event("prelabel", status.get("state", "failed"))
        except Exception:  # noqa: BLE001 (a watcher must never die silently)
            log.exception("pre-label job %s: finishing failed", job_dir.name)

    def _latest(self) -> Path | None:
        found = self._all()
        return found[0] if found else None

    def _all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if (p / STATUS).is_file()]
        return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)

    def jobs(self) -> list[dict[str, Any]]:
        """The most recent jobs, newest first; a job whose server stopped is "interrupted"."""
        out = []
        held = None
        for job_dir in self._all()[:MAX_LISTED]:
            status = read_json(job_dir / STATUS)
            if status.get("state") == "running" and self._process is None:
                if held is None:
                    lock = self._try_lock()
                    held = lock is None
                    if lock is not None:
                        lock.close()
                if not held:
                    status["state"] = "interrupted"
            out.append(status)
        return out


# --------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------
def _engine(job: dict[str, Any]):
    if job["engine"] == "classical":
        return ClassicalEngine()
    from mosaic_toolkit.sam.engine import Sam2Engine
    from mosaic_toolkit.sam.models import ModelSpec

    # the guided method's second round reads its tiles' features again from the embedding cache
    return Sam2Engine.from_spec(ModelSpec.from_json(job["spec"]), device=job["device"],
                                cache_bytes=job["cache_bytes"], overrides=job["params"],
                                version=job["model_version"])


def run_job(job_path: Path, api_key: str) -> int:
    """Pre-label the job's project; 0 when every task went through (done or skipped)."""
    from mosaic_toolkit.data.prelabel import prelabel_project

    job = json.loads(job_path.read_text(encoding="utf-8"))
    status_path = Path(job["job_dir"]) / STATUS

    def update(**fields: Any) -> None:
        write_json(status_path, {**read_json(status_path), **fields})

    def progress(summary, finished: int, total: int) -> None:
        update(finished_tasks=finished, total_tasks=total, done=len(summary.done),
               skipped=len(summary.skipped), failed=len(summary.failed), regions=summary.regions)
        print(f"{finished}/{total} tasks ({len(summary.done)} done, {len(summary.failed)} failed)", flush=True)

    try:
        update(worker_pid=os.getpid(), stage="loading")
        engine = _engine(job)
        update(stage="pre-labelling")
        summary = prelabel_project(job["label_studio_url"], api_key, job["project"], engine,
                                   model_version=job["model_version"], tasks=job["tasks"],
                                   iou=job["polygon_iou"], progress=False, on_task=progress)
        result = summary.to_json()
        update(state="succeeded" if not summary.failed else "failed", stage="done", finished=now(),
               done=result["done"], skipped=result["skipped"], failed=result["failed"],
               regions=result["regions"], seconds=result["seconds"], failures=result["failures"],
               **({"error": f"{len(summary.failed)} task(s) failed"} if summary.failed else {}))
        print("\n".join(summary.lines()), flush=True)
        return 0 if not summary.failed else 1
    except MosaicError as exc:
        update(state="failed", stage="failed", error=str(exc), finished=now())
        print(f"error: {exc}", flush=True)
    except Exception as exc:  # noqa: BLE001 (reported; the traceback goes to the log)
        traceback.print_exc()
        update(state="failed", stage="failed", error=f"{type(exc).__name__}: {exc}", finished=now())
    return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m mosaic_backend.prelabel_job JOB.json`` (the API key comes in the environment)."""
    return worker_main(argv, "python -m mosaic_backend.prelabel_job JOB_DIR/job.json", run_job,
                       API_KEY_ENV)


if __name__ == "__main__":
    sys.exit(main())
