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
     (the model's decoder output, ``sam.adapter.select_output``: token 0 with SAM 2's stability
     fallback for a base model, exactly the trained token for a fine-tune);
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
becomes its own tessera and pieces smaller than ``min_area`` pixels are dropped (or smaller than
``guided.SPECK_FRACTION`` of the squared tessera size, when that is less and the size is known:
``guided.speck_area``, so that a whole fine tessera is not a speck).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..core.cache import ByteLRU
from ..core.errors import InternalError, MosaicError
from .adapter import PromptDecoder, Sam2Adapter, autocast, stock_generator
from ..core.instances import paint_instances, postprocess
from .fast import Decoder, FastState, tile_interior
from .guided import (TRAINED_DROP_FRACTION, WindowDecoder, carried_scores, drop_grout_shapes, guided_outlines,
                     speck_area)
from .params import METHODS, OUTPUT_SAM2, GeneratorParams
from .models import ModelSpec, declare_output, load_model, model_version, pick_device, resolve_model

DEFAULT_CACHE_BYTES = 512 * 2**20  # ~32 images at 1024² (16 MiB of features each)


# --------------------------------------------------------------------------------------------
# Pure array functions
# --------------------------------------------------------------------------------------------
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
    """One loaded SAM 2 model: cached click prediction and full-image segmentation.

    ``output`` is the decoder output the model is served with (``sam.adapter``, "Decoder
    outputs"; default: the spec's, else SAM 2's own choice): clicks, the fast path and the
    stock generator all decode with it. ``decoded_tokens()`` counts the decoder tokens of
    every mask decoded so far.
    """

    name = "sam2"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        version: str,
        params: GeneratorParams | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        spec: ModelSpec | None = None,
        output: str | None = None,
    ) -> None:
        self.model = model
        self.model_version = version
        self.params = params or GeneratorParams()
        self.spec = spec
        self.output = output or (spec.output if spec is not None else OUTPUT_SAM2)
        self.device = model.device
        self._sam = Sam2Adapter(model, self.output)
        self._decoder = PromptDecoder(model, self.output)
        self._cache: ByteLRU[_Encoded] = ByteLRU(int(cache_bytes), lambda entry: entry.nbytes)
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
        overrides: Mapping[str, Any] | None = None,
        version: str | None = None,
        output: str | None = None,
    ) -> "Sam2Engine":
        """A ready engine from a model name, checkpoint or fine-tune path, or a ModelSpec.

        Generator parameters come from the fine-tune's metadata when it was tuned, else the
        defaults, with ``overrides`` laid over them. ``image_size`` overrides the model's input
        resolution (tests, benchmarks); ``version`` the reported model version; ``output``
        declares which decoder output a checkpoint was trained on (``models.declare_output``).
        """
        if not isinstance(spec, ModelSpec):
            spec = resolve_model(spec, base=base, output=output)
        elif output is not None:
            spec = declare_output(spec, output)
        if image_size is not None:
            spec = dataclasses.replace(spec, image_size=image_size)
        model = load_model(spec, pick_device(device))
        return cls(
            model,
            version=version or model_version(spec),
            params=GeneratorParams.from_dict({**(spec.generator or {}), **(overrides or {})}),
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
    def cache_bytes(self) -> int:
        """Budget of the embedding cache (bytes); entries beyond it are evicted on the next encode."""
        return self._cache.max_bytes

    @cache_bytes.setter
    def cache_bytes(self, value: int) -> None:
        self._cache.max_bytes = int(value)

    @property
    def cache_used_bytes(self) -> int:
        return self._cache.used_bytes

    def cached_keys(self) -> list[str]:
        """Keys of cached images, least recently used first."""
        return self._cache.keys()

    def clear_cache(self) -> None:
        self._cache.clear()

    def decoded_tokens(self) -> dict[int, int]:
        """How many masks each decoder token produced so far (clicks, fast and stock paths)."""
        return dict(self._sam.served.tokens_seen + self._decoder.served.tokens_seen)

    def _encoded(self, image: np.ndarray) -> tuple[str, _Encoded]:
        """Features of ``image`` from the cache, running the image encoder on a miss."""
        key = self.image_key(image)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                return key, entry
            with torch.inference_mode(), self._autocast():
                features = self._sam.encode(image)
            tensors = [features["image_embed"], *features["high_res_feats"]]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            entry = _Encoded(features, (image.shape[0], image.shape[1]), nbytes)
            self._cache.put(key, entry)  # least recently used entries beyond cache_bytes drop
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
        max_area: float | None = None,
        threshold: float = 0.0,
    ) -> tuple[np.ndarray, float]:
        """The mask for click prompts on ``image`` and its predicted IoU.

        ``points`` are ``[x, y]`` pixel coordinates, ``labels`` 1 (tessera) or 0 (not this
        tessera), ``box`` an optional ``[x0, y0, x1, y1]``. For a base model a single click is
        ambiguous, so SAM 2 decodes three masks and the best-scored one is returned; several
        clicks or a box give one mask. A fine-tuned model answers with the output it was
        trained on, and only that (``sam.adapter.select_output``). Logits are thresholded at
        ``threshold`` (0 is SAM's own; the tuned ``mask_threshold`` belongs to full-image
        segmentation; the backend's clicks pass ``MOSAIC_BACKEND_CLICK_MASK_THRESHOLD``).
        ``last_click_token`` is the decoder token of the mask returned. ``max_area`` (pixels,
        e.g. a few times a tessera's area): of several candidates, those larger are not this
        tessera (a mask spanning its neighbours and their grout) and lose to any smaller one.
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
        with self._lock:
            _, entry = self._encoded(image)
            with torch.inference_mode(), self._autocast():
                logits, scores, tokens = self._sam.click(entry.features, entry.hw, coords, labs, box_arr)
            ranked = np.asarray(scores, dtype=np.float64)
            if max_area is not None and len(ranked) > 1:
                small = (logits > 0).reshape(len(ranked), -1).sum(axis=1) <= max_area
                if small.any():
                    ranked = np.where(small, ranked, -np.inf)
            best = int(np.argmax(ranked))
            self.last_click_token = int(tokens[best])
        return logits[best] > threshold, float(scores[best])

    last_click_token: int | None = None

    # ---------------------------------------------------------------- full image
    def segment(
        self, image: np.ndarray, params: GeneratorParams | None = None, method: str | None = None,
        *, tessera_size: float | None = None, statistics: Any = None,
    ) -> np.ndarray:
        """Instance map (int32, 0 = background, 1..N) of every tessera in ``image``.

        ``params`` default to the engine's (tuned) parameters; ``method`` overrides
        ``params.method`` ("fast", "stock" or "guided", see the module docstring).
        ``tessera_size`` (px) lowers the speck floor ``min_area`` for fine tesserae on every
        path (``guided.speck_area``); with ``statistics`` (the classical engine's, for the whole
        image) it also serves the guided method's proposals.
        """
        image = as_rgb(image)
        params = params or self.params
        method = method or params.method
        if method not in METHODS:
            raise MosaicError(f"segment: unknown method {method!r} (choose from {METHODS})")
        floor = params.min_area if tessera_size is None else speck_area(params.min_area, tessera_size)
        with self._lock:
            if method == "fast":
                return self.prepare_fast(image).generate(params, min_area=floor)
            if method == "guided":
                return self.segment_guided(image, params, tessera_size=tessera_size, statistics=statistics)
            raw = self._segment_stock(image, params)
        return postprocess(raw, params.opening, floor, params.erosion)

    def candidate_decoder(self, image: np.ndarray) -> WindowDecoder:
        """A :data:`guided.WindowDecoder` on ``image`` (encoded now, or taken from the cache).

        Each call decodes every candidate of a batch of positive prompts in a square window of
        the low-resolution logits around each prompt's ``center``, wide enough for ``extent``
        image pixels; it returns (logits K x M x L x L, IoU K x M, window top-left K x 2
        ``[row, column]`` in low-resolution pixels, the low-resolution size ``(lh, lw)``).
        """
        with self._lock:
            _, entry = self._encoded(as_rgb(image))
        grid_h, grid_w = self._sam.feat_sizes[-1]
        low_h, low_w = self._sam.feat_sizes[0]
        h, w = entry.hw
        per_px = max(grid_h / h, grid_w / w)

        def decode(points: np.ndarray, centers: np.ndarray, extent: float):
            cells = int(min(grid_h, grid_w, max(2, math.ceil(extent * per_px) + 2)))
            top = np.clip(np.round(centers[:, 1] * grid_h / h - cells / 2), 0, grid_h - cells)
            left = np.clip(np.round(centers[:, 0] * grid_w / w - cells / 2), 0, grid_w - cells)
            windows = torch.from_numpy(np.stack([top, left], axis=1).astype(np.int64))
            with self._lock:
                logits, ious = self._decode(entry, points, max(1, len(points)), multimask=True,
                                            windows=windows, cells=cells)
            scale = low_h // grid_h
            return logits, ious, windows.numpy() * scale, (low_h, low_w)

        return decode

    def segment_guided(
        self, image: np.ndarray, params: GeneratorParams | None = None, *,
        tessera_size: float | None = None, statistics: Any = None, proposals: np.ndarray | None = None,
        tile: int | None = None, overlap: int | None = None, progress: Any = None,
        decoder_for: Any = None, with_scores: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, list[float]]:
        """The guided path (``sam.guided``): SAM 2 outlines of the classical engine's proposals.

        ``proposals`` default to ``ClassicalEngine().segment(image, tessera_size, statistics)``;
        ``tile``/``overlap`` to about 100 tesserae per tile (``core.tiling.resolve_tiling``);
        ``decoder_for`` to :meth:`candidate_decoder` (``tune`` passes one that remembers).
        ``with_scores`` also returns every tessera's score (tessera 1 first): the IoU SAM 2
        predicted for the outline painted (``guided.guided_outlines``), no extra decoding.
        """
        from ..classical import ClassicalEngine
        from ..core.scale import estimate_tessera_size
        from ..core.tiling import resolve_tiling

        image = as_rgb(image)
        params = params or self.params
        if tessera_size is None:
            tessera_size = estimate_tessera_size(image)
        if proposals is None:
            proposals = ClassicalEngine().segment(image, tessera_size=tessera_size, statistics=statistics)
        tile, overlap = resolve_tiling(image, tile, overlap, tessera_size)
        with self._lock:
            raw, raw_scores = guided_outlines(
                image, proposals, params, decoder_for or self.candidate_decoder, tile, overlap, progress,
                drop_fraction=0.0 if self.output == OUTPUT_SAM2 else TRAINED_DROP_FRACTION)
        min_area = speck_area(params.min_area, tessera_size)
        instances = drop_grout_shapes(postprocess(raw, params.opening, min_area, params.erosion))
        if not with_scores:
            return instances
        return instances, [float(v) for v in carried_scores(raw, raw_scores, instances)[1:]]

    def _segment_stock(self, image: np.ndarray, params: GeneratorParams) -> np.ndarray:
        generator = stock_generator(
            self.model,
            self._sam.served,
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
        """One-mask decoding of many positive prompts: (low-res logits Nxhxw, IoU N).

        The mask is the model's decoder output (``self.output``).

        Runs the prompt encoder and mask decoder directly on the cached features in batches
        of ``batch`` prompts (what ``SAM2ImagePredictor._predict`` does for one batch, without
        upsampling every mask to the image size).
        """
        with self._lock:
            if isinstance(key_or_image, str):
                entry = self._cache.get(key_or_image)
                if entry is None:
                    raise InternalError("decode_points: image is not in the embedding cache")
            else:
                _, entry = self._encoded(as_rgb(key_or_image))
            return self._decode(entry, points, batch)

    def _decode(self, entry: _Encoded, points: np.ndarray, batch: int, multimask: bool = False,
                windows: torch.Tensor | None = None, cells: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits N x h x w, IoU N); with ``multimask`` every candidate (N x M x h x w, N x M);
        with ``windows`` (N x 2 embedding cells) the logits in those ``cells``-square windows."""
        feats = entry.features
        side = self._sam.feat_sizes[0]
        if len(points) == 0:
            m = (3 if self.output == OUTPUT_SAM2 else 1,) if multimask else ()
            return torch.zeros((0, *m, *side)), torch.zeros((0, *m))
        coords = torch.as_tensor(points, dtype=torch.float32, device=self.device)
        coords = self._sam.model_coords(coords, entry.hw)
        logits, ious = [], []
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(coords), batch):
                chunk = coords[start : start + batch]
                window = None if windows is None else [windows[start : start + batch].to(self.device)]
                [(low_res, iou)] = self._decoder([(feats["image_embed"], feats["high_res_feats"], chunk)],
                                                 multimask=multimask, windows=window, window_cells=cells)
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

    def prepare_fast(self, image: np.ndarray) -> FastState:
        """The threshold-independent part of the fast path for ``image`` (encodes it now)."""
        image = as_rgb(image)
        return FastState(tile_interior(image), self.prompt_decoder(image))
