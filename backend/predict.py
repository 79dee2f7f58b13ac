"""Clicks and pre-labels on one image, with the SAM 2 or the classical engine.

Clicks (``Predictor.click``):

* SAM 2: the prompts go to ``Sam2Engine.predict_points``, whose embedding cache makes the first
  click on an image run the image encoder and later ones only the prompt encoder and mask
  decoder. *Clicks are decoded at the training scale*: the windows are the pre-label tiles,
  ``tiling.resolve_tiling`` of the image (tiles of about 100 tesserae at the tessera size
  estimated from the grout period, overlapping by two diameters, cut by ``plan_tiles``), and a
  click is answered in the window of that grid holding all its prompts farthest from the
  window's inner borders. The model was fine-tuned on crops of ~100 tesserae resized to its
  input size, and pre-labels are decoded on exactly these crops, so a click sees a tessera at
  the scale the model learned and pre-labels saw, and a click after a pre-label of the same
  image runs no encoder (the window's features are cached by content). An image that fits in
  one tile is used whole (as pre-labels do); prompts spread wider than any tile fall back to
  ``CLICK_WINDOW``-pixel windows (overlapping by ``CLICK_OVERLAP``), then the whole image.
  The mask is SAM 2's logits above ``click_threshold`` (MOSAIC_BACKEND_CLICK_MASK_THRESHOLD);
  of it only the pieces under positive clicks are kept (the largest piece for a box).
* Classical (no weights): the image is segmented once (tile by tile, cached per image) and a
  click selects the tessera under it or, on grout, the nearest one within two tessera
  diameters (``classical.ClassicalIndex``, the rule of ``ClassicalEngine.predict_point`` too); several positive clicks select
  the union, a negative click removes the tessera under it. A box selects every tessera lying
  at least half inside it, merged into one region; when none does (a box drawn inside one
  tessera), the tessera covering most of the box.

Pre-labels (``Predictor.prelabel``) segment the whole image: SAM 2's guided method (the
default) outlines the classical segmentation's tesserae (the one cached for classical clicks),
decoding each in the tile of about 100 tesserae whose core holds it; the other SAM 2 methods go
through ``mosaic_toolkit.core.tiling.segment_tiled`` (tiles of about 100 tesserae), the classical
engine through 1024-pixel tiles. Either stops with a 504 error when the request's deadline passes
between two tiles (a 503 when the server shuts down). The same ``Deadline`` covers a click: the
classical segmentation of a first click stops between tiles, SAM 2 checks it before the model
call; concurrent first clicks on one image share one segmentation (``SingleFlight``). With SAM 2 every tessera also gets a score (MOSAIC_BACKEND_PRELABEL_SCORES):
the IoU SAM 2 predicted for it. The guided method keeps the prediction of each outline it
paints (no extra decoding); the other methods decode a click on each tessera's point
(``decode_points`` on the cached tile features; skipped when the deadline has passed).
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

import numpy as np
from scipy import ndimage as ndi

from mosaic_toolkit.classical import ClassicalEngine, ClassicalIndex
from mosaic_toolkit.core.cache import ByteLRU
from mosaic_toolkit.core.dataset import tessera_points
from mosaic_toolkit.core.scale import ScaleEstimate, estimate_scale
from mosaic_toolkit.segment import CLASSICAL_TILE
from mosaic_toolkit.core.tiling import MAX_TILE, plan_tiles, resolve_tiling, segment_tiled
from mosaic_toolkit.engines import Engine

from .errors import BackendError
from .images import SingleFlight
from .regions import Prompt

if TYPE_CHECKING:
    from mosaic_toolkit.sam.engine import Sam2Engine

CLICK_WINDOW = MAX_TILE  # px: fallback windows, SAM 2's input size (native resolution)
CLICK_OVERLAP = 256  # px: neighbouring fallback windows overlap by this much
TILING_CACHE = 1024  # images whose tessera scale (and so tiling) is remembered


def click_window(
    shape: tuple[int, int], prompt: Prompt, tile: int = CLICK_WINDOW, overlap: int = CLICK_OVERLAP
) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the window a SAM 2 click is answered in (module docstring).

    ``tile`` and ``overlap``: the pre-label tiling of the image; the windows are its tiles.
    """
    h, w = shape
    if h <= tile and w <= tile:
        return 0, 0, h, w
    xs = list(prompt.points[:, 0])
    ys = list(prompt.points[:, 1])
    if prompt.box is not None:
        xs += [prompt.box[0], prompt.box[2]]
        ys += [prompt.box[1], prompt.box[3]]
    lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
    best, best_margin = None, -1.0
    for y0, x0, y1, x1 in plan_tiles(h, w, tile, overlap):
        if not (x0 <= lo_x and hi_x <= x1 and y0 <= lo_y and hi_y <= y1):
            continue
        # distance to the window's inner borders (a border on the image border does not count)
        margins = [lo_x - x0 if x0 > 0 else math.inf, x1 - hi_x if x1 < w else math.inf,
                   lo_y - y0 if y0 > 0 else math.inf, y1 - hi_y if y1 < h else math.inf]
        if min(margins) > best_margin:
            best, best_margin = (y0, x0, y1, x1), min(margins)
    if best is None and tile < CLICK_WINDOW:  # prompts wider than a tile: larger windows
        return click_window(shape, prompt, CLICK_WINDOW, CLICK_OVERLAP)
    return best or (0, 0, h, w)


