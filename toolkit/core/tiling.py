"""Segmenting large mosaics tile by tile at native resolution, with bounded memory.

The fine-tuned model was trained on crops of about 100 tesserae (longest side at most 1024 px),
so a large photograph is cut into overlapping tiles of that many tesserae and each tile is
segmented on its own. The tile results are merged with a *core region* rule:

* Along each axis the seam between two neighbouring tiles is the middle of their overlap, so the
  tiles' *cores* partition the image: every pixel belongs to exactly one core.
* A tessera touching a tile border that is not the image border is *cut* in that tile. Among the
  tiles that see a tessera whole, it belongs to the one whose core holds its centroid pixel or,
  when that tile sees it cut (an elongated tessera), to the tile whose core is nearest to the
  centroid. The verdict depends only on the tessera's bounding box and centroid in image
  coordinates, so every tile that sees it whole agrees: each tessera comes from one tile.
  Real segmentations of two tiles differ a little, so a tile also keeps a tessera whose centroid
  lies within a quarter of the overlap from its core: near a seam both tiles keep it (the second
  copy is dropped when painted) instead of both leaving it to the other.
* The overlap is about two tessera diameters, so a tessera whose centroid lies in a core is at
  least one diameter away from that tile's inner borders: the owning tile sees it whole.
* Owned tesserae are painted into the output map without overwriting pixels already painted. A
  tessera of which less than half is still free is a duplicate and is dropped; otherwise it keeps
  the largest 4-connected piece of its free part (this only happens where two tiles segmented the
  same tessera differently).
* A tessera longer than the overlap may be whole in no tile. So every tile also keeps the part
  of each cut tessera that lies in its core. After all tiles, a part touching a tessera painted
  whole is dropped (it is a piece of that tessera: tesserae never touch, grout separates them);
  the others are painted, and parts touching each other across a seam are joined into one
  tessera. A tessera that no tile sees whole is at least about as long as the overlap, so a
  group of parts spanning less than half of it is dropped (a leftover of tiles that segmented
  a tessera differently).

Memory: the output int32 map (256 MB at 8000 x 8000) plus one tile's image and result at a time
and the small masks of cut parts; no full-size mask is ever built per tessera. The final ids are
numbered 1..N in raster order (as ``dataset.relabel_sequential`` does) from per-tessera
first-pixel positions recorded while painting, then renumbered in row blocks, so no full-size
temporary is needed either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from .dataset import FOUR_CONNECTED, split_disconnected
from .errors import InternalError, MosaicError

SegmentFn = Callable[[np.ndarray], np.ndarray]

TARGET_TESSERAE = 100  # tesserae per tile, as in the training crops
MIN_TILE = 256
MAX_TILE = 1024  # SAM 2's input size
OVERLAP_DIAMETERS = 2.0  # overlap between tiles, in tessera diameters
OWNER_MARGIN = 0.25  # fraction of the overlap: tolerance of the centroid-in-core test
MIN_NEW_FRACTION = 0.5  # a tessera less than this part free when painted is a duplicate
_RELABEL_ROWS = 512  # rows renumbered at once in the final pass


def axis_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of the tiles along one axis: steps of ``tile - overlap``, last tile flush."""
    if length <= tile:
        return [(0, length)]
    starts = list(range(0, length - tile, tile - overlap)) + [length - tile]
    return [(s, s + tile) for s in starts]


