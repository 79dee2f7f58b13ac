"""Label Studio results in and out: click prompts from a request's context, regions for masks.

Coordinates in Label Studio results are percentages of the image (``x`` of 100 is the right
border). A pixel ``(column c, row r)`` covers ``[c, c + 1) x [r, r + 1)`` in continuous
coordinates, the convention of the exporter (``mosaic_toolkit.data.export.rasterise_region``), so
polygons written here rasterise back to the same pixels there.

Brush masks are encoded with ``label_studio_sdk.converter.brush.mask2rle`` (never by hand).
Polygons are light (``mosaic_toolkit.core.polygons``): each tessera's outline with the fewest
vertices that keep its IoU with the tessera's pixels at the fineness MOSAIC_BACKEND_POLYGON_IOU
(0.97: about 8-16 vertices for a 33-px tile instead of ~90), simple, and never holding a
neighbour's pixel centre.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from label_studio_sdk.converter.brush import mask2rle
from mosaic_toolkit.core.polygons import DEFAULT_IOU, instance_polygons, to_percent
from scipy import ndimage as ndi

from .errors import BackendError
from .labelconfig import Control, LabelConfig

PROMPT_TYPES = ("keypointlabels", "rectanglelabels")
PERCENT_DIGITS = 4  # decimals of percentages in polygons (1e-4 % of 10 000 px = 0.01 px)


@dataclass
class Prompt:
    """The prompts of one interactive request, in pixel coordinates of the image."""

    points: np.ndarray  # N x 2 float [x, y]
    labels: np.ndarray  # N ints: 1 positive, 0 negative
    box: np.ndarray | None  # [x0, y0, x1, y1] or None
    label: str | None  # the label of the clicked tool (e.g. "Tessera")

    @property
    def positives(self) -> np.ndarray:
        return self.points[self.labels == 1]

    @property
    def negatives(self) -> np.ndarray:
        return self.points[self.labels == 0]


def region_id() -> str:
    """A fresh region id like Label Studio's own (10 URL-safe characters)."""
    return secrets.token_urlsafe(8)[:10]


# --------------------------------------------------------------------------------------------
# Context -> prompts
# --------------------------------------------------------------------------------------------
def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BackendError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def parse_context(context: Any, config: LabelConfig, width: int, height: int, task_id: Any) -> Prompt:
    """Keypoints and rectangles of a request's ``context`` as one prompt.

    Every ``keypointlabels`` item is a point, positive unless ``is_positive`` is false (Label
    Studio's Alt-click); a ``rectanglelabels`` item is a box (rotated boxes become their
    bounding box; with several, the last one counts). Items of other types (regions Label
    Studio may send along) are skipped without being looked at. A point outside the image, a
    box that misses it, or a context without any prompt is a 400 error.
    """
    where = f"task {task_id}: context"
    if not isinstance(context, dict):
        raise BackendError(f"{where}: expected an object with a 'result' list, got {type(context).__name__}")
    items = context.get("result")
    if not isinstance(items, list):
        raise BackendError(f"{where}: 'result' must be a list of keypoint or rectangle results")
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    box = None
    label = None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BackendError(f"{where}.result[{i}]: expected an object, got {type(item).__name__}")
        kind = item.get("type")
        if kind not in PROMPT_TYPES:
            continue
        if item.get("to_name") not in (None, config.image_name):
            continue
        at = f"{where}.result[{i}]"
        value = item.get("value")
        if not isinstance(value, dict):
            raise BackendError(f"{at}.value: expected an object with x and y")
        x = _number(f"{at}.value.x", value.get("x"))
        y = _number(f"{at}.value.y", value.get("y"))
        names = value.get(kind)
        if isinstance(names, list) and names and isinstance(names[0], str):
            label = names[0]
        if kind == "keypointlabels":
            if not (0 <= x <= 100 and 0 <= y <= 100):
                raise BackendError(f"{at}: click at ({x:g}%, {y:g}%) lies outside the image")
            positive = item.get("is_positive", True)
            if not isinstance(positive, bool):
                raise BackendError(f"{at}.is_positive: expected true or false, got {positive!r}")
            points.append((min(x / 100 * width, width - 1e-3), min(y / 100 * height, height - 1e-3)))
            labels.append(1 if positive else 0)
        else:
            box = _box(at, value, x, y, width, height)
    if not points and box is None:
        raise BackendError(f"{where}: no keypoint or rectangle prompt for image "
                           f"{config.image_name!r} (types {', '.join(PROMPT_TYPES)})")
    return Prompt(np.asarray(points, np.float64).reshape(-1, 2), np.asarray(labels, np.int64), box, label)


