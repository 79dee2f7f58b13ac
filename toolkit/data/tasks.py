"""Tiled Label Studio tasks for large mosaics, and putting their annotations back together.

A whole mosaic of thousands of tesserae is too heavy for one task in Label Studio's editor (see
docs/performance.md, "Label Studio's editor"), so ``make_tasks`` cuts each mosaic into
overlapping crops of at most about ``max_tesserae`` tesserae, using the tessera scale estimate:

* crop side ``tessera_size * sqrt(max_tesserae)``, overlap about two tessera diameters
  (``tiling.choose_overlap``), laid out by ``tiling.plan_tiles`` (raster order, the last crop of
  each row and column flush with the border);
* every crop is written losslessly as PNG to ``OUT/images/<stem>_r<row>c<col>.png``;
* ``OUT/tasks.json`` is a Label Studio import file: one task per crop with ``data.image`` (a
  URL Label Studio can serve: local files under its document root, or a URL prefix),
  ``data.mosaic`` (the source file name, a Data Manager column) and the crop's place in its
  mosaic under ``meta.mosaic_crop`` (also ``data.mosaic_crop``, since Label Studio keeps task
  data in every export format);
* with an engine (``--prelabel``), the whole mosaic is segmented once and each task carries one
  prediction: a light polygon (``polygons.instance_polygons``) per tessera or piece of one inside
  the crop, with the engine's ``model_version``; with SAM 2's guided method each region carries
  the score of the tessera it is part of (the IoU SAM 2 predicted for its outline) and the
  prediction their mean.

``stitch`` is the inverse used by ``export``: the crops' annotated instance maps are merged by
``tiling.segment_tiled``'s core-region rule (a tessera seen by two crops is kept once; a tessera
cut by crop borders is joined from its parts), so annotating each crop's ground truth gives back
the mosaic's instance map exactly. An unannotated crop contributes nothing; the part of it that
no annotated tessera covers is returned as *unknown*.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from ..classical import ClassicalEngine, estimate_tessera_size
from ..core.dataset import relabel_sequential, split_disconnected
from ..core.instances import source_ids
from ..core.errors import MosaicError
from ..core.io import atomic_output_dir, read_image, write_image
from ..core.polygons import DEFAULT_IOU, check_iou, instance_polygons, to_percent
from ..core.tiling import choose_overlap, plan_tiles, segment_tiled
from ..engines import Engine

TASKS_FILE = "tasks.json"
CROP_KEY = "mosaic_crop"
DEFAULT_MAX_TESSERAE = 300
MIN_CROP_DIAMETERS = 6  # a crop is at least this many tesserae wide (room for the overlap)
SIDE_FACTOR = 0.85  # pieces of tesserae cut by the crop border count too: keep below the maximum


def tessera_size_of(image: np.ndarray) -> float:
    """The tessera size estimate (median tessera diameter, px) that crops are sized by: the one
    place this module asks for it."""
    return float(estimate_tessera_size(image))


@dataclass(frozen=True)
class Names:
    """Where predictions go in the labeling config: the PolygonLabels control, its image, the
    label (defaults: the shipped label_config.xml)."""

    from_name: str = "polygon"
    to_name: str = "image"
    label: str = "Tessera"
    image_key: str = "image"


# --------------------------------------------------------------------------------------------
# Crops
# --------------------------------------------------------------------------------------------
def crop_layout(height: int, width: int, tessera_size: float, max_tesserae: int = DEFAULT_MAX_TESSERAE
                ) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    """(crop side, overlap, crops ``(y0, x0, y1, x1)`` in raster order) for a mosaic.

    A crop holds at most about ``max_tesserae`` tesserae (and pieces of tesserae cut by its
    border) of diameter ``tessera_size``: a square of ``SIDE_FACTOR * sqrt(max_tesserae)``
    diameters a side (a tessera with its grout takes about a diameter squared); neighbours
    overlap by about two diameters.
    """
    if not tessera_size > 0:
        raise MosaicError(f"tasks: tessera size must be positive, got {tessera_size}")
    if max_tesserae < 1:
        raise MosaicError(f"tasks: --max-tesserae must be at least 1, got {max_tesserae}")
    side = max(int(SIDE_FACTOR * tessera_size * math.sqrt(max_tesserae)), int(math.ceil(MIN_CROP_DIAMETERS * tessera_size)), 16)
    if max(height, width) <= side:
        return side, 0, [(0, 0, height, width)]
    overlap = choose_overlap(tessera_size, side)
    return side, overlap, plan_tiles(height, width, side, overlap)


def crop_meta(mosaic: str, width: int, height: int, side: int, overlap: int, tessera_size: float,
              crop: tuple[int, int, int, int], index: int, count: int) -> dict[str, Any]:
    """A crop's place in its mosaic, as stored in a task's ``meta`` and ``data``."""
    y0, x0, y1, x1 = crop
    return {"mosaic": mosaic, "mosaic_width": int(width), "mosaic_height": int(height),
            "x": int(x0), "y": int(y0), "width": int(x1 - x0), "height": int(y1 - y0),
            "tile": int(side), "overlap": int(overlap), "tessera_size": round(float(tessera_size), 2),
            "index": int(index), "crops": int(count)}


def crop_instances(instances: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    """The tesserae (and pieces of tesserae) of a mosaic's instance map inside a crop, 1..N."""
    y0, x0, y1, x1 = crop
    return relabel_sequential(split_disconnected(np.ascontiguousarray(instances[y0:y1, x0:x1])))


