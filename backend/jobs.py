"""Training runs, server side: started by Label Studio, run in a separate worker process.

``TrainingManager`` (in the server) starts one run at a time, on ``START_TRAINING`` or every
``MOSAIC_BACKEND_TRAIN_EVERY`` new annotations. The run is a child process
(``python -m mosaic_backend.worker RUN_DIR/job.json``, ``worker.py``), so the server keeps answering clicks
and pre-labels with the current model while it trains. The worker:

1. pulls the project's tasks and annotations through label-studio-sdk and exports them as a
   dataset (``mosaic_toolkit.data.export``; images are downloaded from Label Studio);
2. augments it (crops, rotations, flips; ``mosaic_toolkit.data.augment``), split per mosaic into
   train and val (one annotated mosaic is enough: it is split into train and val bands);
3. measures the current model's validation Dice, then fine-tunes it
   (``mosaic_toolkit.training.trainer.Trainer``, the small settings ``MOSAIC_BACKEND_TRAIN_*``), which
   keeps the epoch with the best validation Dice on the same images with the same parameters;
4. stores the result as a new version (``versions/<version>/``, kept whether or not it is
   switched to) and says whether it beats the current model (``MOSAIC_BACKEND_TRAIN_PROMOTE``).

When the worker ends, the server loads a winning version and switches to it
(``EngineManager.switch``); a failed run (an error in any step, a crash, a version that cannot
be loaded) is logged and reported by ``GET /train/status``, and the old model keeps serving.

A run folder ``runs/<run id>/`` holds ``job.json`` (the run's settings, no secrets),
``status.json`` (stage and result, rewritten atomically), ``worker.log`` and the training run's
``train/metrics.csv`` and ``train/training.png``. The exported and augmented datasets and the
embedding cache are deleted when the run ends. ``train.lock`` in the models folder (an
exclusive ``flock``) makes runs exclusive across all server processes sharing the folder.
"""
from __future__ import annotations

import csv
import fcntl
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from mosaic_toolkit.core.io import write_json
from mosaic_toolkit.training.selection import DICE_KEY, PROMOTE_MARGIN, compare, describe

from .config import Settings
from .errors import BackendError
from .images import LabelStudioLink
from .metrics import Metrics
from .versions import EngineManager, ModelStore, job_base_spec

log = logging.getLogger(__name__)

