"""The ML backend's behaviour, independent of HTTP: what each endpoint answers.

``Backend`` ties together the engines (versions.py), image fetching (images.py), clicks and
pre-labels (predict.py), Label Studio results (regions.py) and training (trainer.py). The
FastAPI app (app.py) only moves JSON in and out of it.

Label Studio sends the whole task with every click, including all its annotations and
predictions (about 1 MB on an image with hundreds of tesserae, mostly polygon coordinates).
``decode_predict_request`` reads a /predict body with msgspec against a schema that names only
what the backend uses (each task's ``id`` and ``data``, ``label_config``, ``project``,
``params.context``, ``model_version``): everything else is skipped by the C decoder without
building Python objects, about 2 ms for 1.4 MB where ``json.loads`` takes about 100 ms.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Iterator, Union

import msgspec
import numpy as np

from mosaic_toolkit.core.errors import MosaicError

from . import __version__
from .config import Settings
from .errors import BackendError
from .images import ByteLRU, ImageFetcher, LabelStudioLink
from .labelconfig import LabelConfig, parse_label_config
from .metrics import Metrics
from .jobs import ANNOTATION_ACTIONS, TrainingManager
from .predict import Deadline, Predictor
from .prelabel_job import PrelabelJobs
from .regions import (brush_region, instance_regions, mean_score, parse_context, polygon_regions,
                      polygon_vertices)
from .versions import EngineManager, ModelStore, engine_version

log = logging.getLogger(__name__)

MODEL_CLASS = "MosaicBackend"
SCHEMA_CACHE_BYTES = 8 * 2**20  # label configs sent to /setup, kept per project


class _Task(msgspec.Struct):
    data: Any = None  # checked by Backend._task, with a clearer message than a schema error
    id: Any = None


class _Params(msgspec.Struct):
    context: Any = None
    model_version: Any = None


class _PredictRequest(msgspec.Struct):
    tasks: Union[list[Union[int, _Task]], None] = None
    label_config: Any = None
    project: Any = None
    params: Union[_Params, None] = None
    model_version: Any = None


_predict_decoder = msgspec.json.Decoder(_PredictRequest)


def decode_predict_request(body: bytes) -> dict[str, Any]:
    """The parts of a /predict body the backend uses, as plain data (module docstring)."""
    try:
        request = _predict_decoder.decode(body)
    except msgspec.ValidationError as exc:  # valid JSON, wrong shape (a DecodeError subclass)
        raise BackendError(f"predict: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BackendError(f"predict: the body is not valid JSON ({exc})") from exc
    params = request.params or _Params()
    return {
        "tasks": None if request.tasks is None else [
            t if isinstance(t, int) else {"id": t.id, "data": t.data} for t in request.tasks],
        "label_config": request.label_config, "project": request.project,
        "model_version": request.model_version,
        "params": {"context": params.context, "model_version": params.model_version},
    }


def _project_id(value: Any) -> int | None:
    """A project id from a webhook's project object, an id, or Label Studio's "<id>.<stamp>"."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    head = value.split(".", 1)[0] if isinstance(value, str) else ""
    if head.isascii() and head.isdigit() and len(head) < 20:  # not "²", which isdigit() too
        return int(head)
    return None