def piece_scores(local: np.ndarray, parent: np.ndarray, scores: Sequence[float]) -> np.ndarray:
    """The score of every region of ``local`` (``crop_instances`` of ``parent``, the mosaic's
    map cut to the crop; region k at index k - 1): that of the mosaic's tessera it is part of
    (``scores[j - 1]`` for tessera j)."""
    ids, tesserae = source_ids(local, parent)
    out = np.zeros(int(local.max(initial=0)))
    out[ids - 1] = np.asarray(scores, dtype=np.float64)[tesserae - 1]
    return out


def polygon_results(instances: np.ndarray, iou: float = DEFAULT_IOU, names: Names = Names(),
                    prefix: str = "t", scores: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Label Studio PolygonLabels results, one light polygon per tessera of an instance map;
    ``scores[k - 1]``, when given, is tessera k's ``score``."""
    height, width = instances.shape
    out = []
    for k, xy in instance_polygons(instances, iou).items():
        out.append({
            "id": f"{prefix}{k}", "from_name": names.from_name, "to_name": names.to_name,
            "type": "polygonlabels", "original_width": int(width), "original_height": int(height),
            "image_rotation": 0, "readonly": False,
            "value": {"points": to_percent(xy, width, height), "closed": True,
                      "polygonlabels": [names.label]},
        })
        if scores is not None:
            out[-1]["score"] = round(float(scores[k - 1]), 4)
    return out


# --------------------------------------------------------------------------------------------
# Writing tasks
# --------------------------------------------------------------------------------------------
def image_url_maker(out: Path, document_root: str | os.PathLike | None, url_prefix: str | None
                    ) -> Callable[[Path], str]:
    """How a crop file under ``out`` is named in ``data.image``: a Label Studio local-files URL
    relative to ``document_root``, or ``url_prefix`` + its path relative to ``out``."""
    if url_prefix:
        prefix = url_prefix if url_prefix.endswith("/") else url_prefix + "/"
        return lambda path: prefix + path.relative_to(out).as_posix()
    if document_root is None:
        raise MosaicError("tasks: say where Label Studio finds the crops: --document-root (its "
                          "LOCAL_FILES_DOCUMENT_ROOT, with OUT inside it) or --url-prefix")
    root = Path(document_root).expanduser().resolve()
    final = out.expanduser().resolve()
    try:
        final.relative_to(root)
    except ValueError as exc:
        raise MosaicError(f"{out}: must lie inside the document root {root} for Label Studio's "
                          "local files (or give --url-prefix)") from exc
    from urllib.parse import quote

    return lambda path: "/data/local-files/?d=" + quote((final / path.relative_to(out)).relative_to(root).as_posix())


def _stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._") or "mosaic"


def make_tasks(
    paths: Sequence[Path],
    out: str | os.PathLike,
    *,
    max_tesserae: int = DEFAULT_MAX_TESSERAE,
    tessera_size: float | None = None,
    engine: Engine | None = None,
    model_version: str | None = None,
    iou: float = DEFAULT_IOU,
    document_root: str | os.PathLike | None = None,
    url_prefix: str | None = None,
    names: Names = Names(),
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Cut every mosaic into crop tasks in ``out`` (module docstring); returns the tasks."""
    iou = check_iou(iou)
    out = Path(out)
    url_of = image_url_maker(out, document_root, url_prefix)
    stems: dict[str, Path] = {}
    for path in paths:
        stem = _stem(path)
        if stem in stems:
            raise MosaicError(f"{path}: has the same name as {stems[stem]}; crops would collide")
        stems[stem] = path
    tasks: list[dict[str, Any]] = []
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        bar = tqdm(paths, desc="tasks", unit="mosaic", disable=None if progress else True)
        for path in bar:
            bar.set_postfix_str(path.name)
            image = read_image(path)
            height, width = image.shape[:2]
            size = tessera_size if tessera_size else tessera_size_of(image)
            side, overlap, crops = crop_layout(height, width, size, max_tesserae)
            instances = scores = None
            if engine is not None:
                from ..segment import segment_image_info

                instances, info = segment_image_info(engine, image, progress=progress, scores=True)
                scores = info.get("scores")
            stem = _stem(path)
            spans_y, spans_x = _spans(crops)
            for index, crop in enumerate(crops):
                y0, x0, y1, x1 = crop
                row, col = spans_y.index((y0, y1)), spans_x.index((x0, x1))
                rel = Path("images") / f"{stem}_r{row:02d}c{col:02d}.png"
                write_image(tmp / rel, np.ascontiguousarray(image[y0:y1, x0:x1]))
                meta = crop_meta(path.name, width, height, side, overlap, size, crop, index, len(crops))
                task: dict[str, Any] = {
                    "data": {names.image_key: url_of(out / rel), "mosaic": path.name, CROP_KEY: meta},
                    "meta": {CROP_KEY: meta},
                }
                if instances is not None:
                    local = crop_instances(instances, crop)
                    kept = None if scores is None else piece_scores(local, instances[y0:y1, x0:x1], scores)
                    prediction = {"model_version": model_version or "unknown",
                                  "result": polygon_results(local, iou, names, scores=kept)}
                    if kept is not None and len(kept):
                        prediction["score"] = round(float(np.mean(kept)), 4)
                    task["predictions"] = [prediction]
                tasks.append(task)
        (tmp / TASKS_FILE).write_text(json.dumps(tasks) + "\n")
    return tasks


# --------------------------------------------------------------------------------------------
# Putting annotated crops back together
# --------------------------------------------------------------------------------------------
def task_crop(task: dict[str, Any]) -> dict[str, Any] | None:
    """A task's crop description (``meta`` or ``data``), or None for an ordinary task; a
    MosaicError when it is there but malformed."""
    meta = (task.get("meta") or {}).get(CROP_KEY) if isinstance(task.get("meta"), dict) else None
    if meta is None:
        meta = (task.get("data") or {}).get(CROP_KEY)
    if meta is None:
        return None
    needed = ("mosaic", "mosaic_width", "mosaic_height", "x", "y", "width", "height", "tile", "overlap")
    if not isinstance(meta, dict) or any(k not in meta for k in needed):
        raise MosaicError(f"task {task.get('id')}: {CROP_KEY} must hold {', '.join(needed)}")
    for k in needed[1:]:
        if isinstance(meta[k], bool) or not isinstance(meta[k], int) or meta[k] < 0:
            raise MosaicError(f"task {task.get('id')}: {CROP_KEY}.{k} must be a non-negative integer")
    return meta


def mosaic_key(meta: dict[str, Any]) -> tuple:
    return (meta["mosaic"], meta["mosaic_width"], meta["mosaic_height"], meta["tile"], meta["overlap"])


def expected_crops(meta: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    """The crops ``(y0, x0, y1, x1)`` a mosaic was cut into, from any of its crop tasks."""
    height, width, tile, overlap = meta["mosaic_height"], meta["mosaic_width"], meta["tile"], meta["overlap"]
    if max(height, width) <= tile:
        return [(0, 0, height, width)]
    return plan_tiles(height, width, tile, overlap)


def _spans(plan: Sequence[tuple[int, int, int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The distinct row spans and column spans of a crop plan, in order."""
    return sorted({(y0, y1) for y0, _, y1, _ in plan}), sorted({(x0, x1) for _, x0, _, x1 in plan})


def stitch(meta: dict[str, Any], crops: dict[tuple[int, int, int, int], np.ndarray | None]
           ) -> tuple[np.ndarray, np.ndarray]:
    """(instance map of the mosaic, unknown mask) from the crops' annotated instance maps
    (``None`` or absent for an unannotated crop), keyed by ``(y0, x0, y1, x1)``."""
    height, width = meta["mosaic_height"], meta["mosaic_width"]
    plan = expected_crops(meta)
    order = iter(plan)

    def annotated(pixels: np.ndarray) -> np.ndarray:
        labels = crops.get(next(order))
        return np.zeros(pixels.shape[:2], np.int32) if labels is None else labels

    instances = segment_tiled(np.zeros((height, width), np.uint8), annotated, tile=meta["tile"],
                              overlap=meta["overlap"], progress=False)
    # unknown: what no tessera covers inside an unannotated crop (its overlaps included: a
    # tessera there may belong to it and be missing from its annotated neighbour's share)
    unknown = np.zeros((height, width), bool)
    for y0, x0, y1, x1 in plan:
        if crops.get((y0, x0, y1, x1)) is None:
            unknown[y0:y1, x0:x1] = True
    unknown &= instances == 0
    return instances, unknown


def summarise_crops(tasks: Iterable[dict[str, Any]]) -> dict[tuple, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Crop tasks grouped by mosaic: key -> [(task, meta)]."""
    groups: dict[tuple, list] = {}
    for task in tasks:
        meta = task_crop(task)
        if meta is not None:
            groups.setdefault(mosaic_key(meta), []).append((task, meta))
    return groups