def guarded(segment: Callable[..., np.ndarray], deadline: Deadline) -> Callable[..., np.ndarray]:
    """``segment`` that first checks ``deadline`` (so a tiled segmentation stops between tiles)."""
    def run(crop: np.ndarray, **kwargs) -> np.ndarray:
        deadline.check()
        return segment(writable(crop), **kwargs)
    return run


def writable(image: np.ndarray) -> np.ndarray:
    """``image`` itself, or a copy when it is read-only (the fetcher's cached images are):
    torch warns about tensors made from read-only arrays."""
    return image if image.flags.writeable else image.copy()


def keep_clicked(mask: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """The 4-connected pieces of ``mask`` under a positive click, else its largest piece."""
    pieces, n = ndi.label(mask)
    if n <= 1:
        return mask
    h, w = mask.shape
    hit = {int(pieces[min(int(y), h - 1), min(int(x), w - 1)]) for x, y in positives} - {0}
    if not hit:
        hit = {1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))}
    return np.isin(pieces, list(hit))


class Deadline:
    """When a request must stop: its predict timeout (504) or the server shutting down (503).
    ``check()`` is called between units of work (tiles, tasks, before a click's model call)."""

    def __init__(self, at: float, what: str, timeout: float, stop: threading.Event | None = None) -> None:
        self.at = at  # a time.monotonic() value
        self.what = what
        self.timeout = timeout
        self.stop = stop

    @classmethod
    def after(cls, seconds: float, what: str, stop: threading.Event | None = None) -> "Deadline":
        return cls(time.monotonic() + seconds, what, seconds, stop)

    def passed(self) -> bool:
        return time.monotonic() > self.at or (self.stop is not None and self.stop.is_set())

    def check(self, what: str | None = None) -> None:
        what = what or self.what
        if self.stop is not None and self.stop.is_set():
            raise BackendError(f"{what}: stopped, the server is shutting down", 503)
        if time.monotonic() > self.at:
            raise BackendError(
                f"{what}: stopped at the predict timeout of {self.timeout:g} s "
                "(MOSAIC_BACKEND_PREDICT_TIMEOUT); the image is too large for this machine's "
                "speed, or the request has too many tasks: raise the timeout (and Label Studio's "
                "ML_TIMEOUT_PREDICT), send fewer tasks per request or use a GPU", 504)