def _box(at: str, value: dict, x: float, y: float, width: int, height: int) -> np.ndarray:
    """A rectangle result's bounding box in pixels, clipped to the image."""
    w = _number(f"{at}.value.width", value.get("width"))
    h = _number(f"{at}.value.height", value.get("height"))
    angle = math.radians(_number(f"{at}.value.rotation", value.get("rotation", 0)))
    if w <= 0 or h <= 0:
        raise BackendError(f"{at}: the box has no area (width {w:g}%, height {h:g}%)")
    # Label Studio rotates a box clockwise about its top-left corner, in pixel space.
    wx, hy = w / 100 * width, h / 100 * height
    corners = np.array([[0, 0], [wx, 0], [wx, hy], [0, hy]], np.float64)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    corners = corners @ rot.T + [x / 100 * width, y / 100 * height]
    if not np.isfinite(corners).all():  # e.g. a width of 1e308 %: infinite in pixels
        raise BackendError(f"{at}: the box ({x:g}%, {y:g}%, {w:g}% x {h:g}%) is out of range")
    x0, y0 = corners.min(0)
    x1, y1 = corners.max(0)
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise BackendError(f"{at}: the box ({x:g}%, {y:g}%, {w:g}% x {h:g}%) lies outside the image")
    return np.array([max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)], np.float64)


# --------------------------------------------------------------------------------------------
# Masks -> regions
# --------------------------------------------------------------------------------------------
def _region(config: LabelConfig, control: Control, kind: str, shape: tuple[int, int],
            value: dict[str, Any], score: float | None) -> dict[str, Any]:
    height, width = shape
    region = {
        "id": region_id(), "from_name": control.name, "to_name": config.image_name, "type": kind,
        "original_width": int(width), "original_height": int(height), "image_rotation": 0,
        "value": value, "readonly": False,
    }
    if score is not None:
        region["score"] = round(float(score), 4)
    return region


def brush_region(config: LabelConfig, control: Control, mask: np.ndarray, label: str,
                 score: float | None = None) -> dict[str, Any]:
    """A BrushLabels result for a boolean mask of the whole image (RLE by the SDK)."""
    rle = mask2rle(np.where(mask, 255, 0).astype(np.uint8))
    return _region(config, control, "brushlabels", mask.shape,
                   {"format": "rle", "rle": rle, "brushlabels": [label]}, score)


def polygon_regions(config: LabelConfig, control: Control, mask: np.ndarray, label: str,
                    score: float | None = None, iou: float = DEFAULT_IOU) -> list[dict[str, Any]]:
    """PolygonLabels results for a boolean mask of the whole image: one light polygon per
    4-connected piece (a box can select several tesserae), none of them taking another
    piece's pixels."""
    pieces, n = ndi.label(mask)
    if n == 0:
        return []
    regions = []
    for k, xy in instance_polygons(pieces, iou).items():
        height, width = mask.shape
        value = {"points": to_percent(xy, width, height, PERCENT_DIGITS), "closed": True,
                 "polygonlabels": [label]}
        regions.append(_region(config, control, "polygonlabels", mask.shape, value, score))
    return regions


def instance_regions(config: LabelConfig, control: Control, instances: np.ndarray, label: str,
                     scores: Sequence[float] | None = None, iou: float = DEFAULT_IOU
                     ) -> list[dict[str, Any]]:
    """One region per tessera id 1..N of an instance map: light polygons (no polygon takes a
    neighbour's pixel) for a PolygonLabels control, brush masks otherwise. ``scores[i]``
    belongs to tessera ``i + 1``."""
    shape = instances.shape
    regions = []
    if control.tag == "PolygonLabels":
        height, width = shape
        for k, xy in instance_polygons(instances, iou).items():
            score = None if scores is None else scores[k - 1]
            value = {"points": to_percent(xy, width, height, PERCENT_DIGITS), "closed": True,
                     "polygonlabels": [label]}
            regions.append(_region(config, control, "polygonlabels", shape, value, score))
        return regions
    for k, sl in enumerate(ndi.find_objects(instances), start=1):
        if sl is None:
            continue
        score = None if scores is None else scores[k - 1]
        regions.append(brush_region(config, control, instances == k, label, score))
    return regions


def polygon_vertices(regions: Iterable[dict[str, Any]]) -> list[int]:
    """Vertices of each polygon region (for the backend's metrics)."""
    return [len(r["value"]["points"]) for r in regions if r.get("type") == "polygonlabels"]


def mean_score(scores: Iterable[float] | None) -> float | None:
    values = [float(s) for s in scores or ()]
    return round(sum(values) / len(values), 4) if values else None
