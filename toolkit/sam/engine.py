"""The SAM 2 segmentation engine shared by the CLI and the Label Studio backend.

``Sam2Engine`` wraps one loaded model and offers

* ``predict_points(image, points, labels, box=None)``: the mask of one click (or several clicks /
  a box) with an **embedding cache**: an image is encoded once (the expensive Hiera image
  encoder), later clicks on it only run the prompt encoder and mask decoder. The cache is an LRU
  keyed by a hash of the image content and bounded by the bytes of cached features.
* ``segment(image, params=None, method=None)``: a whole-image instance map (int32, 0 =
  background, 1..N one id per tessera), by one of two methods:

  ``"stock"``, the thesis's path: SAM 2's ``SAM2AutomaticMaskGenerator`` (a blind grid of
  ``points_per_side``² prompts, three masks per prompt, optional crop layers) with the tuned
  thresholds; its masks are painted into an instance map in order of decreasing predicted IoU
  without overwriting, then post-processed (``postprocess``).

  ``"fast"`` (default): the generator spends nearly all its time decoding a dense grid and
  upsampling three full-resolution masks per prompt. The fast path instead

  1. encodes the image once (through the same cache as the clicks);
  2. places prompts at likely tessera centres: a cheap "tile interior" map (pixels whose
     Lab colour gradient is below an Otsu threshold) is distance-transformed; its local
     maxima are the centres of edge-free discs, taken largest disc first; a candidate whose
     disc overlaps an earlier one's lies in the same tile and is dropped, and so are discs far
     smaller than typical (grout crossings); a coarse grid of (points_per_side/2)² points
     fills wide regions without candidates. On synthetic mosaics this gives about one prompt
     per tessera instead of a blind grid;
  3. decodes the prompts in batches of ``points_per_batch`` straight through the prompt
     encoder and mask decoder on the cached features, one mask per prompt
     (``multimask_output=False``; SAM 2's dynamic fallback to the most stable multimask output
     still applies);
  4. filters at the decoder's low resolution (256² logits at 1024 input): predicted IoU >
     ``pred_iou_thresh``, stability score >= ``stability_score_thresh``, the prompt must lie
     inside its own mask; then box NMS at ``box_nms_thresh``;
  5. upsamples only the kept masks to the image size and paints them by decreasing predicted
     IoU, skipping a mask when less than half of it is still unpainted (a duplicate, or a
     region enclosing tiles already found);
  6. runs steps 2–5 once more on the interior left unpainted, with discs of at least half the
     median first-round radius (whole tiles the first prompts missed, not slivers);
     both rounds together decode at most ``points_per_side``² prompts, the stock grid's count;
  7. post-processes like the stock path.

  Steps 2–6 are ``fast_instances(interior, params, decode)``, where ``decode`` (a ``Decoder``,
  ``Sam2Engine.prompt_decoder``) is the only model call: toolkit/tune.py passes a decoder that
  remembers decoded batches, so an Optuna trial re-filters and repaints without the model.

  The mask decoder costs the same per prompt on both paths, so the saving comes from decoding
  about one prompt per tessera instead of ``points_per_side``² per crop (over 1 + 4 + 16 crops,
  each encoded anew, with the thesis's crop_n_layers=2), and from upsampling only the kept
  masks instead of three full-resolution masks per prompt. The crop-layer parameters
  (``crop_*``) only apply to the stock path: the fast path runs on the whole image once (tiles
  of large images come from toolkit/tiling.py).

Post-processing (both paths, ``postprocess``): per-tessera morphological opening (removes spurs
and specks), per-tessera erosion (separates touching tesserae), then every 4-connected piece
becomes its own tessera and pieces smaller than ``min_area`` pixels are dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..core.dataset import relabel_sequential, split_disconnected
from ..core.errors import MosaicError
from .adapter import PromptDecoder, Sam2Adapter, autocast, stock_generator
from .models import ModelSpec, load_model, model_version, pick_device, resolve_model

DEFAULT_CACHE_BYTES = 512 * 2**20  # ~32 images at 1024² (16 MiB of features each)
METHODS = ("fast", "stock")
FAST_ROUNDS = 2  # prompt placement + decoding passes of the fast path
FAST_MIN_NEW_FRACTION = 0.5  # fast path: skip a mask when less than this part is unpainted

#: Decodes one batch of positive prompt points ``[x, y]`` (float32 Nx2, image pixels) into
#: (low-resolution mask logits Nxhxw, predicted IoU N), both float32 on the CPU.
Decoder = Callable[[np.ndarray], "tuple[torch.Tensor, torch.Tensor]"]


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
@dataclass
class GeneratorParams:
    """Parameters of full-image segmentation.

    The four thresholds default to the best trial of one of the thesis's Optuna studies
    (0.735 / 0.864 / 0.909 / 0.383), closer to mosaic data than SAM 2's natural-image defaults
    (0.8 / 0.95 / 1.0 / 0.0); a tuned fine-tune file carries its own. The grid and crop settings
    are the thesis's fixed ones (crop settings: stock path only).
    """

    pred_iou_thresh: float = 0.735  # keep masks whose predicted IoU is above this
    stability_score_thresh: float = 0.864  # keep masks at least this stable
    stability_score_offset: float = 0.909  # logit offset used by the stability score
    mask_threshold: float = 0.383  # logit threshold binarising the masks
    points_per_side: int = 32  # stock: prompt grid side; fast: cap of points_per_side² prompts
    points_per_batch: int = 64  # prompts decoded at once
    crop_n_layers: int = 2  # stock only: extra layers of image crops
    crop_overlap_ratio: float = 0.3  # stock only: overlap of the crops
    crop_n_points_downscale_factor: int = 2  # stock only: grid thinning per crop layer
    box_nms_thresh: float = 0.7  # box IoU above which a lower-scored duplicate is dropped
    opening: int = 1  # radius (px) of the per-tessera morphological opening; 0 = none
    min_area: int = 64  # tesserae smaller than this (px) are dropped
    erosion: int = 1  # radius (px) of the per-tessera erosion; 0 = none
    method: str = "fast"  # "fast" or "stock"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = {"float": float, "int": int, "str": str}[str(f.type)]
            if kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise MosaicError(f"generator parameter {f.name}: expected {kind.__name__}, got {value!r}")
            setattr(self, f.name, kind(value))
        if self.method not in METHODS:
            raise MosaicError(f"generator parameter method: {self.method!r} is not one of {METHODS}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "crop_overlap_ratio", "box_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise MosaicError(f"generator parameter {name}: must lie in [0, 1]")
        for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
            if getattr(self, name) < 1:
                raise MosaicError(f"generator parameter {name}: must be at least 1")
        for name in ("crop_n_layers", "opening", "min_area", "erosion"):
            if getattr(self, name) < 0:
                raise MosaicError(f"generator parameter {name}: must not be negative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "GeneratorParams":
        """Parameters from a (partial) dict; missing keys keep their defaults."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MosaicError(
                f"generator parameters: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> "GeneratorParams":
        return self.from_dict({**self.to_dict(), **changes})