def core_bounds(spans: list[tuple[int, int]], length: int) -> list[int]:
    """Seams between consecutive tiles (middle of their overlap), with 0 and ``length`` at the
    ends: tile i owns ``[bounds[i], bounds[i + 1])``."""
    seams = [(spans[i][0] + spans[i - 1][1]) // 2 for i in range(1, len(spans))]
    return [0, *seams, length]


def _check_tiling(tile: int, overlap: int) -> None:
    if tile < 1:
        raise MosaicError(f"tiling: tile size must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise MosaicError(f"tiling: overlap {overlap} must be at least 0 and less than the tile {tile}")


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles ``(y0, x0, y1, x1)`` covering a ``height`` x ``width`` image, in raster order.

    Neighbouring tiles overlap by at least ``overlap`` pixels; the last tile of each row and
    column is flush with the image border (so every tile is full-size unless the image is
    smaller than ``tile`` along that axis).
    """
    _check_tiling(tile, overlap)
    rows, cols = axis_spans(height, tile, overlap), axis_spans(width, tile, overlap)
    return [(y0, x0, y1, x1) for y0, y1 in rows for x0, x1 in cols]


def choose_tile_size(
    tessera_size: float,
    target_tesserae: int = TARGET_TESSERAE,
    min_tile: int = MIN_TILE,
    max_tile: int = MAX_TILE,
) -> int:
    """Tile side (px) holding about ``target_tesserae`` tesserae of diameter ``tessera_size``.

    A square of ``sqrt(target)`` tesserae per side, rounded to a multiple of 16 and clipped to
    ``[min_tile, max_tile]``.
    """
    if not tessera_size > 0:
        raise MosaicError(f"tiling: tessera size must be positive, got {tessera_size}")
    side = math.sqrt(target_tesserae) * tessera_size
    return int(min(max_tile, max(min_tile, 16 * round(side / 16))))


def choose_overlap(tessera_size: float, tile: int) -> int:
    """Overlap (px) of about two tessera diameters, at most half a tile."""
    return int(min(tile // 2, math.ceil(OVERLAP_DIAMETERS * tessera_size)))


def resolve_tiling(
    image: np.ndarray,
    tile: int | None = None,
    overlap: int | None = None,
    tessera_size: float | None = None,
) -> tuple[int, int]:
    """(tile, overlap) for ``image``: given values win, the rest follows the tessera size.

    The tessera size is estimated (``scale.estimate_tessera_size``: the grout network's period,
    a fraction of a second) only when it is needed: a missing tile size, or a missing overlap
    for an image larger than the tile.
    """
    height, width = image.shape[:2]

    def size() -> float:
        nonlocal tessera_size
        if tessera_size is None:
            from .scale import estimate_tessera_size

            tessera_size = estimate_tessera_size(image)
        return tessera_size

    if tile is None:
        tile = choose_tile_size(size())
    if overlap is None:
        overlap = 0 if max(height, width) <= tile else choose_overlap(size(), tile)
    _check_tiling(tile, overlap)
    return int(tile), int(overlap)


def segment_tiled(
    image: np.ndarray,
    segment_fn: SegmentFn,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    tessera_size: float | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Instance map (int32, 0 = background, ids 1..N in raster order) of a possibly large image.

    ``segment_fn`` maps an image crop to its instance map (same height and width, integer ids,
    0 = background). An image that fits in one tile goes to ``segment_fn`` whole; a larger one is
    cut by ``plan_tiles``, segmented tile by tile in that order and merged by the core-region
    rule (module docstring). ``tile`` and ``overlap`` default to values derived from
    ``tessera_size`` (estimated when not given). ``progress`` shows a tile progress bar on a
    terminal.
    """
    height, width = image.shape[:2]
    tile, overlap = resolve_tiling(image, tile, overlap, tessera_size)
    if height <= tile and width <= tile:
        return _run(segment_fn, image)

    rows, cols = _Axis.of(height, tile, overlap), _Axis.of(width, tile, overlap)
    merger = _Merger(height, width, overlap)
    margin = int(overlap * OWNER_MARGIN)
    bar = tqdm(total=len(rows.starts) * len(cols.starts), desc="tiles", unit="tile", leave=False,
               disable=None if progress else True)
    with bar:
        for i, (y0, y1) in enumerate(zip(rows.starts.tolist(), rows.ends.tolist())):
            for j, (x0, x1) in enumerate(zip(cols.starts.tolist(), cols.ends.tolist())):
                labels = _run(segment_fn, image[y0:y1, x0:x1])
                owned, cut = _classify(labels, y0, x0, i, j, rows, cols, margin)
                merger.paint(labels, y0, x0, owned)
                core = (rows.bounds[i] - y0, rows.bounds[i + 1] - y0,
                        cols.bounds[j] - x0, cols.bounds[j + 1] - x0)
                merger.keep_parts(labels, y0, x0, cut, core)
                bar.update()
    return merger.finish()


def _run(segment_fn: SegmentFn, crop: np.ndarray) -> np.ndarray:
    """``segment_fn(crop)`` checked and split so every id is one 4-connected piece."""
    labels = np.asarray(segment_fn(crop))
    if labels.shape != crop.shape[:2]:
        raise InternalError(
            f"tiling: segmentation of a {crop.shape[1]}x{crop.shape[0]} tile returned shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise InternalError(f"tiling: segmentation returned {labels.dtype}, expected integer ids")
    return split_disconnected(labels.astype(np.int32, copy=False))


@dataclass(frozen=True)
class _Axis:
    """The tiles along one axis: spans ``[starts[i], ends[i])`` and core bounds (core_bounds)."""

    length: int
    starts: np.ndarray
    ends: np.ndarray
    bounds: np.ndarray

    @classmethod
    def of(cls, length: int, tile: int, overlap: int) -> "_Axis":
        spans = axis_spans(length, tile, overlap)
        return cls(length, np.array([s for s, _ in spans]), np.array([e for _, e in spans]),
                   np.array(core_bounds(spans, length)))

    def whole(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """(objects x tiles) True where pixel range ``[lo, hi)`` lies in the tile without touching
        a tile end that is not the image border."""
        return ((lo[:, None] > self.starts) | (self.starts == 0)) & (
            (hi[:, None] < self.ends) | (self.ends == self.length)
        )

    def owners(self, lo: np.ndarray, hi: np.ndarray, centre: np.ndarray, margin: int) -> np.ndarray:
        """(objects x tiles) True where the tile may keep the object along this axis.

        Of the tiles that see the object whole, those whose core lies within ``margin`` pixels
        of the centroid pixel ``centre``, or else the nearest (an elongated object). The margin
        makes two tiles that see a tessera slightly differently both keep it (the duplicate is
        dropped when painted) rather than both leave it to the other.
        """
        whole = self.whole(lo, hi)
        c = centre[:, None]
        distance = np.maximum(np.maximum(self.bounds[:-1] - c, c - (self.bounds[1:] - 1)), 0)
        distance = np.where(whole, distance, np.iinfo(np.int64).max)
        allowed = np.maximum(distance.min(axis=1, keepdims=True), margin)
        return whole & (distance <= allowed)


def _classify(
    labels: np.ndarray, y0: int, x0: int, i: int, j: int, rows: _Axis, cols: _Axis, margin: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per id of tile ``(i, j)`` (index 0 unused): (kept by this tile, cut in this tile).

    Both depend only on each tessera's bounding box and centroid in image coordinates.
    """
    n = int(labels.max(initial=0))
    owned, cut = np.zeros(n + 1, dtype=bool), np.zeros(n + 1, dtype=bool)
    if n == 0:
        return owned, cut
    h, w = labels.shape
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    safe = np.maximum(area, 1)
    row_sum = np.bincount(flat, weights=np.repeat(np.arange(h, dtype=np.float64), w), minlength=n + 1)
    col_sum = np.bincount(flat, weights=np.tile(np.arange(w, dtype=np.float64), h), minlength=n + 1)
    cy = np.floor(row_sum[1:] / safe + 0.5).astype(np.int64) + y0
    cx = np.floor(col_sum[1:] / safe + 0.5).astype(np.int64) + x0
    box = np.zeros((n, 4), dtype=np.int64)  # image rows [box0, box1), columns [box2, box3)
    for k, sl in enumerate(ndi.find_objects(labels)):
        if sl is not None:
            box[k] = (sl[0].start + y0, sl[0].stop + y0, sl[1].start + x0, sl[1].stop + x0)
    present = area > 0
    owned[1:] = (present & rows.owners(box[:, 0], box[:, 1], cy, margin)[:, i]
                 & cols.owners(box[:, 2], box[:, 3], cx, margin)[:, j])
    cut[1:] = present & ~(rows.whole(box[:, 0], box[:, 1])[:, i] & cols.whole(box[:, 2], box[:, 3])[:, j])
    return owned, cut


class _Merger:
    """The output map and the bookkeeping that turns tile results into one instance map."""

    def __init__(self, height: int, width: int, overlap: int) -> None:
        self.min_span = overlap // 2  # a tessera whole in no tile is longer than this
        self.out = np.zeros((height, width), dtype=np.int32)
        self.next_id = 1
        self.first: list[np.ndarray] = []  # per id, in id order: image raster index of 1st pixel
        self.parts: list[tuple[int, int, np.ndarray]] = []  # (y0, x0, mask) parts of cut tesserae

    def paint(self, labels: np.ndarray, y0: int, x0: int, keep: np.ndarray) -> None:
        """Paint the kept ids of a tile at ``(y0, x0)`` on free pixels, with new ids.

        An id with less than MIN_NEW_FRACTION of its pixels free is dropped (a duplicate); one
        partly free keeps the largest 4-connected piece of its free part.
        """
        if not keep.any():
            return
        h, w = labels.shape
        region = self.out[y0:y0 + h, x0:x0 + w]
        free = region == 0
        kept_px = keep[labels]
        area = np.bincount(labels[kept_px], minlength=len(keep))
        free_area = np.bincount(labels[kept_px & free], minlength=len(keep))
        accept = keep & (free_area >= MIN_NEW_FRACTION * area) & (free_area > 0)
        paint = accept[labels] & free
        partial = accept & (free_area < area)
        if partial.any():
            for k, sl in enumerate(ndi.find_objects(labels), start=1):
                if sl is not None and partial[k]:
                    paint[sl] &= _largest_piece((labels[sl] == k) & free[sl]) | (labels[sl] != k)
        new_id = np.zeros(len(keep), dtype=np.int32)
        count = int(accept.sum())
        new_id[accept] = np.arange(self.next_id, self.next_id + count, dtype=np.int32)
        region[paint] = new_id[labels[paint]]
        # np.unique sorts the tile ids, which is new-id order; every accepted id has pixels.
        index = np.flatnonzero(paint)
        _, first = np.unique(labels.ravel()[index], return_index=True)
        self._record_first(index[first], y0, x0, w)
        self.next_id += count

    def keep_parts(
        self, labels: np.ndarray, y0: int, x0: int, cut: np.ndarray, core: tuple[int, ...]
    ) -> None:
        """Remember the part inside the tile's core of every cut tessera (small masks)."""
        if not cut.any():
            return
        r0, r1, c0, c1 = core
        inside = labels[r0:r1, c0:c1]
        for k, sl in enumerate(ndi.find_objects(inside), start=1):
            if sl is not None and cut[k]:
                self.parts.append((y0 + r0 + sl[0].start, x0 + c0 + sl[1].start, inside[sl] == k))

    def finish(self) -> np.ndarray:
        """Paint the remembered parts, join touching parts, number ids in raster order."""
        root = self._paint_parts()
        first = np.concatenate(self.first) if self.first else np.zeros(0, np.int64)
        # A joined tessera starts at the first pixel of any of its parts.
        start = np.full(len(first) + 1, np.iinfo(np.int64).max)
        np.minimum.at(start, root[1:], first)
        roots = np.nonzero(root == np.arange(len(root)))[0]
        roots = roots[roots > 0]
        rank = np.zeros(len(root), dtype=np.int32)
        rank[roots[np.argsort(start[roots], kind="stable")]] = np.arange(1, len(roots) + 1)
        lut = rank[root]
        for r in range(0, self.out.shape[0], _RELABEL_ROWS):
            block = self.out[r:r + _RELABEL_ROWS]
            block[...] = lut[block]
        return self.out

    def _paint_parts(self) -> np.ndarray:
        """Paint the cut parts and join touching ones; returns each id's root id.

        A part touching a tessera painted whole is a piece of that tessera (tesserae never
        touch) and is dropped. Each 4-connected piece of a part gets its own id first, so joined
        tesserae are connected.
        """
        first_part = self.next_id
        placed = []
        for y0, x0, mask in self.parts:
            h, w = mask.shape
            ya, xa = max(y0 - 1, 0), max(x0 - 1, 0)
            window = self.out[ya:y0 + h + 1, xa:x0 + w + 1]
            grown = np.zeros(window.shape, dtype=bool)
            grown[y0 - ya:y0 - ya + h, x0 - xa:x0 - xa + w] = mask
            grown = ndi.binary_dilation(grown, FOUR_CONNECTED)
            near = window[grown]
            if ((near > 0) & (near < first_part)).any():
                continue
            region = self.out[y0:y0 + h, x0:x0 + w]
            pieces, n = ndi.label(mask, structure=FOUR_CONNECTED)
            for piece in range(1, n + 1):
                sel = pieces == piece
                region[sel] = self.next_id
                self._record_first(np.flatnonzero(sel)[:1], y0, x0, w)
                placed.append((y0, x0, h, w))
                self.next_id += 1
        self.parts = []
        parent = np.arange(self.next_id, dtype=np.int64)

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = int(parent[a])
            return a

        for offset, (y0, x0, h, w) in enumerate(placed):
            k = first_part + offset
            window = self.out[max(y0 - 1, 0):y0 + h + 1, max(x0 - 1, 0):x0 + w + 1]
            ring = ndi.binary_dilation(window == k, FOUR_CONNECTED) & (window >= first_part) & (window != k)
            for other in np.unique(window[ring]).tolist():
                ra, rb = find(k), find(other)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
        root = np.array([find(a) for a in range(self.next_id)], dtype=np.int64)
        # A tessera no tile saw whole spans an overlap along some axis; a smaller group of parts
        # is left over from tiles that saw a tessera differently: drop it.
        lo = np.full((self.next_id, 2), np.iinfo(np.int64).max)
        hi = np.full((self.next_id, 2), -1)
        for offset, (y0, x0, h, w) in enumerate(placed):
            r = root[first_part + offset]
            lo[r] = np.minimum(lo[r], (y0, x0))
            hi[r] = np.maximum(hi[r], (y0 + h, x0 + w))
        groups = np.unique(root[first_part:])
        small = groups[(hi[groups] - lo[groups]).max(axis=1) <= self.min_span]
        root[np.isin(root, small)] = 0
        return root

    def _record_first(self, local: np.ndarray, y0: int, x0: int, tile_width: int) -> None:
        r, c = np.divmod(local.astype(np.int64), tile_width)
        self.first.append((r + y0) * self.out.shape[1] + (c + x0))


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (the mask itself if connected)."""
    pieces, n = ndi.label(mask, structure=FOUR_CONNECTED)
    if n <= 1:
        return mask
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    return pieces == int(np.argmax(sizes))
