"""Light polygons: each tessera's outline with the fewest vertices that still fit its pixels.

Coordinates are continuous pixel coordinates ``[x, y]``: pixel ``(column c, row r)`` covers
``[c, c + 1) x [r, r + 1)``, and a polygon holds a pixel when the pixel's centre lies inside it
(the rule of ``mosaic_toolkit.data.export.rasterise_region``, which ``rasterise`` here shares), so a
polygon made here exports back to the pixels it was measured on.

``simplify`` starts from the exact outline (marching squares half way between a tessera's pixel
centres and its neighbours': it holds exactly the centres of the tessera's pixels) and looks for
the fewest vertices that keep

* the IoU between the polygon's pixels and the tessera's pixels at or above ``iou`` (the
  fineness; ``DEFAULT_IOU`` = 0.97, a 33-px tile then needs about 8-16 vertices instead of ~90),
* the polygon simple (no two edges cross or touch, except neighbouring edges at their vertex),
* every pixel centre of another tessera (``forbidden``) outside it, so two neighbours' polygons
  overlap by less than one pixel row (only in the strip between their pixel centres).

The search: Douglas-Peucker (``cv2.approxPolyDP``) at the largest tolerance that passes, found by
bisection, then a greedy pass removing, one at a time, the vertex whose triangle is smallest as
long as the checks pass. When even the exact outline misses the fineness (a tessera of a few
pixels), the exact outline is kept: it is the best polygon there is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
from scipy import ndimage as ndi
from matplotlib.path import Path as _Path  # at import: a lazy import raced in server threads
from skimage.measure import find_contours

DEFAULT_IOU = 0.97
MIN_TOLERANCE = 0.35  # px: the finest Douglas-Peucker step (below the 0.5 px margin to centres)
BISECTION_STEPS = 6
MAX_REMOVALS = 8  # greedy pass: at most this many vertex removals tried per polygon


def check_iou(iou: float) -> float:
    """``iou`` as a float in (0, 1]; a ValueError naming the allowed range otherwise."""
    value = float(iou)
    if not (0 < value <= 1):
        raise ValueError(f"polygon fineness (IoU) must lie in (0, 1], got {iou!r}")
    return value


def outline(mask: np.ndarray) -> np.ndarray | None:
    """The exact outer outline of a boolean mask as K x 2 ``[x, y]`` (module docstring), or
    None when the mask is empty."""
    padded = np.pad(np.asarray(mask, np.float32), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return None
    longest = max(contours, key=len)  # the outer boundary (holes are shorter)
    xy = np.stack([longest[:, 1], longest[:, 0]], axis=1) - 0.5  # padded index -> continuous
    if len(xy) > 1 and np.allclose(xy[0], xy[-1]):
        xy = xy[:-1]
    # drop the collinear midpoints of straight runs (exact: the shape does not change)
    prev, nxt = np.roll(xy, 1, axis=0), np.roll(xy, -1, axis=0)
    cross = (xy[:, 0] - prev[:, 0]) * (nxt[:, 1] - xy[:, 1]) - (xy[:, 1] - prev[:, 1]) * (nxt[:, 0] - xy[:, 0])
    keep = np.abs(cross) > 1e-9
    return xy[keep] if keep.sum() >= 3 else xy


def rasterise(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The pixels of ``shape`` whose centres lie inside the polygon ``xy`` (export's rule).

    The even-odd crossing test of ``skimage.draw.polygon`` (which ``export`` uses), vectorised
    over the polygon's bounding box with the same arithmetic, so ties on an edge go the same way.
    """
    mask = np.zeros(shape, bool)
    cols = np.asarray(xy[:, 0], np.float64) - 0.5  # pixel-centre indices
    rows = np.asarray(xy[:, 1], np.float64) - 0.5
    r0, r1 = max(int(math.ceil(rows.min())), 0), min(int(math.floor(rows.max())), shape[0] - 1)
    c0, c1 = max(int(math.ceil(cols.min())), 0), min(int(math.floor(cols.max())), shape[1] - 1)
    if r1 < r0 or c1 < c0:
        return mask
    # O'Rourke's crossing test (Computational Geometry in C, ch. 7), as skimage computes it,
    # row by row: edge (i - 1, i) crosses the row at x_at; a centre counts once for each
    # crossing to its right (and, to find centres on an edge, each crossing to its left)
    y = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]
    x = np.arange(c0, c1 + 1, dtype=np.float64)[None, :, None]
    y0, y1 = rows[None, :] - y, np.roll(rows, 1)[None, :] - y
    xa, xb = cols[None, :], np.roll(cols, 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = (xa * y1 - xb * y0) / (y1 - y0)
    right = np.where((y0 > 0) != (y1 > 0), x_at, -np.inf)[:, None, :]
    left = np.where((y0 < 0) != (y1 < 0), x_at, np.inf)[:, None, :]
    inside = ((np.count_nonzero(x < right, axis=2) | np.count_nonzero(x > left, axis=2)) & 1).astype(bool)
    vertex = np.zeros_like(inside)
    on = (np.abs(y0[:, 0:1] * 0 + y0) < 1e-12)  # rows holding a vertex
    for r, i in zip(*np.nonzero(on)):
        c = cols[i] - c0
        if abs(c - round(c)) < 1e-12 and 0 <= round(c) < vertex.shape[1]:
            vertex[r, int(round(c))] = True
    inside |= vertex
    mask[r0:r1 + 1, c0:c1 + 1] = inside
    return mask


def is_simple(xy: np.ndarray) -> bool:
    """Whether the closed polygon ``xy`` has at least 3 distinct vertices and no two edges
    meet except neighbouring edges at their shared vertex."""
    n = len(xy)
    if n < 3:
        return False
    a = np.asarray(xy, np.float64)
    b = np.roll(a, -1, axis=0)
    if np.any(np.all(np.isclose(a, b), axis=1)):
        return False
    i, j = np.triu_indices(n, 1)
    adjacent = (j == i + 1) | ((i == 0) & (j == n - 1))
    i, j = i[~adjacent], j[~adjacent]
    if i.size == 0:
        return abs(_area(a)) > 1e-9

    def orient(p, q, r):
        return np.sign((q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (r[:, 0] - p[:, 0]))

    p1, p2, q1, q2 = a[i], b[i], a[j], b[j]
    o1, o2, o3, o4 = orient(p1, p2, q1), orient(p1, p2, q2), orient(q1, q2, p1), orient(q1, q2, p2)
    proper = (o1 * o2 < 0) & (o3 * o4 < 0)

    def on_segment(p, q, r, o):  # r collinear with p-q and within its box
        return (o == 0) & (np.minimum(p[:, 0], q[:, 0]) <= r[:, 0]) & (r[:, 0] <= np.maximum(p[:, 0], q[:, 0])) \
            & (np.minimum(p[:, 1], q[:, 1]) <= r[:, 1]) & (r[:, 1] <= np.maximum(p[:, 1], q[:, 1]))

    touch = on_segment(p1, p2, q1, o1) | on_segment(p1, p2, q2, o2) | on_segment(q1, q2, p1, o3) \
        | on_segment(q1, q2, p2, o4)
    return not bool(np.any(proper | touch)) and abs(_area(a)) > 1e-9


def _area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def pixel_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


Snap = Callable[[np.ndarray], np.ndarray]


def percent_snap(width: int, height: int, offset: tuple[float, float] = (0.0, 0.0),
                 digits: int = 4) -> Snap:
    """Moves ``[x, y]`` (pixels, relative to ``offset`` in a ``width`` x ``height`` image) to
    where the polygon will be once written as Label Studio percentages with ``digits``
    decimals and read back by the exporter, so that the checks see the polygon it will get."""
    ox, oy = offset

    def snap(xy: np.ndarray) -> np.ndarray:
        xs = np.round(np.clip((xy[:, 0] + ox) / width * 100, 0, 100), digits) / 100 * width - ox
        ys = np.round(np.clip((xy[:, 1] + oy) / height * 100, 0, 100), digits) / 100 * height - oy
        return np.stack([xs, ys], axis=1)

    return snap


@dataclass
class _Fit:
    """Checks a candidate polygon against one tessera's pixels in a local crop.

    The search uses matplotlib's point-in-polygon test on the pixel centres (compiled, about
    four times faster than ``rasterise``; the two differ only for a centre exactly on an edge);
    the polygon kept is checked again with ``rasterise``, the exporter's rule (``exact``).
    """

    mask: np.ndarray  # the tessera, in the crop
    forbidden: np.ndarray | None  # other tesserae's pixels, in the crop
    iou: float

    def __post_init__(self) -> None:
        rows, cols = np.mgrid[0:self.mask.shape[0], 0:self.mask.shape[1]]
        self._centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)

    def _check(self, pixels: np.ndarray) -> bool:
        if self.forbidden is not None and np.any(pixels & self.forbidden):
            return False
        return pixel_iou(pixels, self.mask) >= self.iou

    def fits(self, xy: np.ndarray) -> bool:
        """IoU and neighbours, by the fast test (simplicity is checked once at the end)."""
        if len(xy) < 3:
            return False
        return self._check(_Path(xy).contains_points(self._centres).reshape(self.mask.shape))

    def exact(self, xy: np.ndarray) -> bool:
        """IoU and neighbours by the exporter's rule."""
        return len(xy) >= 3 and self._check(rasterise(xy, self.mask.shape))


def _dp(contour: np.ndarray, eps: float) -> np.ndarray:
    out = cv2.approxPolyDP(contour.astype(np.float32)[:, None, :], eps, True)[:, 0, :]
    return out.astype(np.float64)


def simplify(mask: np.ndarray, iou: float = DEFAULT_IOU, forbidden: np.ndarray | None = None,
             snap: Snap | None = None) -> np.ndarray | None:
    """The lightest polygon ``[x, y]`` (K x 2, coordinates of ``mask``) for the tessera
    ``mask`` (module docstring); ``forbidden`` marks other tesserae's pixels the polygon must
    not take; ``snap`` (``percent_snap``) moves every candidate to where it will be stored, so
    rounding cannot move a pixel centre across an edge afterwards. None when the mask is empty."""
    iou = check_iou(iou)
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    contour = outline(mask)
    if contour is None or len(contour) < 3:
        return None
    # work in a crop around the tessera, with room for vertices cutting corners outwards
    rows, cols = np.nonzero(mask)
    size = max(np.ptp(rows), np.ptp(cols)) + 1
    pad = 2  # every candidate's vertices are outline vertices: it stays inside their bounding box
    r0, c0 = max(rows.min() - pad, 0), max(cols.min() - pad, 0)
    r1, c1 = min(rows.max() + pad + 1, mask.shape[0]), min(cols.max() + pad + 1, mask.shape[1])
    local = mask[r0:r1, c0:c1]
    fit = _Fit(local, None if forbidden is None else np.asarray(forbidden, bool)[r0:r1, c0:c1], iou)
    shift = np.array([c0, r0], np.float64)
    contour = contour - shift
    place = (lambda xy: xy) if snap is None else (lambda xy: snap(xy + shift) - shift)

    def dp(eps: float) -> np.ndarray:
        return place(_dp(contour, eps))

    passing = []  # candidates that fit, lightest last
    candidate = dp(MIN_TOLERANCE)
    if fit.fits(candidate):
        passing.append(candidate)
        lo, hi = MIN_TOLERANCE, max(1.0, size / 2)
        for _ in range(BISECTION_STEPS):
            mid = math.sqrt(lo * hi)
            candidate = dp(mid)
            if fit.fits(candidate):
                lo = mid
                if len(candidate) < len(passing[-1]):
                    passing.append(candidate)
            else:
                hi = mid
        passing.append(_remove_greedily(passing[-1], fit))
    for candidate in reversed(passing):
        if is_simple(candidate) and fit.exact(candidate):
            return candidate + shift
    best = place(contour)
    return (best if is_simple(best) else dp(MIN_TOLERANCE)) + shift


def _remove_greedily(xy: np.ndarray, fit: _Fit) -> np.ndarray:
    """Remove vertices, smallest triangle first, while the polygon still passes ``fit``."""
    tries = 0
    while len(xy) > 3 and tries < MAX_REMOVALS:
        prev, nxt = np.roll(xy, 1, axis=0), np.roll(xy, -1, axis=0)
        tri = np.abs((xy[:, 0] - prev[:, 0]) * (nxt[:, 1] - prev[:, 1])
                     - (xy[:, 1] - prev[:, 1]) * (nxt[:, 0] - prev[:, 0]))
        for k in np.argsort(tri, kind="stable"):
            tries += 1
            candidate = np.delete(xy, k, axis=0)
            if fit.fits(candidate):
                xy = candidate
                break
            if tries >= MAX_REMOVALS:
                return xy
        else:
            return xy
    return xy


def instance_polygons(instances: np.ndarray, iou: float = DEFAULT_IOU, digits: int | None = 4
                      ) -> dict[int, np.ndarray]:
    """Tessera id -> its light polygon ``[x, y]`` in image pixel coordinates, for every id of an
    instance map (0 = background); each polygon avoids every other tessera's pixels. With
    ``digits``, polygons are checked as they will be stored: Label Studio percentages of the
    instance map's size with that many decimals (``to_percent``)."""
    iou = check_iou(iou)
    out: dict[int, np.ndarray] = {}
    h, w = instances.shape
    for k, sl in enumerate(ndi.find_objects(instances), start=1):
        if sl is None:
            continue
        pad = 3
        r0, c0 = max(sl[0].start - pad, 0), max(sl[1].start - pad, 0)
        r1, c1 = min(sl[0].stop + pad, h), min(sl[1].stop + pad, w)
        crop = instances[r0:r1, c0:c1]
        mine = crop == k
        snap = None if digits is None else percent_snap(w, h, (c0, r0), digits)
        xy = simplify(mine, iou, (crop != 0) & ~mine, snap)
        if xy is not None:
            out[k] = xy + [c0, r0]
    return out


def to_percent(xy: np.ndarray, width: int, height: int, digits: int = 4) -> list[list[float]]:
    """Polygon ``[x, y]`` pixels -> Label Studio points in percent of the image (clipped)."""
    xs = np.clip(xy[:, 0] / width * 100, 0, 100)
    ys = np.clip(xy[:, 1] / height * 100, 0, 100)
    return [[round(float(x), digits), round(float(y), digits)] for x, y in zip(xs, ys)]
