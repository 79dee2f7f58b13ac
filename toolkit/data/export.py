"""Turn Label Studio annotations into a ground-truth dataset (and optionally a COCO file).

Input is a Label Studio JSON export (a list of tasks), read from a file or pulled from a running
Label Studio with ``label-studio-sdk``. Per task:

1. The annotation that counts: never a cancelled one (``was_cancelled``); a ``ground_truth`` one
   first, otherwise the most recently updated (``updated_at``). Tasks without one are skipped and
   reported, not an error.
2. Tessera regions are the results of type ``brushlabels``/``brush`` (RLE, decoded with the SDK's
   own ``label_studio_sdk.converter.brush.decode_rle``) and ``polygonlabels``/``polygon`` (points in
   percent of the image). Keypoints and rectangles are SAM prompts, not tesserae, and are ignored.
3. Every region is rasterised and each of its 4-connected components becomes one tessera. Where
   regions overlap, a pixel stays with the tessera that claimed it first (result order), so a
   later region never cuts an earlier tessera apart.

Bad input (an RLE of the wrong length, a missing or unreadable image, an image whose size differs
from the annotated one, a polygon outside the image, any field of the wrong type) raises a
MosaicError naming the task; the output folder is built atomically, so nothing half-written is
left. An RLE's declared length (its 32-bit header) is checked before it is decoded, so a small
RLE cannot make the decoder allocate gigabytes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from pycocotools import mask as coco_mask
from scipy import ndimage as ndi
from skimage.draw import polygon as polygon_pixels
from tqdm import tqdm

from ..core.dataset import (
    IMAGE_EXTENSIONS,
    Sample,
    label_components,
    relabel_sequential,
    write_manifest,
    write_mask,
    write_sample,
)
from ..core.io import atomic_file, atomic_output_dir, read_image, read_instances
from ..core.errors import MosaicError
from .tasks import expected_crops, stitch, summarise_crops, task_crop

# Result type -> region kind. Everything else (keypoints, rectangles, choices...) is ignored.
TESSERA_TYPES = {
    "brushlabels": "brush",
    "brush": "brush",
    "polygonlabels": "polygon",
    "polygon": "polygon",
}
# Label Studio prefixes uploaded files with 8 hex digits and a dash: "3f2a9c1d-foo.jpg".
UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(.+)$")
# A polygon vertex may overshoot the image border by this much (rounding in the editor).
POLYGON_TOLERANCE_PX = 0.5
# A task id is an integer (Label Studio's) or a plain name: it becomes part of file names.
PLAIN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# (task id, image reference from the task data) -> local image file
ImageResolver = Callable[[Any, str], Path]


@dataclass
class Skipped:
    """A task that produced no sample, and why."""

    task: Any
    reason: str


@dataclass
class ExportSummary:
    """What an export produced: the samples written and the tasks skipped."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def tesserae(self) -> int:
        return sum(s.tesserae for s in self.samples)

    @property
    def tasks(self) -> int:
        """Annotated tasks behind the samples (a tiled mosaic is one sample from many tasks)."""
        return sum(len(s.source.get("tasks") or ()) if "tasks" in s.source else 1 for s in self.samples)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per fact."""
        n, tasks = len(self.samples), self.tasks
        out = [
            f"exported mosaics: {n} (from {tasks} task{'' if tasks == 1 else 's'})",
            f"tesserae: {self.tesserae}",
            f"skipped tasks: {len(self.skipped)}",
        ]
        out += [f"  {s.task if isinstance(s.task, str) else f'task {s.task}'}: {s.reason}"
                for s in self.skipped]
        return out


# --------------------------------------------------------------------------------------------
# Reading tasks and choosing the annotation
# --------------------------------------------------------------------------------------------
def load_export(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The tasks of a Label Studio JSON export file (format "JSON", not "JSON_MIN")."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MosaicError(f"{path}: cannot read export ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise MosaicError(f"{path}: not valid JSON ({exc})") from exc
    return check_tasks(data, str(path))


def check_tasks(data: Any, origin: str) -> list[dict[str, Any]]:
    """Check that ``data`` is a list of Label Studio tasks with ids and data."""
    if not isinstance(data, list) or not all(
        isinstance(t, dict) and "id" in t and isinstance(t.get("data"), dict) for t in data
    ):
        raise MosaicError(
            f"{origin}: not a Label Studio JSON export (expected a list of tasks with 'id', 'data' "
            "and 'annotations'; export the project as JSON, not JSON_MIN)"
        )
    for t in data:
        tid = t["id"]
        if not ((isinstance(tid, int) and not isinstance(tid, bool)) or (isinstance(tid, str) and PLAIN_ID.match(tid))):
            raise MosaicError(f"{origin}: task id {str(tid)[:60]!r} is not an integer (or a plain name of "
                              "letters, digits, '-' and '_')")
    return data


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_annotation(task_id: Any, annotation: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``result`` list of an annotation, with every field the export reads checked for its
    type; a MosaicError naming the task and the field otherwise."""
    where = f"task {task_id}: annotation {str(annotation.get('id'))[:40]}"
    results = annotation.get("result")
    if results is None:
        return []
    if not isinstance(results, list):
        raise MosaicError(f"{where}: 'result' must be a list, got {_type_name(results)}")
    for i, r in enumerate(results):
        at = f"{where}: result {i}"
        if not isinstance(r, dict):
            raise MosaicError(f"{at}: expected an object, got {_type_name(r)}")
        rtype = r.get("type")
        if rtype is not None and not isinstance(rtype, str):
            raise MosaicError(f"{at}: 'type' must be a string, got {_type_name(rtype)}")
        value = r.get("value")
        if value is not None and not isinstance(value, dict):
            raise MosaicError(f"{at}: 'value' must be an object, got {_type_name(value)}")
        value = value or {}
        keys = (rtype,) if rtype in TESSERA_TYPES and rtype.endswith("labels") else ()
        for key in keys + ("labels",):
            names = value.get(key)
            if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise MosaicError(f"{at}: '{key}' must be a list of label names, got {_type_name(names)}")
        if rtype in TESSERA_TYPES:
            for key in ("original_width", "original_height"):
                size = r.get(key)
                if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float))
                                         or not 0 < size < 2**31 or int(size) != size):
                    raise MosaicError(f"{at}: '{key}' must be a positive whole number of pixels, "
                                      f"got {str(size)[:40]}")
    return results