class Backend:
    """One backend: its settings, engines, caches, metrics and training manager."""

    def __init__(self, settings: Settings, engines: EngineManager | None = None) -> None:
        self.settings = settings
        self.link = LabelStudioLink(settings.label_studio_url, settings.label_studio_api_key)
        if settings.label_studio_api_key and not settings.label_studio_url:
            log.warning("LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: the key is only ever "
                        "sent to LABEL_STUDIO_URL, so it is not used; set LABEL_STUDIO_URL")
        self.fetcher = ImageFetcher(settings, self.link)
        self.store = ModelStore(settings.models_dir)
        self.engines = engines or EngineManager(settings, self.store)
        self.predictor = Predictor(settings.image_cache_mb * 2**20, settings.prelabel_scores,
                                   click_threshold=settings.click_mask_threshold)
        self.metrics = Metrics()
        self.predictor.on_scale = self.metrics.scale
        self.training = TrainingManager(settings, self.store, self.engines, self.link, self.metrics)
        self.prelabels = PrelabelJobs(settings, self.store, self.engines, self.link, self.metrics)
        # project id -> label config sent to /setup (bounded: least recently used go first)
        self.schemas: ByteLRU[str] = ByteLRU(SCHEMA_CACHE_BYTES, len)
        self.stopping = threading.Event()  # set on SIGTERM: running requests stop (503)

    def stop(self) -> None:
        """The server is shutting down: running requests stop at their next check."""
        if not self.stopping.is_set():
            self.stopping.set()
            log.info("shutting down: running requests stop now")

    def close(self) -> None:
        self.stop()
        self.training.close()
        self.prelabels.close()
        self.fetcher.close()

    # ---------------------------------------------------------------- status
    def health(self) -> dict[str, Any]:
        answer = {"status": "UP", "model_class": MODEL_CLASS, "version": __version__,
                  "engine": self.engines.base.name, "model_version": self.engines.active_version}
        if self.engines.last_error:
            answer["warning"] = self.engines.last_error
        return answer

    def setup(self, body: Any) -> dict[str, Any]:
        """Label Studio connects: remember its address and token (unless configured) and the
        project's config; answer the model version. Nothing slow happens here."""
        if not isinstance(body, dict):
            raise BackendError("setup: expected a JSON object")
        self.link.update_from_setup(body.get("hostname"), body.get("access_token"))
        project = _project_id(body.get("project"))
        if project is not None and isinstance(body.get("schema"), str):
            self.schemas.put(str(project), body["schema"])
        return {"model_version": self.engines.active_version}

    def versions(self) -> dict[str, Any]:
        rows = self.engines.versions()
        answer = {"versions": [r["version"] for r in rows], "current": self.engines.active_version,
                  "pinned": self.settings.model_version, "models": rows,
                  "broken": {r["version"]: r["broken"] for r in rows if r.get("broken")}}
        if self.engines.last_error:
            answer["warning"] = self.engines.last_error
        return answer

    def select_version(self, body: Any) -> dict[str, Any]:
        version = body.get("version") if isinstance(body, dict) else None
        if not isinstance(version, str) or not version:
            raise BackendError('versions: expected {"version": "<name>"} (GET /versions lists them)')
        if self.settings.model_version:
            raise BackendError(f"versions: this server is pinned to {self.settings.model_version!r} "
                               "(MOSAIC_BACKEND_MODEL_VERSION); choose per request with model_version", 409)
        self.engines.switch(version)
        return {"current": self.engines.active_version}

    # ---------------------------------------------------------------- predictions
    def predict(self, body: Any) -> dict[str, Any]:
        """Answer /predict: clicks when ``params.context`` is given, else pre-labels."""
        return {"results": list(self._results(body))}

    def predict_json(self, body: Any) -> bytes:
        """``predict`` as JSON bytes, each task's result encoded as soon as it is made (the
        regions as Python objects take several times their JSON size); a 413 error when the
        answer would pass MOSAIC_BACKEND_MAX_ANSWER_MB."""
        limit = self.settings.max_answer_mb * 2**20
        parts, total = [], 0
        for result in self._results(body):
            part = msgspec.json.encode(result)
            total += len(part) + 1
            if total > limit:
                raise BackendError(
                    f"predict: the answer passed {self.settings.max_answer_mb:g} MiB after "
                    f"{len(parts)} task(s) (MOSAIC_BACKEND_MAX_ANSWER_MB); ask for fewer tasks "
                    "per request", 413)
            parts.append(part)
        return b'{"results":[' + b",".join(parts) + b"]}"

    def _results(self, body: Any) -> Iterator[dict[str, Any]]:
        """One result per task, within the request's deadline (MOSAIC_BACKEND_PREDICT_TIMEOUT,
        checked before every task, between tiles and before a click's model call)."""
        started = time.monotonic()
        deadline = Deadline.after(self.settings.predict_timeout, "predict", self.stopping)
        if not isinstance(body, dict):
            raise BackendError("predict: expected a JSON object with 'tasks'")
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BackendError("predict: 'tasks' must be a non-empty list of tasks")
        if len(tasks) > self.settings.max_tasks:
            raise BackendError(f"predict: {len(tasks)} tasks in one request, more than "
                               f"{self.settings.max_tasks} (MOSAIC_BACKEND_MAX_TASKS)", 413)
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise BackendError("predict: 'params' must be an object")
        config = self._label_config(body)
        version = body.get("model_version") or params.get("model_version")
        engine = self.engines.engine_for(version if isinstance(version, str) and version else None)
        context = params.get("context")
        if context is not None and len(tasks) != 1:
            raise BackendError(f"predict: an interactive request (with context) takes one task, got {len(tasks)}")
        for raw in tasks:
            deadline.check()
            task = self._task(raw)
            what = f"task {str(task.get('id'))[:50]}"
            deadline.what = what
            image, key = self._image(task, config)
            try:
                if context is not None:
                    yield self._click(engine, config, task, image, key, context, deadline)
                else:
                    yield self._prelabel(engine, config, image, key, deadline)
            except BackendError:
                raise
            except MosaicError as exc:
                raise BackendError(f"{what}: {exc}") from exc
        self.metrics.observe("click" if context is not None else "prelabel",
                             (time.monotonic() - started) / (1 if context is not None else len(tasks)))

    def _label_config(self, body: dict[str, Any]) -> LabelConfig:
        text = body.get("label_config")
        if not text:
            text = self.schemas.get(str(_project_id(body.get("project"))))
        return parse_label_config(text)

    def _task(self, raw: Any) -> dict[str, Any]:
        """A task object; a bare id is fetched from Label Studio (404 when it does not exist)."""
        if isinstance(raw, int) and not isinstance(raw, bool):
            return self.fetcher.task(raw)
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            raise BackendError(f"predict: a task must be an object with 'data' (or a task id), "
                               f"got {json.dumps(raw)[:100]}")
        return raw

    def _image(self, task: dict[str, Any], config: LabelConfig) -> tuple[np.ndarray, str]:
        reference = task["data"].get(config.image_key)
        if not isinstance(reference, str) or not reference:
            raise BackendError(f"task {task.get('id')}: no image: its data has no {config.image_key!r} "
                               f"field (the label config's <Image> reads ${config.image_key})")
        return self.fetcher.image(reference, task.get("id"))

    def _click(self, engine, config: LabelConfig, task: dict[str, Any], image: np.ndarray, key: str,
               context: Any, deadline: Deadline | None = None) -> dict[str, Any]:
        height, width = image.shape[:2]
        prompt = parse_context(context, config, width, height, task.get("id"))
        control = config.click_control(self.settings.click_region)
        mask, score = self.predictor.click(engine, image, key, prompt, deadline)
        label = control.label_for(prompt.label)
        regions = []
        if mask.any():
            regions = ([brush_region(config, control, mask, label, score)] if control.tag == "BrushLabels"
                       else polygon_regions(config, control, mask, label, score, self.settings.click_polygon_iou))
        self.metrics.vertices(polygon_vertices(regions))
        return {"result": regions, "score": None if score is None else round(score, 4),
                "model_version": engine_version(engine)}

    def _prelabel(self, engine, config: LabelConfig, image: np.ndarray, key: str,
                  deadline: Deadline) -> dict[str, Any]:
        control = config.prelabel_control
        instances, scores = self.predictor.prelabel(engine, image, key, deadline)
        regions = instance_regions(config, control, instances, control.label_for(None), scores,
                                   self.settings.polygon_iou)
        self.metrics.vertices(polygon_vertices(regions))
        return {"result": regions, "score": mean_score(scores), "model_version": engine_version(engine)}

    # ---------------------------------------------------------------- training
    def webhook(self, body: Any) -> dict[str, Any]:
        """Label Studio's events: START_TRAINING starts a run; new annotations are counted
        towards MOSAIC_BACKEND_TRAIN_EVERY; other events are acknowledged and ignored."""
        if not isinstance(body, dict) or not isinstance(body.get("action"), str):
            raise BackendError("webhook: expected a JSON object with an 'action'")
        action = body["action"]
        project = _project_id(body.get("project"))
        if project is None:
            for key in ("annotation", "task"):
                if isinstance(body.get(key), dict):
                    project = _project_id(body[key].get("project"))
                    if project is not None:
                        break
        if action == "START_TRAINING":
            if project is None:
                raise BackendError("webhook START_TRAINING: no project id in the request")
            return self.training.start(project, "START_TRAINING")
        if action in ANNOTATION_ACTIONS and project is not None:
            started = self.training.on_annotation(project)
            return started or {"status": "counted", "project": project,
                               "annotations": self.training.annotations[project]}
        return {"status": "ignored", "action": action}

    def jobs(self) -> dict[str, Any]:
        """Pre-label jobs (newest first) and the latest training run."""
        return {"jobs": self.prelabels.jobs(), "training": self.training.status()}

    def train_legacy(self, body: Any) -> dict[str, Any]:
        """Older Label Studio versions POST /train {"project": "<id>.<stamp>", ...}."""
        project = _project_id(body.get("project")) if isinstance(body, dict) else None
        if project is None:
            raise BackendError("train: no project id in the request")
        return self.training.start(project, "train request")