# --------------------------------------------------------------------------------------------
# Pure array functions
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _disk(radius: int) -> np.ndarray:
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
        raise MosaicError(f"postprocess: instance map must be 2-D, got shape {instances.shape}")
    ids = relabel_sequential(np.asarray(instances).astype(np.int32))
    if ids.max(initial=0) >= 2**24:
        raise MosaicError("postprocess: more than 16 million instances")
    work = ids.astype(np.float32)
    if opening > 0:
        kernel = _disk(opening)
        grown = cv2.dilate(_erode_ids(work, kernel), kernel, borderType=cv2.BORDER_REPLICATE)
        work = np.where(grown == work, work, 0).astype(np.float32)
    if erosion > 0:
        work = _erode_ids(work, _disk(erosion))
    pieces = split_disconnected(work.astype(np.int32))
    if min_area > 0 and pieces.max(initial=0) > 0:
        areas = np.bincount(pieces.ravel())
        small = areas < min_area
        small[0] = False
        pieces[small[pieces]] = 0
    return relabel_sequential(pieces)


def paint_instances(
    masks: Iterable[np.ndarray], shape: tuple[int, int], min_new_fraction: float = 0.0,
    instances: np.ndarray | None = None,
) -> np.ndarray:
    """Paint boolean masks (already sorted best first) into an int32 instance map.

    A mask only takes pixels no earlier mask took; it is skipped when its still-free part is
    less than ``min_new_fraction`` of its area. ``instances`` continues an existing map.
    """
    out = np.zeros(shape, dtype=np.int32) if instances is None else instances.copy()
    next_id = int(out.max(initial=0)) + 1
    for mask in masks:
        area = int(np.count_nonzero(mask))
        if area == 0:
            continue
        free = mask & (out == 0)
        n_free = int(np.count_nonzero(free))
        if n_free == 0 or n_free < min_new_fraction * area:
            continue
        out[free] = next_id
        next_id += 1
    return out