def _timestamp(task_id: Any, annotation: dict[str, Any]) -> datetime:
    """When an annotation was last changed (``updated_at``, else ``created_at``), as UTC."""
    value = annotation.get("updated_at") or annotation.get("created_at")
    if not value:
        return datetime.min.replace(tzinfo=timezone.utc)
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise MosaicError(
            f"task {task_id}: annotation {annotation.get('id')}: bad timestamp {value!r}"
        ) from exc
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def choose_annotation(task: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The annotation that counts for a task, or ``None`` and the reason there is none.

    Cancelled annotations never count; a ground-truth annotation wins over the others; among
    equals the most recently updated wins (then the higher annotation id).
    """
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        raise MosaicError(f"task {task['id']}: 'annotations' must be a list, got {_type_name(annotations)}")
    if not annotations:
        return None, "no annotation"
    for i, a in enumerate(annotations):
        if not isinstance(a, dict):
            raise MosaicError(f"task {task['id']}: annotation {i} is not an object ({_type_name(a)})")
    usable = [a for a in annotations if not a.get("was_cancelled")]
    if not usable:
        return None, "all annotations cancelled"

    def rank(a: dict[str, Any]) -> tuple[bool, datetime, int]:
        ident = a.get("id")
        return bool(a.get("ground_truth")), _timestamp(task["id"], a), ident if isinstance(ident, int) else -1

    return max(usable, key=rank), None


# --------------------------------------------------------------------------------------------
# Finding the image
# --------------------------------------------------------------------------------------------
def image_reference(task: dict[str, Any], image_key: str = "image") -> str:
    """The image URL or path of a task: ``data[image_key]``, else the first value that looks
    like an image (an image file extension or a Label Studio data URL)."""
    data = task["data"]
    value = data.get(image_key)
    if isinstance(value, str) and value:
        return value
    for value in data.values():
        if isinstance(value, str) and (
            Path(reference_name(value)).suffix.lower() in IMAGE_EXTENSIONS
            or value.startswith(("/data/", "s3://", "gs://", "azure-blob://", "http://", "https://"))
        ):
            return value
    raise MosaicError(f"task {task['id']}: no image URL in the task data ({sorted(data)})")


def reference_name(reference: str) -> str:
    """The file name in an image reference.

    ``/data/upload/3/ab12cd34-foo.jpg`` -> ``ab12cd34-foo.jpg``;
    ``/data/local-files/?d=dir/foo.jpg`` -> ``foo.jpg``; ``s3://b/k/foo.jpg`` -> ``foo.jpg``.
    """
    parsed = urlparse(reference)
    local = parse_qs(parsed.query).get("d")
    path = local[-1] if local else unquote(parsed.path)
    return path.rstrip("/").rsplit("/", 1)[-1]


def strip_upload_prefix(name: str) -> str:
    """``ab12cd34-foo.jpg`` -> ``foo.jpg``: the name before Label Studio's upload prefix."""
    match = UPLOAD_PREFIX.match(name)
    return match.group(1) if match else name


def folder_resolver(folder: str | os.PathLike) -> ImageResolver:
    """Find task images in a folder by file name: the exact name first, then the name without
    Label Studio's upload prefix ("ab12cd34-foo.jpg" -> "foo.jpg")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MosaicError(f"{folder}: image folder not found")
    files = {p.name: p for p in folder.iterdir() if p.is_file()}

    def resolve(task_id: Any, reference: str) -> Path:
        name = reference_name(reference)
        tried = [name]
        stripped = strip_upload_prefix(name)
        if stripped != name:
            tried.append(stripped)
        for candidate in tried:
            if candidate in files:
                return files[candidate]
        names = " or ".join(repr(n) for n in tried)
        raise MosaicError(f"task {task_id}: image {names} not found in {folder}")

    return resolve


# --------------------------------------------------------------------------------------------
# Regions -> tesserae
# --------------------------------------------------------------------------------------------
def tessera_regions(
    results: Iterable[dict[str, Any]], labels: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The brush and polygon results of an annotation that hold tesserae, in result order.

    With ``labels``, only regions carrying one of those labels count. A region's labels are in
    its value (``brushlabels``/``polygonlabels``/``labels``) or, for a plain ``brush``/``polygon``
    tool paired with a ``Labels`` tag, in the ``labels`` result with the same region id.
    """
    results = list(results)
    side_labels: dict[Any, list[str]] = {}
    for r in results:
        if r.get("type") == "labels":
            side_labels.setdefault(r.get("id"), []).extend(r.get("value", {}).get("labels", []))
    wanted = set(labels) if labels else None
    regions = []
    for r in results:
        rtype = r.get("type")
        if rtype not in TESSERA_TYPES:
            continue
        value = r.get("value") or {}
        names = list(value.get(rtype, [])) if rtype.endswith("labels") else []
        names += value.get("labels", [])
        names += side_labels.get(r.get("id"), [])
        if wanted is None or wanted.intersection(names):
            regions.append(r)
    return regions


def rasterise_region(task_id: Any, region: dict[str, Any], width: int, height: int) -> np.ndarray:
    """A region as a boolean (height, width) mask.

    Brush: the SDK decodes the RLE to a flat RGBA array of height*width*4 values; a pixel is
    painted when its alpha is non-zero (as in the SDK's own brush-to-COCO converter).
    Polygon: vertices in percent of the image; a pixel belongs to the polygon when its centre lies
    inside (pixel (c, r) covers [c, c+1) x [r, r+1)), so polygons sharing an edge do not overlap.
    """
    where = f"task {task_id}: region {region.get('id')}"
    value = region.get("value") or {}
    if TESSERA_TYPES[region["type"]] == "brush":
        rle = value.get("rle", region.get("rle"))
        if not rle:
            raise MosaicError(f"{where}: brush region without RLE data")
        if not isinstance(rle, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in rle
        ):
            raise MosaicError(f"{where}: brush RLE must be a list of byte values (0-255)")
        if len(rle) < 7:
            raise MosaicError(f"{where}: brush RLE is {len(rle)} bytes, shorter than its header")
        declared = int.from_bytes(bytes(rle[:4]), "big")  # the first 32 bits: the value count
        if declared != width * height * 4:
            raise MosaicError(
                f"{where}: brush RLE declares {declared} values, expected {width * height * 4} "
                f"(width {width} x height {height} x 4 channels)"
            )
        try:
            flat = decode_rle(rle)
        except (ValueError, IndexError, TypeError, OverflowError) as exc:
            raise MosaicError(f"{where}: cannot decode the brush RLE ({exc})") from exc
        if flat.size != width * height * 4:
            raise MosaicError(
                f"{where}: brush RLE holds {flat.size} values, expected {width * height * 4} "
                f"(width {width} x height {height} x 4 channels)"
            )
        return flat.reshape(height, width, 4)[:, :, 3] > 0

    points = value.get("points")
    try:
        xy = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MosaicError(f"{where}: polygon points are not numbers") from exc
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) < 3:
        raise MosaicError(f"{where}: a polygon needs at least 3 [x, y] points")
    if not np.all(np.isfinite(xy)):
        raise MosaicError(f"{where}: polygon points are not finite numbers")
    tol_x = POLYGON_TOLERANCE_PX / width * 100
    tol_y = POLYGON_TOLERANCE_PX / height * 100
    bad = (xy[:, 0] < -tol_x) | (xy[:, 0] > 100 + tol_x) | (xy[:, 1] < -tol_y) | (xy[:, 1] > 100 + tol_y)
    if bad.any():
        x, y = xy[np.argmax(bad)]
        raise MosaicError(f"{where}: polygon point ({x:g}%, {y:g}%) lies outside the image")
    # percent -> continuous pixel coordinates -> pixel-centre indices
    cols = xy[:, 0] / 100 * width - 0.5
    rows = xy[:, 1] / 100 * height - 0.5
    mask = np.zeros((height, width), dtype=bool)
    rr, cc = polygon_pixels(rows, cols, shape=(height, width))
    mask[rr, cc] = True
    return mask


