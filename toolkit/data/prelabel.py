"""Pre-annotate every task of a Label Studio project, not bound by any HTTP timeout.

Label Studio asks an ML backend for pre-labels inside a request it gives up on after 100 s,
which a SAM 2 pre-label on a CPU (or a large mosaic on a GPU) exceeds. ``prelabel_project``
does the same work from outside, through ``label-studio-sdk``:

1. the project's labeling config says where predictions go (``config_names``: the
   PolygonLabels control, else BrushLabels, its Image tag and data field);
2. the tasks to do are those (of ``tasks``, default all) without a prediction of this model
   version yet, so a second run does only what is missing (resumable; stop it any time);
3. each task is fetched again just before its turn (a task deleted meanwhile is skipped), its
   image downloaded (the exporter's resolver: uploads, local files, cloud storage), segmented
   (``segment.segment_image``) and stored as one prediction: a light polygon per tessera
   (``polygons``) with the engine's model version; with SAM 2's guided method each region
   carries its score (the IoU SAM 2 predicted for its outline) and the prediction their mean.
   A task deleted while it was being segmented
   is skipped too; any other failure of one task is recorded and the run goes on;
4. the summary counts done / skipped / failed tasks.

The backend runs the same function in its worker (``POST /prelabel``).
"""
from __future__ import annotations

import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from ..classical import ClassicalEngine
from ..core.errors import MosaicError
from ..core.polygons import DEFAULT_IOU, check_iou
from ..engines import Engine
from .tasks import Names, polygon_results


@dataclass(frozen=True)
class ConfigNames(Names):
    """``Names`` plus the control's tag (PolygonLabels or BrushLabels)."""

    tag: str = "PolygonLabels"


def config_names(text: str, where: str = "label config") -> ConfigNames:
    """Where pre-labels go in a labeling config: PolygonLabels (light), else BrushLabels."""
    try:
        root = ET.fromstring(text or "")
    except ET.ParseError as exc:
        raise MosaicError(f"{where}: not valid XML ({exc})") from exc
    images = {el.get("name"): el.get("value", "") for el in root.iter("Image")}
    for tag in ("PolygonLabels", "BrushLabels"):
        for el in root.iter(tag):
            target = el.get("toName")
            if target in images and images[target].startswith("$"):
                labels = [lab.get("value", "") for lab in el.iter("Label")]
                if not labels:
                    raise MosaicError(f"{where}: <{tag} name=\"{el.get('name')}\"> has no <Label>")
                return ConfigNames(el.get("name", ""), target, labels[0], images[target][1:], tag)
    raise MosaicError(f"{where}: no <PolygonLabels> or <BrushLabels> pointing at an <Image value=\"$...\">")


def brush_results(instances: np.ndarray, names: Names, scores: Sequence[float] | None = None
                  ) -> list[dict[str, Any]]:
    """BrushLabels results (RLE by the SDK), one per tessera, for a config without polygons;
    ``scores[k - 1]`` is tessera k's ``score``."""
    from label_studio_sdk.converter.brush import mask2rle

    height, width = instances.shape
    out = []
    for k in range(1, int(instances.max(initial=0)) + 1):
        rle = mask2rle(np.where(instances == k, 255, 0).astype(np.uint8))
        out.append({"id": f"t{k}", "from_name": names.from_name, "to_name": names.to_name,
                    "type": "brushlabels", "original_width": int(width), "original_height": int(height),
                    "image_rotation": 0, "readonly": False,
                    "value": {"format": "rle", "rle": rle, "brushlabels": [names.label]}})
        if scores is not None:
            out[-1]["score"] = round(float(scores[k - 1]), 4)
    return out


@dataclass
class PrelabelSummary:
    """What a run did, task by task."""

    model_version: str
    done: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # task -> why (already done, deleted)
    failed: dict[int, str] = field(default_factory=dict)  # task -> error
    regions: int = 0
    seconds: float = 0.0
    stopped: bool = False

    def lines(self) -> list[str]:
        out = [f"model version: {self.model_version}",
               f"pre-labelled tasks: {len(self.done)} ({self.regions} regions, {self.seconds:.1f} s)",
               f"skipped tasks: {len(self.skipped)}"]
        reasons: dict[str, list[int]] = {}
        for task, why in self.skipped.items():
            reasons.setdefault(why, []).append(task)
        out += [f"  {why}: {_ids(tasks)}" for why, tasks in reasons.items()]
        out.append(f"failed tasks: {len(self.failed)}")
        out += [f"  task {task}: {why}" for task, why in self.failed.items()]
        if self.stopped:
            out.append("stopped before the end: run again to do the rest")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"model_version": self.model_version, "done": len(self.done), "skipped": len(self.skipped),
                "failed": len(self.failed), "regions": self.regions, "seconds": round(self.seconds, 2),
                "stopped": self.stopped, "failures": {str(k): v for k, v in self.failed.items()}}


