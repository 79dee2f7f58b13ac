"""Label Studio results in and out: click prompts from a request's context, regions for masks.

Coordinates in Label Studio results are percentages of the image (``x`` of 100 is the right
border). A pixel ``(column c, row r)`` covers ``[c, c + 1) x [r, r + 1)`` in continuous
coordinates, the convention of the exporter (``mosaic_toolkit.data.export.rasterise_region``), so
polygons written here rasterise back to the same pixels there.

Brush masks are encoded with ``label_studio_sdk.converter.brush.mask2rle`` (never by hand).
Polygon outlines follow the boundary half way between a tessera's pixel centres and its
neighbours' (marching squares), so a polygon holds exactly the centres of its tessera's pixels;
the outline is then simplified by at most ``POLYGON_TOLERANCE`` pixels.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle
from scipy import ndimage as ndi
from skimage.measure import find_contours

from .errors import BackendError
from .labelconfig import Control, LabelConfig

PROMPT_TYPES = ("keypointlabels", "rectanglelabels")
POLYGON_TOLERANCE = 0.35  # px: outline simplification, below the 0.5 px margin to pixel centres
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


def outline(mask: np.ndarray) -> np.ndarray | None:
    """The outer outline of a boolean mask as K x 2 continuous [x, y] pixel coordinates (module
    docstring), or None when it has fewer than three corners."""
    padded = np.pad(mask.astype(np.float32), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return None
    longest = max(contours, key=len)  # the outer boundary (holes are shorter)
    xy = np.stack([longest[:, 1], longest[:, 0]], axis=1) - 0.5  # padded index -> continuous
    simple = cv2.approxPolyDP(xy.astype(np.float32)[:, None, :], POLYGON_TOLERANCE, True)[:, 0, :]
    return simple.astype(np.float64) if len(simple) >= 3 else None


def polygon_value(mask: np.ndarray, offset: tuple[int, int], shape: tuple[int, int], label: str
                  ) -> dict[str, Any] | None:
    """A PolygonLabels value for a tessera mask cropped at ``offset`` = (row, col)."""
    xy = outline(mask)
    if xy is None:
        return None
    height, width = shape
    xs = np.clip((xy[:, 0] + offset[1]) / width * 100, 0, 100)
    ys = np.clip((xy[:, 1] + offset[0]) / height * 100, 0, 100)
    points = [[round(float(x), PERCENT_DIGITS), round(float(y), PERCENT_DIGITS)] for x, y in zip(xs, ys)]
    return {"points": points, "closed": True, "polygonlabels": [label]}


def polygon_region(config: LabelConfig, control: Control, mask: np.ndarray, label: str,
                   score: float | None = None) -> dict[str, Any] | None:
    """A PolygonLabels result for the largest piece of a boolean mask of the whole image."""
    pieces, n = ndi.label(mask)
    if n == 0:
        return None
    if n > 1:
        mask = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
    sl = ndi.find_objects(mask.astype(np.int32))[0]
    value = polygon_value(mask[sl], (sl[0].start, sl[1].start), mask.shape, label)
    return None if value is None else _region(config, control, "polygonlabels", mask.shape, value, score)


def instance_regions(config: LabelConfig, control: Control, instances: np.ndarray, label: str,
                     scores: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """One region per tessera id 1..N of an instance map: polygons for a PolygonLabels
    control, brush masks otherwise. ``scores[i]`` belongs to tessera ``i + 1``."""
    shape = instances.shape
    regions = []
    for k, sl in enumerate(ndi.find_objects(instances), start=1):
        if sl is None:
            continue
        score = None if scores is None else scores[k - 1]
        if control.tag == "PolygonLabels":
            value = polygon_value(instances[sl] == k, (sl[0].start, sl[1].start), shape, label)
            if value is not None:
                regions.append(_region(config, control, "polygonlabels", shape, value, score))
        else:
            regions.append(brush_region(config, control, instances == k, label, score))
    return regions


def mean_score(scores: Iterable[float] | None) -> float | None:
    values = [float(s) for s in scores or ()]
    return round(sum(values) / len(values), 4) if values else None