JOB = "job.json"
STATUS = "status.json"
LOG = "worker.log"
LOCK = "train.lock"
API_KEY_ENV = "MOSAIC_BACKEND_JOB_API_KEY"  # the key reaches the worker by environment, not disk
SPLIT = (0.8, 0.2, 0.0)  # train / val / test fractions of the annotated mosaics
BULKY = ("export", "augmented", "train/cache", "train/last.pt", "train/tb")
ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
_job_numbers = itertools.count(1)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def epochs_done(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of the run's metrics.csv (one per completed epoch)."""
    try:
        with open(run_dir / "train" / "metrics.csv", newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


def should_promote(policy: str, val: Any, baseline: Any) -> tuple[bool, str]:
    """Whether a finished run's model replaces the current one, and why (for the status).

    ``val`` and ``baseline`` are validation scores (``{"val_dice", "val_prompt_iou"}``, or a
    bare Dice); ``better`` promotes when the run is better by the trainer's own rule
    (toolkit/training/selection.py: Dice when it discriminates, else the prompted IoU, which
    must then be higher by more than PROMOTE_MARGIN).
    """
    def scores(v: Any) -> dict[str, Any] | None:
        return None if v is None else dict(v) if isinstance(v, Mapping) else {DICE_KEY: float(v)}

    val, baseline = scores(val), scores(baseline)
    if val is None or val.get(DICE_KEY) is None:
        return False, "no validation Dice"
    if policy == "always":
        return True, "MOSAIC_BACKEND_TRAIN_PROMOTE=always"
    if compare(val, baseline, PROMOTE_MARGIN) > 0:
        return True, f"validation {describe(val)} beats the current model's {describe(baseline)}"
    return False, f"validation {describe(val)} does not beat the current model's {describe(baseline)}"



def try_lock(path: Path):
    """The exclusive lock file ``path`` as an open file, or None when another process holds it
    (training runs and pre-label jobs each have one: one of each at a time, across processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle

class WorkerJobs:
    """What training runs and pre-label jobs share: one job at a time (a lock file under the
    models folder, held until the job is handled), run as ``python -m MODULE JOB_DIR/job.json`` in
    a worker process that gets the Label Studio API key by environment and logs to
    ``JOB_DIR/worker.log``, and a thread per job that waits for the worker (``_watch``)."""

    lock_name: str  # the lock file, under the models folder
    module: str  # the worker's module
    api_key_env: str  # the environment variable that carries the API key to the worker

    def __init__(self, settings: Settings, store: ModelStore, engines: EngineManager,
                 link: LabelStudioLink, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.engines = engines
        self.link = link
        self.metrics = metrics
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._watcher: threading.Thread | None = None

    def _try_lock(self):
        return try_lock(self.store.root / self.lock_name)

    @staticmethod
    def _new_job_dir(root: Path) -> Path:
        """A new folder under ``root``, named by time, process and a counter (sorts by start)."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        job_dir = root / f"{stamp}-{os.getpid()}-{next(_job_numbers)}"
        job_dir.mkdir(parents=True)
        return job_dir

    def _spawn(self, job_dir: Path, api_key: str) -> subprocess.Popen:
        """Start the worker on ``job_dir/job.json`` (the caller holds the job lock)."""
        with open(job_dir / LOG, "w", encoding="utf-8") as logfile:
            return subprocess.Popen(
                [sys.executable, "-m", self.module, str(job_dir / JOB)],
                stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, self.api_key_env: api_key}, start_new_session=True)

    def _start_watching(self, process: subprocess.Popen, job_dir: Path, lock, name: str) -> None:
        """Called with ``self._lock`` held: ``_watch`` waits for ``process`` in a thread."""
        self._process = process
        self._watcher = threading.Thread(target=self._watch_then_unlock,
                                         args=(process, job_dir, lock), name=name, daemon=True)
        self._watcher.start()

    def _watch_then_unlock(self, process: subprocess.Popen, job_dir: Path, lock) -> None:
        try:
            self._watch(process, job_dir)
        finally:
            lock.close()
            with self._lock:
                self._process = None

    def _watch(self, process: subprocess.Popen, job_dir: Path) -> None:
        """Wait for the worker and record how the job ended (must not raise)."""
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the current job (if any) to be finished and handled; False on timeout."""
        watcher = self._watcher
        if watcher is None:
            return True
        watcher.join(timeout)
        return not watcher.is_alive()

    def close(self) -> None:
        """Stop a running worker (server shutdown)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            self.wait(30)


def worker_main(argv: list[str] | None, usage: str, run_job, api_key_env: str) -> int:
    """A worker module's ``main``: ``python -m MODULE JOB.json``, the API key in the environment
    variable ``api_key_env`` (never on disk)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    return run_job(Path(args[0]), os.environ.get(api_key_env, ""))


class TrainingManager(WorkerJobs):
    """Starts, watches and reports training runs (module docstring). Closing it stops a running
    worker; its run is reported as interrupted."""

    lock_name = LOCK
    module = "mosaic_backend.worker"
    api_key_env = API_KEY_ENV

    def __init__(self, settings: Settings, store: ModelStore, engines: EngineManager,
                 link: LabelStudioLink, metrics: Metrics) -> None:
        super().__init__(settings, store, engines, link, metrics)
        self.annotations: Counter[int] = Counter()  # new annotations per project since the last run

    # ---------------------------------------------------------------- starting
    def start(self, project: int, reason: str) -> dict[str, Any]:
        """Start a run for ``project`` unless one is going on; the answer names the run.

        A run that cannot start (no SAM 2 weights, no Label Studio address or key, the worker
        cannot be spawned) raises its BackendError, which Label Studio gets as the answer (it
        stores it as the model's error), and is recorded as a failed run for /train/status."""
        try:
            return self._start(project, reason)
        except BackendError as exc:
            self._record_failed_start(project, reason, str(exc))
            raise

    def _record_failed_start(self, project: int, reason: str, error: str) -> None:
        try:
            run_dir = self._new_job_dir(self.store.runs_dir)
            write_json(run_dir / STATUS, {
                "state": "failed", "stage": "starting", "run": run_dir.name, "project": project,
                "reason": reason, "started": now(), "finished": now(), "error": error,
                "model_version": self.engines.active_version})
        except OSError as exc:  # the answer still carries the error
            log.error("training: cannot record the failed start in %s: %s", self.store.runs_dir, exc)
        log.error("training for project %s (%s) cannot start: %s", project, reason, error)
        self.metrics.event("training", "failed")

    def _start(self, project: int, reason: str) -> dict[str, Any]:
        if not self.engines.trainable:
            raise BackendError("training needs the SAM 2 engine; this backend runs the classical "
                               "engine (no SAM 2 weights installed): install weights with "
                               "`mosaic-toolkit weights fetch sam2.1-large` (or `weights import`) "
                               "and restart the backend")
        url, key = self.link.require("training")
        with self._lock:
            lock = self._try_lock()
            if lock is None:
                running = self._latest()
                return {"status": "already running", "job": running.name if running else None}
            try:
                run_dir = self._new_job_dir(self.store.runs_dir)
                job = self._job(run_dir, project, url)
                write_json(run_dir / JOB, job)
                write_json(run_dir / STATUS, {
                    "state": "running", "stage": "starting", "run": run_dir.name, "project": project,
                    "reason": reason, "started": now(), "base_version": job["base_version"],
                    "epochs": self.settings.train_epochs})
                process = self._spawn(run_dir, key)
            except BaseException:
                lock.close()
                raise
            self.annotations[project] = 0
            self._start_watching(process, run_dir, lock, f"training {run_dir.name}")
        log.info("training run %s started for project %s (%s), worker pid %s", run_dir.name,
                 project, reason, process.pid)
        self.metrics.event("training", "started")
        return {"status": "started", "job": run_dir.name}

    def on_annotation(self, project: int) -> dict[str, Any] | None:
        """Count a new annotation; start a run when MOSAIC_BACKEND_TRAIN_EVERY are reached."""
        self.annotations[project] += 1
        every = self.settings.train_every
        if every and self.annotations[project] >= every:
            return self.start(project, f"{self.annotations[project]} new annotations")
        return None

    def _job(self, run_dir: Path, project: int, url: str) -> dict[str, Any]:
        s = self.settings
        engine = self.engines.active
        return {
            "run": run_dir.name, "run_dir": str(run_dir), "models_dir": str(self.store.root),
            "project": project, "label_studio_url": url, "base": job_base_spec(engine),
            "base_version": self.engines.active_version, "device": s.train_device or s.device,
            "promote": s.train_promote,
            "augment": {"tesserae_per_crop": s.train_tesserae_per_crop, "max_side": s.train_max_side,
                        "split": list(SPLIT), "seed": s.train_seed},
            "train": {"epochs": s.train_epochs, "batch_size": s.train_batch_size, "lr": s.train_lr,
                      "max_prompts": s.train_max_prompts, "image_size": s.train_image_size,
                      "val_params": s.train_val_params, "seed": s.train_seed},
        }

    # ---------------------------------------------------------------- finishing
    def _watch(self, process: subprocess.Popen, run_dir: Path) -> None:
        try:
            code = process.wait()
            self._finish(run_dir, code)
        except Exception as exc:  # noqa: BLE001 (a watcher must never die silently)
            log.exception("training run %s: finishing failed", run_dir.name)
            self._write_status(run_dir, state="failed", error=f"finishing the run failed: {exc}")

    def _finish(self, run_dir: Path, code: int) -> None:
        status = read_json(run_dir / STATUS)
        if code != 0 or status.get("stage") != "done":
            error = status.get("error") or (f"the worker exited with status {code}; last lines of "
                                            f"{run_dir / LOG}:\n{tail(run_dir / LOG)}")
            log.error("training run %s failed: %s", run_dir.name, error)
            self._write_status(run_dir, state="failed", error=error)
            self.metrics.event("training", "failed")
        elif status.get("promote"):
            try:
                self.engines.switch(status["version"])
            except Exception as exc:  # noqa: BLE001 (any load failure: keep serving the old model)
                error = f"trained version {status['version']} cannot be served: {exc}"
                log.error("training run %s: %s", run_dir.name, error)
                self._write_status(run_dir, state="failed", promoted=False, error=error)
                self.metrics.event("training", "failed")
            else:
                self._write_status(run_dir, state="succeeded", promoted=True)
                self.metrics.event("training", "promoted")
        else:
            log.info("training run %s: %s; keeping %s", run_dir.name, status.get("reason"),
                     self.engines.active_version)
            self._write_status(run_dir, state="succeeded", promoted=False)
            self.metrics.event("training", "not promoted")
        for name in BULKY:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()

    def _write_status(self, run_dir: Path, **fields: Any) -> None:
        write_json(run_dir / STATUS, {**read_json(run_dir / STATUS), **fields, "finished": now(),
                                      "model_version": self.engines.active_version})

    # ---------------------------------------------------------------- reporting
    def _latest(self) -> Path | None:
        runs = self.store.runs_dir
        if not runs.is_dir():
            return None
        found = [p for p in runs.iterdir() if (p / STATUS).is_file()]
        return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name)) if found else None

    def _held_elsewhere(self) -> bool:
        lock = self._try_lock()
        if lock is None:
            return True
        lock.close()
        return False

    def run_status(self, run_dir: Path) -> dict[str, Any]:
        status = read_json(run_dir / STATUS)
        if status.get("state") == "running" and self._process is None and not self._held_elsewhere():
            status["state"] = "interrupted"  # its server stopped before the run ended
        history = epochs_done(run_dir)
        status["epochs_completed"] = len(history)
        status["history"] = [{k: row.get(k) for k in ("epoch", "train_loss", "val_dice", "val_prompt_iou", "seconds")}
                             for row in history]
        if (run_dir / LOG).is_file():  # a run that could not start has none
            status["log"] = str(run_dir / LOG)
        return status

    def status(self, run: str | None = None) -> dict[str, Any]:
        """The latest run's (or run ``run``'s) status, with the model version serving now."""
        if run is not None:
            run_dir = self.store.runs_dir / run
            if "/" in run or run.startswith(".") or not (run_dir / STATUS).is_file():
                raise BackendError(f"training run {run!r}: unknown", 404)
        else:
            run_dir = self._latest()
        answer = {"state": "idle"} if run_dir is None else self.run_status(run_dir)
        answer["active_version"] = self.engines.active_version
        answer["annotations_since_last_run"] = dict(self.annotations)
        answer["train_every"] = self.settings.train_every
        return answer