def assemble_instances(masks: Iterable[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance map from region masks: each region's 4-connected components become tesserae.

    Pixels already claimed by an earlier tessera stay with it; the components are taken after
    removing those pixels, so every id is one 4-connected piece. Ids are 1..N in raster order.
    """
    instances = np.zeros(shape, dtype=np.int32)
    next_id = 1
    for mask in masks:
        free = mask & (instances == 0)
        pieces, n = label_components(free)
        if n:
            instances[free] = pieces[free] + (next_id - 1)
            next_id += n
    return relabel_sequential(instances)


def annotation_instances(
    task_id: Any,
    regions: Sequence[dict[str, Any]],
    width: int,
    height: int,
    image_name: str,
) -> np.ndarray:
    """The instance map of a task's tessera regions on a width x height image.

    Checks that every region was drawn on an image of that size. Sizes, percentages and RLE are
    in the displayed frame (EXIF orientation applied: ``imageio``), as the editor shows the
    image. ``image_rotation`` (the editor's rotate button) needs no mapping: Label Studio 1.23
    rotates only the view (its canvas; clicks are mapped back through the inverse transform)
    and stores every result in the image's own frame, recording the view's angle in
    ``image_rotation`` without ever reading it back (label-studio
    web/libs/editor/src/tags/object/Image/Image.js, ``createSerializedResult``).
    """
    for r in regions:
        ow, oh = r.get("original_width"), r.get("original_height")
        if ow is not None and oh is not None and (int(ow), int(oh)) != (width, height):
            turned = (int(ow), int(oh)) == (height, width)
            raise MosaicError(
                f"task {task_id}: region {r.get('id')} was drawn on a {ow}x{oh} image but "
                f"{image_name} is {width}x{height}"
                + (" (turned by 90 degrees: this image file's EXIF orientation differs from the "
                   "one Label Studio showed)" if turned else "")
            )
    masks = (rasterise_region(task_id, r, width, height) for r in regions)
    return assemble_instances(masks, (height, width))


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------
def coco_annotations(instances: np.ndarray, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """One COCO instance annotation (RLE segmentation, area, bbox) per tessera id 1..N."""
    height, width = instances.shape
    scratch = np.zeros((height, width), dtype=np.uint8, order="F")
    out = []
    for idx, sl in enumerate(ndi.find_objects(instances), start=1):
        if sl is None:
            continue
        scratch[sl] = instances[sl] == idx
        rle = coco_mask.encode(scratch)
        scratch[sl] = 0
        out.append(
            {
                "id": first_id + len(out),
                "image_id": image_id,
                "category_id": 1,
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                "area": int(coco_mask.area(rle)),
                "bbox": [float(v) for v in coco_mask.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    return out


def _write_coco(path: Path, out: Path, tmp_root: Path, coco: dict[str, Any]) -> None:
    """Write the COCO file atomically; inside OUT it goes into the folder being built."""
    try:
        target = tmp_root / path.resolve().relative_to(out.resolve())
    except ValueError:
        target = path
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(coco) + "\n")


# --------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------
def _safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._")
    return stem or "image"


def export_dataset(
    tasks: Sequence[dict[str, Any]],
    resolve_image: ImageResolver,
    out: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    coco: str | os.PathLike | None = None,
    overwrite: bool = False,
    project: Any = None,
    image_key: str = "image",
    partial: bool = False,
) -> ExportSummary:
    """Write one dataset sample per annotated task (and optionally a COCO instances file).

    ``resolve_image(task_id, reference)`` returns the local image file of a task; the image is
    copied byte for byte. Stems are ``task<id>_<image name>``. Returns what was written and which
    tasks were skipped (no annotation, all cancelled, no tessera regions).

    Crop tasks of a large mosaic (``mosaic-toolkit tasks``: ``meta.mosaic_crop``) become one
    sample per mosaic, ``mosaic_<name>`` (``_export_mosaic``): its pixels put back together from
    the crops, its tesserae stitched (``tasks.stitch``). A mosaic with unannotated crops is
    skipped and reported, or with ``partial`` exported with ``unknown/<stem>.png`` marking
    (255) the area nobody annotated.
    """
    out = Path(out)
    summary = ExportSummary()
    coco_images: list[dict[str, Any]] = []
    coco_anns: list[dict[str, Any]] = []
    mosaics = summarise_crops(tasks)
    tasks = [t for t in tasks if task_crop(t) is None]
    with atomic_output_dir(out, overwrite=overwrite) as root:
        for group in mosaics.values():
            sample = _export_mosaic(group, resolve_image, root, labels, partial, project, image_key, summary)
            if sample is not None and coco is not None:
                instances = read_instances(root / "instances" / f"{sample.stem}.png")
                image_id = len(coco_images) + 1
                coco_images.append({"id": image_id, "file_name": sample.image, "width": sample.width,
                                    "height": sample.height})
                coco_anns += coco_annotations(instances, image_id, len(coco_anns) + 1)
        for task in tqdm(tasks, desc="export", unit="task", disable=None):
            task_id = task["id"]
            try:
                annotation, reason = choose_annotation(task)
                regions = tessera_regions(check_annotation(task_id, annotation), labels) if annotation else []
            except (TypeError, AttributeError, ValueError, KeyError, OverflowError) as exc:  # a backstop
                raise MosaicError(f"task {task_id}: malformed annotation ({type(exc).__name__}: {exc})") from exc
            if annotation is not None and not regions:
                reason = "no tessera regions" + (f" labelled {', '.join(labels)}" if labels else "")
            if reason:
                summary.skipped.append(Skipped(task_id, reason))
                continue
            reference = image_reference(task, image_key)
            try:
                name = reference_name(reference)
            except ValueError as exc:  # urllib: e.g. "http://[::1"
                raise MosaicError(f"task {task_id}: image reference {reference[:200]!r} is not a URL ({exc})") from exc
            path = resolve_image(task_id, reference)
            try:
                height, width = read_image(path).shape[:2]
            except MosaicError as exc:
                raise MosaicError(f"task {task_id}: {exc}") from exc
            try:
                instances = annotation_instances(task_id, regions, width, height, name)
            except (TypeError, AttributeError, ValueError, KeyError, OverflowError, IndexError) as exc:
                raise MosaicError(f"task {task_id}: malformed region ({type(exc).__name__}: {exc})") from exc
            if not instances.any():
                summary.skipped.append(Skipped(task_id, "tessera regions are empty"))
                continue
            source = {"task": task_id, "annotation": annotation.get("id"), "image": name}
            if project is not None or task.get("project") is not None:
                source["project"] = project if project is not None else task.get("project")
            stem = f"task{task_id}_{_safe_stem(strip_upload_prefix(name))}"
            sample = write_sample(root, stem, path, instances, source=source, relabel=False)
            summary.samples.append(sample)
            if coco is not None:
                image_id = len(coco_images) + 1
                coco_images.append(
                    {"id": image_id, "file_name": sample.image, "width": width, "height": height}
                )
                coco_anns += coco_annotations(instances, image_id, len(coco_anns) + 1)
        write_manifest(
            root,
            summary.samples,
            source="label-studio",
            labels=list(labels) if labels else None,
            skipped=[{"task": s.task, "reason": s.reason} for s in summary.skipped],
        )
        if coco is not None:
            document = {
                "info": {"description": "Tesserae exported from Label Studio by mosaic-toolkit"},
                "images": coco_images,
                "annotations": coco_anns,
                "categories": [{"id": 1, "name": "tessera", "supercategory": "mosaic"}],
            }
            _write_coco(Path(coco), out, root, document)
    return summary


def _export_mosaic(
    group: list[tuple[dict[str, Any], dict[str, Any]]],
    resolve_image: ImageResolver,
    root: Path,
    labels: Sequence[str] | None,
    partial: bool,
    project: Any,
    image_key: str,
    summary: ExportSummary,
) -> Sample | None:
    """One whole-mosaic sample from the crop tasks of one mosaic (see ``export_dataset``)."""
    meta = group[0][1]
    name = str(meta["mosaic"])
    height, width = meta["mosaic_height"], meta["mosaic_width"]
    plan = expected_crops(meta)
    by_box: dict[tuple[int, int, int, int], list[dict[str, Any]]] = {}
    for task, m in group:
        box = (m["y"], m["x"], m["y"] + m["height"], m["x"] + m["width"])
        if box not in plan:
            raise MosaicError(f"task {task['id']}: crop {box} is not one of mosaic {name}'s crops")
        by_box.setdefault(box, []).append(task)
    image = np.zeros((height, width, 3), np.uint8)
    seen = np.zeros((height, width), bool)
    crops: dict[tuple[int, int, int, int], np.ndarray] = {}
    unannotated: list[str] = []
    used: list[Any] = []
    for box in plan:
        y0, x0, y1, x1 = box
        candidates = by_box.get(box, [])
        if not candidates:
            unannotated.append(f"crop at x={x0}, y={y0} (no task)")
            continue
        chosen = []
        for task in candidates:
            annotation, _ = choose_annotation(task)
            if annotation is not None:
                chosen.append((task, annotation))
        task = candidates[0]
        if chosen:  # several tasks for one crop (imported twice): the annotation that counts
            task, annotation = max(chosen, key=lambda ta: (bool(ta[1].get("ground_truth")),
                                                           _timestamp(ta[0]["id"], ta[1])))
        reference = image_reference(task, image_key)
        path = resolve_image(task["id"], reference)
        try:
            pixels = read_image(path)
        except MosaicError as exc:
            raise MosaicError(f"task {task['id']}: {exc}") from exc
        if pixels.shape[:2] != (y1 - y0, x1 - x0):
            raise MosaicError(f"task {task['id']}: crop image {reference_name(reference)} is "
                              f"{pixels.shape[1]}x{pixels.shape[0]}, its task says {x1 - x0}x{y1 - y0}")
        image[y0:y1, x0:x1] = pixels
        seen[y0:y1, x0:x1] = True
        if not chosen:
            unannotated.append(f"task {task['id']}")
            continue
        regions = tessera_regions(annotation.get("result") or [], labels)
        crops[box] = annotation_instances(task["id"], regions, x1 - x0, y1 - y0, reference_name(reference))
        used.append(task["id"])
    if unannotated and not partial:
        summary.skipped.append(Skipped(
            f"mosaic {name}", f"{len(unannotated)} of {len(plan)} crops not annotated "
            f"({', '.join(unannotated[:10])}{', ...' if len(unannotated) > 10 else ''}); "
            "annotate them or export with --partial"))
        return None
    if not crops:
        summary.skipped.append(Skipped(f"mosaic {name}", "no crop is annotated"))
        return None
    instances, unknown = stitch(meta, crops)
    unknown |= ~seen
    stem = f"mosaic_{_safe_stem(name)}"
    source: dict[str, Any] = {"mosaic": name, "tasks": used, "crops": len(plan),
                              "annotated_crops": len(crops)}
    if project is not None or group[0][0].get("project") is not None:
        source["project"] = project if project is not None else group[0][0].get("project")
    if unknown.any():
        source["unknown"] = f"unknown/{stem}.png"
        source["unknown_fraction"] = round(float(unknown.mean()), 4)
        write_mask(root / "unknown" / f"{stem}.png", np.where(unknown, 255, 0).astype(np.uint8))
    sample = write_sample(root, stem, image, relabel_sequential(instances), source=source, relabel=False)
    summary.samples.append(sample)
    if unannotated:
        summary.skipped.append(Skipped(
            f"mosaic {name}", f"exported partially: {len(unannotated)} of {len(plan)} crops not "
            f"annotated ({', '.join(unannotated[:10])}); their area is marked unknown"))
    return sample


# --------------------------------------------------------------------------------------------
# Pulling from a running Label Studio
# --------------------------------------------------------------------------------------------
def _client(url: str, api_key: str):
    # imported here: the client adds ~1.5 s of imports that the file path does not need
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url, api_key=api_key)


SDK_IO_LOGGER = "label_studio_sdk._extensions.label_studio_tools.core.utils.io"


@contextlib.contextmanager
def _dropping(logger_name: str, fragment: str) -> Iterator[None]:
    """While inside: drop the warnings of ``logger_name`` whose message holds ``fragment``."""
    def keep(record: logging.LogRecord) -> bool:
        return record.levelno != logging.WARNING or fragment not in record.getMessage()

    logger = logging.getLogger(logger_name)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _api_error_detail(body: Any) -> str:
    """The reason in a Label Studio error body, on one line: the JSON ``detail`` if there is
    one; nothing for an HTML page (an unknown project answers 404 with the web app's page)."""
    if isinstance(body, dict):
        body = body.get("detail") or body
    text = " ".join(str(body or "").split())
    return "" if text.startswith("<") else text


def fetch_tasks(url: str, api_key: str, project: int) -> list[dict[str, Any]]:
    """All tasks of a project (annotated or not) as a JSON export, through label-studio-sdk."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        data = _client(url, api_key).projects.exports.as_json(project)
    except ApiError as exc:
        detail = _api_error_detail(exc.body) or ("not found" if exc.status_code == 404 else "")
        raise MosaicError(
            f"{url}: cannot export project {project} (HTTP {exc.status_code}"
            + (f": {detail})" if detail else ")")
        ) from exc
    except httpx.HTTPError as exc:
        raise MosaicError(f"{url}: cannot reach Label Studio ({exc})") from exc
    except ValueError as exc:
        raise MosaicError(f"{url}: project {project}: the export is not valid JSON ({exc})") from exc
    return check_tasks(data, f"{url} project {project}")


def label_studio_resolver(url: str, api_key: str, cache_dir: str | os.PathLike) -> ImageResolver:
    """Download task images from Label Studio into ``cache_dir``.

    Uses the SDK's ``get_local_path``, which knows every kind of task URL (uploads, local
    storage, cloud storage through the presign endpoint, plain http) and sends the API key only
    to the Label Studio host. A personal access token (JWT) is exchanged for an access token.
    """
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
        get_local_path,
        is_jwt_well_formed,
    )
    import httpx
    import requests
    from label_studio_sdk.core.api_error import ApiError

    token = api_key
    if is_jwt_well_formed(api_key):
        try:
            token = _client(url, api_key).tokens.refresh(refresh=api_key).access
        except (ApiError, httpx.HTTPError) as exc:
            raise MosaicError(f"{url}: cannot exchange the personal access token ({exc})") from exc

    downloads = 0

    def resolve(task_id: Any, reference: str) -> Path:
        nonlocal downloads
        # the SDK warns about a `localhost` URL on every download: let it through once
        quiet = _dropping(SDK_IO_LOGGER, "localhost") if downloads else contextlib.nullcontext()
        downloads += 1
        try:
            with quiet:
                path = get_local_path(
                    reference, cache_dir=str(cache_dir), hostname=url, access_token=token,
                    task_id=task_id,
                )
        except (requests.RequestException, OSError, ValueError) as exc:
            raise MosaicError(f"task {task_id}: cannot download image {reference} ({exc})") from exc
        return Path(path)

    return resolve


# --------------------------------------------------------------------------------------------
# Entry point for the CLI
# --------------------------------------------------------------------------------------------
def export(
    out: str | os.PathLike,
    *,
    export_json: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    url: str | None = None,
    api_key: str | None = None,
    project: int | None = None,
    labels: Sequence[str] | None = None,
    coco: str | os.PathLike | None = None,
    overwrite: bool = False,
    partial: bool = False,
) -> ExportSummary:
    """Export from a JSON file plus an image folder, or from a running Label Studio project."""
    options = {"labels": labels, "coco": coco, "overwrite": overwrite, "partial": partial}
    if export_json is not None:
        if url is not None:
            raise MosaicError("give either an export file or --url, not both")
        if images is None:
            raise MosaicError(f"{export_json}: --images is required with an export file")
        tasks = load_export(export_json)
        return export_dataset(tasks, folder_resolver(images), out, project=project, **options)
    if url is None or api_key is None or project is None:
        raise MosaicError("give an export file, or --url, --api-key and --project together")
    tasks = fetch_tasks(url, api_key, project)
    with tempfile.TemporaryDirectory(prefix="mosaic-ls-images-") as cache:
        resolver = label_studio_resolver(url, api_key, cache)
        return export_dataset(tasks, resolver, out, project=project, **options)