class Predictor:
    """Answers clicks and pre-labels; keeps classical segmentations between clicks."""

    def __init__(self, cache_bytes: int, prelabel_scores: bool = True, tile: int | None = None,
                 click_threshold: float = 0.0) -> None:
        self.classical_cache: ByteLRU[ClassicalIndex] = ByteLRU(cache_bytes, lambda i: i.nbytes)
        # concurrent first clicks on an image: one segmentation (SAM 2's engine encodes an
        # image once under its own lock, the others then find it in its cache)
        self._segmenting = SingleFlight()
        self.prelabel_scores = prelabel_scores
        self.tile = tile  # SAM 2 tile / click window side (px); None: about 100 tesserae
        self.click_threshold = click_threshold  # SAM 2 logit threshold of a click's mask
        self._scales: OrderedDict[str, ScaleEstimate] = OrderedDict()
        self._scale_lock = threading.Lock()
        # called with every new estimate (the backend's /metrics counts them)
        self.on_scale: Callable[[ScaleEstimate], None] | None = None

    def scale(self, image: np.ndarray, key: str) -> ScaleEstimate:
        """The tessera scale of ``image`` (content ``key``), estimated once per image (as
        `segment` does: one scale for every tile), with its confidence."""
        with self._scale_lock:
            found = self._scales.get(key)
            if found is not None:
                self._scales.move_to_end(key)
                return found
        found = estimate_scale(image)
        with self._scale_lock:
            self._scales[key] = found
            while len(self._scales) > TILING_CACHE:
                self._scales.popitem(last=False)
        if self.on_scale is not None:
            self.on_scale(found)
        return found

    def tiling(self, image: np.ndarray, key: str) -> tuple[int, int]:
        """(tile, overlap) of SAM 2 pre-labels and click windows for ``image`` (content ``key``):
        ``resolve_tiling``, i.e. about 100 tesserae per tile (or ``tile``) at the scale
        estimated once per image, so clicks and pre-labels of one image always use the same grid."""
        return resolve_tiling(image, self.tile, None, self.tessera_size(image, key))

    def tessera_size(self, image: np.ndarray, key: str) -> float:
        """The tessera size (px) estimated for ``image`` (``scale``, remembered per image)."""
        return self.scale(image, key).diameter

    # ---------------------------------------------------------------- clicks
    def click(self, engine: Engine, image: np.ndarray, key: str, prompt: Prompt,
              deadline: Deadline | None = None) -> tuple[np.ndarray, float | None]:
        """(boolean mask over the whole image, score or None) for the prompts; the mask may be
        empty (nothing found). The first click on an image segments (classical) or encodes
        (SAM 2) it within ``deadline``."""
        if len(prompt.positives) == 0 and prompt.box is None:
            raise BackendError("prompts: negative clicks only remove; add a positive click or a box")
        if isinstance(engine, ClassicalEngine):
            return self._classical_click(engine, image, key, prompt, deadline), None
        if deadline is not None:
            deadline.check()
        y0, x0, y1, x1 = click_window(image.shape[:2], prompt, *self.tiling(image, key))
        box = None if prompt.box is None else prompt.box - [x0, y0, x0, y0]
        # A candidate over guided_max_area tessera areas spans neighbours: not the tessera clicked.
        max_area = engine.params.guided_max_area * math.pi / 4 * self.tessera_size(image, key) ** 2
        local, score = engine.predict_points(
            writable(image[y0:y1, x0:x1]), prompt.points - [x0, y0], prompt.labels, box, max_area=max_area,
            threshold=self.click_threshold)
        local = keep_clicked(local, prompt.positives - [x0, y0])
        mask = np.zeros(image.shape[:2], bool)
        mask[y0:y1, x0:x1] = local
        return mask, score

    def classical_index(self, engine: ClassicalEngine, image: np.ndarray, key: str,
                        deadline: Deadline | None = None) -> ClassicalIndex:
        """The classical segmentation of ``image`` (cached by its content ``key``; computed
        once for concurrent requests), within ``deadline``. One scale for the whole image, as
        `segment` does: every tile is cut alike. An image whose tesserae are too coarse to
        segment (``ScaleEstimate.coarse``) gets no tesserae (the estimate is in /metrics)."""
        index = self.classical_cache.get(key)
        if index is not None:
            return index

        def compute() -> ClassicalIndex:
            found = self.classical_cache.get(key)
            if found is not None:
                return found
            scale = self.scale(image, key)
            if scale.coarse:  # tesserae of a few px: no figure-sized regions (see /metrics)
                made = ClassicalIndex.of(np.zeros(image.shape[:2], np.int32))
                self.classical_cache.put(key, made)
                return made
            size = scale.diameter
            segment = engine.segment if deadline is None else guarded(engine.segment, deadline)
            made = ClassicalIndex.of(segment_tiled(
                image, lambda crop: segment(crop, tessera_size=size), tile=CLASSICAL_TILE, progress=False))
            self.classical_cache.put(key, made)
            return made

        return self._segmenting.do((id(engine), key), compute, None if deadline is None else deadline.check)

    def _classical_click(self, engine: ClassicalEngine, image: np.ndarray, key: str,
                         prompt: Prompt, deadline: Deadline | None = None) -> np.ndarray:
        index = self.classical_index(engine, image, key, deadline)
        chosen = {index.tessera_at(x, y) for x, y in prompt.positives}
        if prompt.box is not None:
            chosen |= index.in_box(prompt.box)
        chosen -= {index.tessera_at(x, y) for x, y in prompt.negatives}
        chosen.discard(0)
        if not chosen:
            return np.zeros(image.shape[:2], bool)
        return np.isin(index.instances, sorted(chosen))

    # ---------------------------------------------------------------- pre-labels
    def prelabel(self, engine: Engine, image: np.ndarray, key: str, deadline: Deadline
                 ) -> tuple[np.ndarray, list[float] | None]:
        """(instance map, per-tessera scores or None) of the whole image, within ``deadline``."""
        if isinstance(engine, ClassicalEngine):
            return self.classical_index(engine, image, key, deadline).instances, None
        tile, overlap = self.tiling(image, key)
        if engine.params.method == "guided":  # SAM 2 outlines the classical proposals, tile by tile
            proposals = self.classical_index(ClassicalEngine(), image, key, deadline).instances
            instances, scores = engine.segment_guided(
                image, tessera_size=self.tessera_size(image, key), proposals=proposals, tile=tile,
                overlap=overlap, progress=lambda done: deadline.check(), with_scores=True)
            return instances, scores if self.prelabel_scores and scores else None
        segment, size = guarded(engine.segment, deadline), self.tessera_size(image, key)
        instances = segment_tiled(image, lambda crop: segment(crop, tessera_size=size), tile=tile,
                                  overlap=overlap, progress=False)  # the size sets the speck floor
        scores = None
        if self.prelabel_scores and instances.any() and not deadline.passed():
            scores = self._tessera_scores(engine, image, instances, tile, overlap)
        return instances, scores

    @staticmethod
    def _tessera_scores(engine: "Sam2Engine", image: np.ndarray, instances: np.ndarray,
                        tile: int, overlap: int) -> list[float]:
        """SAM 2's predicted IoU for a click on each tessera's point, decoded in the segmentation
        tile that holds the point farthest from its borders (its features are cached)."""
        points = np.asarray(tessera_points(instances), np.float64)
        h, w = instances.shape
        tiles = plan_tiles(h, w, tile, overlap) if max(h, w) > tile else [(0, 0, h, w)]
        margins = np.stack([
            np.minimum.reduce([points[:, 0] - x0, x1 - 1 - points[:, 0], points[:, 1] - y0, y1 - 1 - points[:, 1]])
            for y0, x0, y1, x1 in tiles], axis=1)
        owner = np.argmax(margins, axis=1)
        scores = np.zeros(len(points))
        for t, (y0, x0, y1, x1) in enumerate(tiles):
            mine = np.nonzero(owner == t)[0]
            if mine.size:
                _, ious = engine.decode_points(writable(image[y0:y1, x0:x1]), (points[mine] - [x0, y0]).astype(np.float32))
                scores[mine] = ious.numpy()
        return [float(s) for s in scores]