def _ids(tasks: Sequence[int]) -> str:
    shown = ", ".join(str(t) for t in tasks[:20])
    return shown + (f", ... ({len(tasks)} in all)" if len(tasks) > 20 else "")


def _api_detail(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        body = body.get("detail") or body
    text = " ".join(str(body or exc).split())
    return "" if text.startswith("<") else text[:200]


def _task_exists(client: Any, task_id: int) -> bool:
    """Whether the task is still there (a prediction for a deleted one answers 400, not 404)."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        client.tasks.get(id=str(task_id))
    except ApiError as exc:
        return exc.status_code != 404
    return True


def prelabel_project(
    url: str,
    api_key: str,
    project: int,
    engine: Engine,
    *,
    model_version: str,
    tasks: Iterable[int] | None = None,
    iou: float = DEFAULT_IOU,
    progress: bool = True,
    stop: threading.Event | None = None,
    on_task: Callable[[PrelabelSummary, int, int], None] | None = None,
) -> PrelabelSummary:
    """Pre-label the tasks of ``project`` that have no prediction of ``model_version`` (module
    docstring). ``stop`` ends the run between two tasks; ``on_task(summary, finished, total)``
    is called once the tasks to do are known (``finished`` 0; ``total`` counts the tasks that
    need a pre-label, not those skipped) and after each task (progress for the backend's job list)."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    from ..core.io import read_image
    from ..segment import segment_image_info
    from .export import _client, label_studio_resolver

    iou = check_iou(iou)
    started = time.perf_counter()
    summary = PrelabelSummary(model_version)
    client = _client(url, api_key)
    try:
        config = client.projects.get(id=project).label_config
        all_ids = [t.id for t in client.tasks.list(project=project, fields="task_only")]
        existing = client.predictions.list(project=project)
    except ApiError as exc:
        detail = _api_detail(exc) or ("not found" if exc.status_code == 404 else "")
        raise MosaicError(f"{url}: cannot read project {project} (HTTP {exc.status_code}"
                          + (f": {detail})" if detail else ")")) from exc
    except httpx.HTTPError as exc:
        raise MosaicError(f"{url}: cannot reach Label Studio ({exc})") from exc
    names = config_names(config, f"project {project}: label config")
    have = {p.task for p in existing if p.model_version == model_version}
    wanted = list(dict.fromkeys(int(t) for t in tasks)) if tasks is not None else all_ids
    known = set(all_ids)
    todo = []
    for task_id in wanted:
        if task_id not in known:
            summary.skipped[task_id] = "not in the project (deleted?)"
        elif task_id in have:
            summary.skipped[task_id] = f"already pre-labelled by {model_version}"
        else:
            todo.append(task_id)
    if on_task is not None:
        on_task(summary, 0, len(todo))
    with tempfile.TemporaryDirectory(prefix="mosaic-prelabel-") as cache:
        resolve = label_studio_resolver(url, api_key, cache)
        bar = tqdm(todo, desc="prelabel", unit="task", disable=None if progress else True)
        for n, task_id in enumerate(bar, start=1):
            if stop is not None and stop.is_set():
                summary.stopped = True
                break
            bar.set_postfix_str(f"task {task_id}")
            try:
                task = client.tasks.get(id=str(task_id))
                reference = (task.data or {}).get(names.image_key)
                if not isinstance(reference, str) or not reference:
                    raise MosaicError(f"its data has no {names.image_key!r} image field")
                path = resolve(task_id, reference)
                image = read_image(path)
                instances, info = segment_image_info(engine, image, scores=True)
                scores = info.get("scores")  # SAM 2's guided method: each tessera's predicted IoU
                results = (polygon_results(instances, iou, names, scores=scores) if names.tag == "PolygonLabels"
                           else brush_results(instances, names, scores))
                score = {} if not scores else {"score": round(float(np.mean(scores)), 4)}
                client.predictions.create(task=task_id, result=results, model_version=model_version, **score)
            except ApiError as exc:
                if exc.status_code == 404 or not _task_exists(client, task_id):
                    summary.skipped[task_id] = "deleted during the run"
                else:
                    summary.failed[task_id] = f"HTTP {exc.status_code}: {_api_detail(exc)}"
            except (MosaicError, httpx.HTTPError, OSError, ValueError) as exc:
                summary.failed[task_id] = str(exc)
            else:
                summary.done.append(task_id)
                summary.regions += len(results)
            summary.seconds = time.perf_counter() - started
            if on_task is not None:
                on_task(summary, n, len(todo))
    summary.seconds = time.perf_counter() - started
    return summary