def tile_interior(image: np.ndarray) -> np.ndarray:
    """Boolean map of pixels likely inside a tessera: low Lab colour gradient (Otsu split).

    Cheap (a blur, two Sobel filters, a threshold) and only used to place prompts.
    """
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab = cv2.GaussianBlur(lab, (0, 0), 1.0)
    gx = cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3)
    grad = np.sqrt(gx * gx + gy * gy).max(axis=2)
    scale = float(np.percentile(grad, 99)) or 1.0
    grad8 = np.clip(grad / scale * 255.0, 0, 255).astype(np.uint8)
    threshold, _ = cv2.threshold(grad8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return grad8 <= threshold


def tessera_prompts(
    interior: np.ndarray,
    max_points: int,
    grid_side: int,
    free: np.ndarray | None = None,
    min_radius: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt points at likely tessera centres: (points ``[x, y]`` float32 Nx2, radii N).

    Candidates are the local maxima of the distance transform of ``interior`` (restricted to
    ``free`` pixels when given), i.e. centres of edge-free discs, taken largest disc first. A
    candidate whose disc overlaps the disc of one already taken lies in the same edge-free
    region (the same tile) and is dropped. Discs with a radius under ``min_radius`` (default:
    a quarter of the 75th percentile of the radii found) are grout crossings and slivers, not
    tiles, and are dropped too. Then a ``grid_side``² grid adds points in regions wide enough
    but unclaimed (a fallback where the interior map failed). At most ``max_points``, best
    first; the radius of a grid point is its distance-transform value.
    """
    h, w = interior.shape
    region = interior if free is None else interior & free
    # Zero padding: the image border bounds a tile like an edge (a cut tile's prompt stays inside).
    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    floor = max(2.0, min(h, w) / 256.0)
    r_cap = max(floor, min(h, w) / 10.0)
    peaks = (dist >= cv2.dilate(dist, np.ones((3, 3), np.uint8))) & (dist >= floor)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-dist[ys, xs], kind="stable")
    claimed = np.zeros((h, w), dtype=np.uint8)
    found: list[tuple[int, int, float]] = []
    for y, x in zip(ys[order].tolist(), xs[order].tolist()):
        radius = float(dist[y, x])
        probe = max(1, int(0.8 * min(radius, r_cap)))
        y0, y1, x0, x1 = max(0, y - probe), min(h, y + probe + 1), max(0, x - probe), min(w, x + probe + 1)
        window = claimed[y0:y1, x0:x1]
        disk = _disk(probe)[y0 - y + probe : y1 - y + probe, x0 - x + probe : x1 - x + probe]
        if (window & disk).any():
            continue
        found.append((x, y, radius))
        cv2.circle(claimed, (x, y), int(round(min(radius, r_cap))), 1, -1)
    if min_radius is None:
        min_radius = 0.25 * float(np.percentile([r for _, _, r in found], 75)) if found else 0.0
    min_radius = max(floor, min_radius)
    points = [(x, y, r) for x, y, r in found if r >= min_radius]
    for gy in range(grid_side):
        for gx in range(grid_side):
            x, y = int((gx + 0.5) * w / grid_side), int((gy + 0.5) * h / grid_side)
            if dist[y, x] >= min_radius and not claimed[y, x]:
                points.append((x, y, float(dist[y, x])))
    arr = np.asarray(points[:max_points], dtype=np.float32).reshape(-1, 3)
    return arr[:, :2], arr[:, 2]


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A contiguous HxWx3 uint8 array (grey is repeated, alpha dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise MosaicError(f"image: expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise MosaicError(f"image: expected HxW, HxWx3 or HxWx4, got shape {image.shape}")
    # Writable too: torchvision warns on (and torch cannot own) read-only arrays, e.g. np.asarray(PIL).
    return np.require(image[..., :3], requirements=["C", "W"])


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------
@dataclass
class _Encoded:
    """Cached image features as SAM2ImagePredictor keeps them after set_image."""

    features: dict[str, Any]  # {"image_embed": 1xCxhxw, "high_res_feats": [1xC1x4hx4w, 1xC2x2hx2w]}
    hw: tuple[int, int]
    nbytes: int


class Sam2Engine:
    """One loaded SAM 2 model: cached click prediction and full-image segmentation."""

    name = "sam2"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        version: str,
        params: GeneratorParams | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        spec: ModelSpec | None = None,
    ) -> None:
        self.model = model
        self.model_version = version
        self.params = params or GeneratorParams()
        self.spec = spec
        self.cache_bytes = int(cache_bytes)
        self.device = model.device
        self._sam = Sam2Adapter(model)
        self._decoder = PromptDecoder(model)
        self._cache: OrderedDict[str, _Encoded] = OrderedDict()
        self._cache_used = 0
        self._lock = threading.RLock()

    @classmethod
    def from_spec(
        cls,
        spec: str | Path | ModelSpec,
        device: str | torch.device | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        *,
        base: str | Path | None = None,
        image_size: int | None = None,
    ) -> "Sam2Engine":
        """A ready engine from a model name, checkpoint or fine-tune path, or a ModelSpec.

        Generator parameters come from the fine-tune's metadata when it was tuned, else the
        defaults. ``image_size`` overrides the model's input resolution (tests, benchmarks).
        """
        if not isinstance(spec, ModelSpec):
            spec = resolve_model(spec, base=base)
        if image_size is not None:
            spec = dataclasses.replace(spec, image_size=image_size)
        model = load_model(spec, pick_device(device))
        return cls(
            model,
            version=model_version(spec),
            params=GeneratorParams.from_dict(spec.generator),
            cache_bytes=cache_bytes,
            spec=spec,
        )

    # ---------------------------------------------------------------- embedding cache
    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device)

    @staticmethod
    def image_key(image: np.ndarray) -> str:
        """Content hash of an RGB uint8 image (shape included)."""
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(repr(image.shape).encode())
        return digest.hexdigest()

    @property
    def cache_used_bytes(self) -> int:
        return self._cache_used

    def cached_keys(self) -> list[str]:
        """Keys of cached images, least recently used first."""
        with self._lock:
            return list(self._cache)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cache_used = 0

    def _encoded(self, image: np.ndarray) -> tuple[str, _Encoded]:
        """Features of ``image`` from the cache, running the image encoder on a miss."""
        key = self.image_key(image)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                return key, entry
            with torch.inference_mode(), self._autocast():
                features = self._sam.encode(image)
            tensors = [features["image_embed"], *features["high_res_feats"]]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            entry = _Encoded(features, (image.shape[0], image.shape[1]), nbytes)
            self._cache[key] = entry
            self._cache_used += nbytes
            while self._cache and self._cache_used > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cache_used -= old.nbytes
            return key, entry

    def encode(self, image: np.ndarray) -> str:
        """Encode ``image`` (unless cached) and return its cache key."""
        return self._encoded(as_rgb(image))[0]

    # ---------------------------------------------------------------- clicks
    def predict_points(
        self,
        image: np.ndarray,
        points: Sequence[Sequence[float]] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        box: Sequence[float] | None = None,
    ) -> tuple[np.ndarray, float]:
        """The best mask for click prompts on ``image`` and its predicted IoU.

        ``points`` are ``[x, y]`` pixel coordinates, ``labels`` 1 (tessera) or 0 (not this
        tessera), ``box`` an optional ``[x0, y0, x1, y1]``. A single positive click is
        ambiguous, so three masks are decoded and the best-scored one returned; several clicks
        or a box give one mask. Logits are thresholded at 0 (SAM's own threshold; the tuned
        ``mask_threshold`` belongs to full-image segmentation).
        """
        image = as_rgb(image)
        coords = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        labs = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(coords) != len(labs):
            raise MosaicError(f"prompts: {len(coords)} points but {len(labs)} labels")
        if not np.isin(labs, (0, 1)).all():
            raise MosaicError("prompts: labels must be 1 (positive) or 0 (negative)")
        box_arr = None if box is None else np.asarray(box, dtype=np.float32).reshape(4)
        if len(coords) == 0 and box_arr is None:
            raise MosaicError("prompts: give at least one point or a box")
        multimask = len(coords) == 1 and box_arr is None
        with self._lock:
            _, entry = self._encoded(image)
            predictor = self._sam.use(entry.features, entry.hw)
            with torch.inference_mode(), self._autocast():
                masks, scores, _ = predictor.predict(
                    point_coords=coords if len(coords) else None,
                    point_labels=labs if len(coords) else None,
                    box=box_arr,
                    multimask_output=multimask,
                )
        best = int(np.argmax(scores))
        return masks[best] > 0.5, float(scores[best])

    # ---------------------------------------------------------------- full image
    def segment(
        self, image: np.ndarray, params: GeneratorParams | None = None, method: str | None = None
    ) -> np.ndarray:
        """Instance map (int32, 0 = background, 1..N) of every tessera in ``image``.

        ``params`` default to the engine's (tuned) parameters; ``method`` overrides
        ``params.method`` ("fast" or "stock", see the module docstring).
        """
        image = as_rgb(image)
        params = params or self.params
        method = method or params.method
        if method not in METHODS:
            raise MosaicError(f"segment: unknown method {method!r} (choose from {METHODS})")
        with self._lock:
            raw = self._segment_stock(image, params) if method == "stock" else self._segment_fast(image, params)
        return postprocess(raw, params.opening, params.min_area, params.erosion)

    def _segment_stock(self, image: np.ndarray, params: GeneratorParams) -> np.ndarray:
        generator = stock_generator(
            self.model,
            points_per_side=params.points_per_side,
            points_per_batch=params.points_per_batch,
            pred_iou_thresh=params.pred_iou_thresh,
            stability_score_thresh=params.stability_score_thresh,
            stability_score_offset=params.stability_score_offset,
            mask_threshold=params.mask_threshold,
            box_nms_thresh=params.box_nms_thresh,
            crop_n_layers=params.crop_n_layers,
            crop_overlap_ratio=params.crop_overlap_ratio,
            crop_n_points_downscale_factor=params.crop_n_points_downscale_factor,
            output_mode="binary_mask",
        )
        with torch.inference_mode(), self._autocast():
            records = generator.generate(image)
        records.sort(key=lambda r: -r["predicted_iou"])
        return paint_instances((r["segmentation"] for r in records), image.shape[:2])

    def decode_points(self, key_or_image: str | np.ndarray, points: np.ndarray, batch: int = 64
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-mask decoding of many positive prompts: (low-res logits Nxhxw, IoU N).

        Runs the prompt encoder and mask decoder directly on the cached features in batches
        of ``batch`` prompts (what ``SAM2ImagePredictor._predict`` does for one batch, without
        upsampling every mask to the image size).
        """
        with self._lock:
            if isinstance(key_or_image, str):
                entry = self._cache.get(key_or_image)
                if entry is None:
                    raise MosaicError("decode_points: image is not in the embedding cache")
            else:
                _, entry = self._encoded(as_rgb(key_or_image))
            return self._decode(entry, points, batch)

    def _decode(self, entry: _Encoded, points: np.ndarray, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        feats = entry.features
        side = self._sam.feat_sizes[0]
        if len(points) == 0:
            return torch.zeros((0, *side)), torch.zeros(0)
        coords = torch.as_tensor(points, dtype=torch.float32, device=self.device)
        coords = self._sam.model_coords(coords, entry.hw)
        logits, ious = [], []
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(coords), batch):
                chunk = coords[start : start + batch]
                [(low_res, iou)] = self._decoder([(feats["image_embed"], feats["high_res_feats"], chunk)])
                logits.append(low_res.float().cpu())
                ious.append(iou.float().cpu())
        return torch.cat(logits), torch.cat(ious)

    def prompt_decoder(self, image: np.ndarray) -> Decoder:
        """A ``Decoder`` of positive prompts on ``image``: each call decodes one batch.

        The image is encoded now (or taken from the embedding cache); the returned function
        keeps its features, so it stays usable after the cache evicts them. This is how the
        fast path decodes, and what a caller wrapping the decoder (``toolkit/tune.py`` memoises
        it across trials) passes to ``fast_instances``.
        """
        with self._lock:
            _, entry = self._encoded(as_rgb(image))

        def decode(points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            with self._lock:
                return self._decode(entry, points, max(1, len(points)))

        return decode

    def _segment_fast(self, image: np.ndarray, params: GeneratorParams) -> np.ndarray:
        return fast_instances(tile_interior(image), params, self.prompt_decoder(image))


# --------------------------------------------------------------------------------------------
# The fast path, given a decoder
# --------------------------------------------------------------------------------------------
def fast_instances(interior: np.ndarray, params: GeneratorParams, decode: Decoder) -> np.ndarray:
    """Steps 2–6 of the fast path: the raw instance map (before ``postprocess``).

    ``interior`` is ``tile_interior(image)``; ``decode`` decodes one batch of at most
    ``params.points_per_batch`` prompts (``Sam2Engine.prompt_decoder``). The decoding is the
    only model call, so a caller that keeps decoded batches can rerun this with other
    thresholds without the model. The second round's prompts depend on what the first round
    painted (so on the thresholds): decoded batches can be reused, not precomputed once.
    """
    instances = np.zeros(interior.shape, dtype=np.int32)
    budget = params.points_per_side**2  # never more prompts than the stock grid
    grid_side = max(1, params.points_per_side // 2)
    min_radius = None
    for _ in range(FAST_ROUNDS):
        free = None if min_radius is None else instances == 0
        points, radii = tessera_prompts(interior, budget, grid_side, free=free, min_radius=min_radius)
        if len(points) == 0:
            break
        budget -= len(points)
        # Later rounds look for whole tiles that were missed, not slivers beside found ones.
        min_radius = 0.5 * float(np.median(radii))
        before = int(instances.max(initial=0))
        instances = _fast_round(points, params, decode, instances)
        if budget <= 0 or int(instances.max(initial=0)) == before:
            break
    return instances


def _fast_round(
    points: np.ndarray, params: GeneratorParams, decode: Decoder, instances: np.ndarray
) -> np.ndarray:
    """Decode, filter and paint one round of fast-path prompts; returns the updated map."""
    from sam2.utils.amg import batched_mask_to_box, calculate_stability_score
    from torchvision.ops import batched_nms

    h, w = instances.shape
    if len(points) == 0:
        return instances
    kept_logits, kept_ious = [], []
    for start in range(0, len(points), params.points_per_batch):
        chunk = points[start : start + params.points_per_batch]
        logits, ious = decode(chunk)
        lh, lw = logits.shape[-2:]
        # The prompt must lie inside its own mask (read at low resolution).
        px = torch.from_numpy(np.clip((chunk[:, 0] + 0.5) * lw / w, 0, lw - 1).astype(np.int64))
        py = torch.from_numpy(np.clip((chunk[:, 1] + 0.5) * lh / h, 0, lh - 1).astype(np.int64))
        inside = logits[torch.arange(len(chunk)), py, px] > params.mask_threshold
        stability = calculate_stability_score(logits, params.mask_threshold, params.stability_score_offset)
        keep = (ious > params.pred_iou_thresh) & (stability >= params.stability_score_thresh) & inside
        kept_logits.append(logits[keep])
        kept_ious.append(ious[keep])
    logits, ious = torch.cat(kept_logits), torch.cat(kept_ious)
    if len(ious) == 0:
        return instances
    boxes = batched_mask_to_box(logits > params.mask_threshold).float()
    kept = batched_nms(boxes, ious, torch.zeros_like(ious), params.box_nms_thresh)  # by IoU, descending
    logits = logits[kept]

    def full_res_masks() -> Iterator[np.ndarray]:
        for start in range(0, len(logits), 16):
            up = F.interpolate(logits[start : start + 16, None], (h, w), mode="bilinear", align_corners=False)
            yield from (up[:, 0] > params.mask_threshold).numpy()

    return paint_instances(full_res_masks(), (h, w), FAST_MIN_NEW_FRACTION, instances)
