"""Instance maps: painting masks into one map and the per-tessera post-processing (torch-free)."""
from __future__ import annotations

import functools

import cv2
import numpy as np

from .dataset import relabel_sequential, split_disconnected
from .errors import InternalError, MosaicError


@functools.lru_cache(maxsize=None)
def disk(radius: int) -> np.ndarray:
    """Disk structuring element (radius 1 is the 4-neighbourhood cross), read-only.

    Cached: prompt placement asks for one per candidate peak, thousands per image.
    """
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    disk = (x * x + y * y <= radius * radius).astype(np.uint8)
    disk.setflags(write=False)
    return disk


def _erode_ids(ids: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Per-instance erosion of a float32 id map: a pixel stays when its whole neighbourhood
    carries its id (so touching tesserae erode away from each other)."""
    lo = cv2.erode(ids, kernel, borderType=cv2.BORDER_REPLICATE)
    hi = cv2.dilate(ids, kernel, borderType=cv2.BORDER_REPLICATE)
    return np.where((lo == hi) & (ids > 0), ids, 0).astype(np.float32)


def postprocess(instances: np.ndarray, opening: int, min_area: int, erosion: int) -> np.ndarray:
    """Clean an instance map: per-tessera opening, per-tessera erosion, area filter.

    Opening (radius ``opening``) removes spurs and specks narrower than the disk without
    growing any tessera into a neighbour; erosion (radius ``erosion``) cuts thin bridges and
    separates touching tesserae; then every 4-connected piece becomes its own id and pieces
    under ``min_area`` pixels are removed. Returns int32 ids 1..N in raster order.

    Both morphological steps are vectorised over all ids at once: with the id map as an image,
    a pixel survives erosion iff min and max of its neighbourhood equal its id; the opening's
    dilation of the eroded map can only reach pixels of the same id (a disk centred on an
    eroded pixel of id j lies entirely in j), so ``dilate(eroded) == ids`` selects it exactly.
    """
    if instances.ndim != 2:
        raise InternalError(f"postprocess: instance map must be 2-D, got shape {instances.shape}")
    ids = relabel_sequential(np.asarray(instances).astype(np.int32))
    if ids.max(initial=0) >= 2**24:
        raise MosaicError("postprocess: more than 16 million instances")
    work = ids.astype(np.float32)
    if opening > 0:
        kernel = disk(opening)
        grown = cv2.dilate(_erode_ids(work, kernel), kernel, borderType=cv2.BORDER_REPLICATE)
        work = np.where(grown == work, work, 0).astype(np.float32)
    if erosion > 0:
        work = _erode_ids(work, disk(erosion))
    pieces = split_disconnected(work.astype(np.int32))
    if min_area > 0 and pieces.max(initial=0) > 0:
        areas = np.bincount(pieces.ravel())
        small = areas < min_area
        small[0] = False
        pieces[small[pieces]] = 0
    return relabel_sequential(pieces)


def source_ids(instances: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, source ids): every region of ``instances`` and the id ``source`` has at its first
    pixel. For a map derived from ``source`` by removing pixels, splitting and renumbering (a
    crop, ``postprocess``), every region lies in one region of ``source``: the one it came from."""
    ids, first = np.unique(instances.ravel(), return_index=True)
    keep = ids > 0
    return ids[keep], source.ravel()[first[keep]]


def paint_instances(
    masks: Iterable[np.ndarray], shape: tuple[int, int], min_new_fraction: float = 0.0,
    instances: np.ndarray | None = None,
) -> np.ndarray:
    """Paint boolean masks (already sorted best first) into an int32 instance map.

    A mask only takes pixels no earlier mask took; it is skipped when its still-free part is
    less than ``min_new_fraction`` of its area. ``instances`` continues an existing map.
    """
    return paint_windows(((0, 0, mask) for mask in masks), shape, min_new_fraction, instances)


def paint_windows(
    masks: Iterable[tuple[int, int, np.ndarray]], shape: tuple[int, int], min_new_fraction: float = 0.0,
    instances: np.ndarray | None = None, painted: list[int] | None = None,
) -> np.ndarray:
    """:func:`paint_instances` for masks given as windows ``(row, column, mask)`` of the map.

    ``painted``, when given, receives the position (in ``masks``) of every mask painted, in the
    order of the ids they got.
    """
    out = np.zeros(shape, dtype=np.int32) if instances is None else instances.copy()
    next_id = int(out.max(initial=0)) + 1
    for position, (y0, x0, mask) in enumerate(masks):
        area = int(np.count_nonzero(mask))
        if area == 0:
            continue
        view = out[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        free = mask[: view.shape[0], : view.shape[1]] & (view == 0)
        n_free = int(np.count_nonzero(free))
        if n_free == 0 or n_free < min_new_fraction * area:
            continue
        view[free] = next_id
        next_id += 1
        if painted is not None:
            painted.append(position)
    return out
