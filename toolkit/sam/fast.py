"""The fast path of full-image segmentation: tile-interior prompts, two decoding rounds.

The model's work (encoding the image, decoding prompt batches) does not depend on the
thresholds, so it is split from the cheap part, as micro-sam splits ``initialize`` from
``generate``: ``Sam2Engine.prepare_fast(image)`` returns a :class:`FastState` (the tile-interior
map and a decoder bound to the image's features) and ``state.generate(params)`` gives the
instance map. ``toolkit/training/tune.py`` uses exactly this, with a memo around the decoder.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..core.instances import disk as _disk, paint_instances, postprocess
from .params import GeneratorParams

FAST_ROUNDS = 2  # prompt placement + decoding passes of the fast path
FAST_MIN_NEW_FRACTION = 0.5  # fast path: skip a mask when less than this part is unpainted

#: Decodes one batch of positive prompt points ``[x, y]`` (float32 Nx2, image pixels) into
#: (low-resolution mask logits Nxhxw, predicted IoU N), both float32 on the CPU.
Decoder = Callable[[np.ndarray], "tuple[torch.Tensor, torch.Tensor]"]


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


@dataclass(frozen=True)
class FastState:
    """What the fast path needs of one image that does not depend on the thresholds."""

    interior: np.ndarray  # tile_interior(image)
    decode: Decoder  # bound to the image's features

    def generate(self, params: GeneratorParams, min_area: int | None = None) -> np.ndarray:
        """The post-processed instance map under ``params`` (what ``Sam2Engine.segment`` returns);
        ``min_area`` replaces ``params.min_area`` (the engine passes its scale-aware floor)."""
        raw = fast_instances(self.interior, params, self.decode)
        return postprocess(raw, params.opening, params.min_area if min_area is None else min_area, params.erosion)

    def with_decoder(self, decode: Decoder) -> "FastState":
        """The same state decoding through ``decode`` (e.g. a memo wrapping ``self.decode``)."""
        return replace(self, decode=decode)


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
