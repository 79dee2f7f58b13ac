"""The guided path of full-image segmentation: SAM 2 draws the outline of each proposed tessera.

A base SAM 2 asked for "a mask" at a point of a mosaic has several right answers: the tessera,
a group of tesserae with their grout, the whole panel. Prompt-free generation with a base
model therefore keeps masks that cover many tesserae. Two facts settle the ambiguity:

* where the tesserae are: the classical engine's regions (``toolkit/classical.py``) are right
  for most tesserae; each gives one prompt (its interior point, as the dataset contract
  computes it) and its expected extent;
* how large a tessera is: SAM 2 returns three candidates per prompt (a fine-tune its one
  trained output). A candidate far larger than the proposal it was prompted from, or than the
  median proposal, is the wrong candidate, not a tessera.

So, per proposal: decode every candidate at the proposal's point, in a window of the decoder's
low-resolution logits one proposal-size wide around the proposal (the decoder's upscaling is
pixel-local, so the window costs a fraction of the full map and holds the same values). A
candidate is dropped when it does not hold its own prompt, reaches the window's edge (it spills
beyond the tessera), is larger than ``guided_max_area`` times the larger of the proposal's area
and the median proposal area, or is predicted under ``pred_iou_thresh``. Of the rest, the
best-scored is kept: predicted IoU plus its IoU with the proposal, which breaks near-ties toward
the tessera the proposal saw. A proposal left without a candidate, where SAM 2 confidently
(predicted IoU ``GROUT_IOU``) answers with a mask over its size limit that spills beyond the
window, sits on the grout network (a grout patch or a border strip the classical engine took
for a tile): it is dropped. Kept masks are upsampled (exact bilinear, as SAM 2's own
post-processing) in their window only and painted into one map by decreasing score, without
overwriting, skipping a mask that is mostly painted already (a duplicate). With a base model any
other proposal with no candidate left keeps the classical region, painted after all SAM 2 masks.
A fine-tune's one output is trained to outline tesserae and to predict its IoU with them, so a
proposal it leaves without an outline, predicted under ``TRAINED_DROP_FRACTION`` of its median
prediction over the proposals it did outline (about 0.5 for a good fine-tune: its outline more
wrong than right), is not a tessera: it is dropped, not painted back as its classical region (on the real photograph
these are grout patches; decision 0010). Relative to the median, a weak fine-tune, which scores
every outline low, keeps its proposals. A base model's low scores mean no such thing
(``drop_fraction=0``). A second round looks
for tesserae neither covered: edge-free discs in the unpainted tile interior
(``fast.tile_interior``) of at least ``SECOND_ROUND_RADIUS`` times the median proposal's radius
are prompted the same way; their outlines are kept, a disc SAM 2 cannot outline is dropped.
Post-processing drops pieces under ``min_area`` pixels or under ``SPECK_FRACTION`` of the
squared tessera size, whichever is smaller (``speck_area``): ``min_area``'s 64 px is 5 % of a
35-px tessera, but larger than a whole 8-px one. Last (``drop_grout_shapes``, after
``postprocess``), a region that fills less than
``GUIDED_MIN_SOLIDITY`` of its convex hull is dropped: it follows the grout between tilted
tesserae (branched, concave) where a tessera, cut stone or glass, is nearly convex (on the real
photograph no reference tessera fills under 0.84 of its hull, the grout regions 0.5-0.8).

Every region keeps a score (``guided_outlines``): the IoU SAM 2 predicted for the outline it
was painted from, times the share of the painted outline that post-processing left it
(``carried_scores``); 0 for a proposal painted as it is. The backend sends it with each
pre-label region, so a reviewer can open the least likely first, at no extra decoding.

Large images: each proposal is decoded once, in the tile (``core.tiling.plan_tiles``, about
100 tesserae, as the model was trained) whose core holds its point; a tile is encoded only
when it owns a proposal. Memory stays bounded: the features live in the engine's byte-bounded
cache, and a tile the second round needs after the cache let it go is encoded again.
"""
from __future__ import annotations

from typing import Callable, Iterator

import cv2
import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.measure import regionprops

from ..core.dataset import relabel_sequential, tessera_points
from ..core.instances import paint_windows, source_ids
from ..core.tiling import axis_spans, core_bounds
from .params import GeneratorParams

#: Decodes every candidate of positive prompts ``points`` (float32 Kx2, ``[x, y]`` pixels of the
#: image it is bound to) in square windows around ``centers`` (Kx2) wide enough for ``extent``
#: pixels: (logits K x M x L x L, IoU K x M, window top-left K x 2 ``[row, col]`` in
#: low-resolution pixels, the low-resolution size ``(lh, lw)``).
WindowDecoder = Callable[[np.ndarray, np.ndarray, float],
                         "tuple[torch.Tensor, torch.Tensor, np.ndarray, tuple[int, int]]"]

GUIDED_MIN_NEW_FRACTION = 0.5  # skip a mask when less than this part is still unpainted
MARGIN = 1.0  # the window reaches this many proposal diameters beyond the proposal's box
SECOND_ROUND_RADIUS = 0.3  # second round: discs of at least this part of the median proposal radius
AGREEMENT_WEIGHT = 1.0  # weight of a candidate's IoU with its proposal in its score
GROUT_IOU = 0.8  # a candidate this confident that spills beyond the window: the grout network
GUIDED_MIN_SOLIDITY = 0.75  # a region filling less of its convex hull follows the grout network
TRAINED_DROP_FRACTION = 0.5  # a fine-tune predicting this part of its median IoU or less: not a tessera
#: Pieces under this fraction of the squared tessera size are specks (the classical engine's
#: ``min_area``): the guided path's floor when it is below ``min_area`` in pixels.
SPECK_FRACTION = 0.05


def guided_instances(*args, **kwargs) -> np.ndarray:
    """The raw instance map of :func:`guided_outlines` (same arguments), without its scores."""
    return guided_outlines(*args, **kwargs)[0]


def guided_outlines(
    image: np.ndarray,
    proposals: np.ndarray,
    params: GeneratorParams,
    decoder_for: Callable[[np.ndarray], WindowDecoder],
    tile: int | None = None,
    overlap: int = 0,
    progress: Callable[[int], None] | None = None,
    *,
    second_round: bool = True,
    reference_area: float | None = None,
    keep_unoutlined: bool = True,
    drop_fraction: float = 0.0,
    reverse: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The raw instance map (before ``postprocess``) of SAM 2 outlines of ``proposals``, and
    each of its regions' score (float array indexed by id, ``scores[0]`` unused).

    A region's score is the IoU SAM 2 predicted for the outline painted; a proposal painted as
    it is (SAM 2 outlined none of its candidates) scores 0.

    ``proposals`` is an instance map of likely tesserae (the classical engine's);
    ``decoder_for(crop)`` encodes an image crop and returns its :data:`WindowDecoder`;
    ``tile``/``overlap`` cut a large image into crops (None: the whole image at once);
    ``progress(n)`` is told when n more tiles are done; ``keep_unoutlined`` paints the proposals
    SAM 2 did not outline as they are, except those whose every candidate is predicted under
    ``drop_fraction`` times the median predicted IoU of the outlined proposals
    (``TRAINED_DROP_FRACTION`` for a fine-tune, 0 for a base model).

    Memory: no tile's encoding is held here beyond the tile's own decoding; the second round
    asks ``decoder_for`` again for the tiles it prompts (the engine's byte-bounded cache answers,
    or encodes again what it evicted), visiting them last-encoded first (``reverse``), so a
    cache of N tiles spares N encodings. The order of the tiles does not change the map.
    """
    h, w = proposals.shape
    proposals = relabel_sequential(proposals.astype(np.int32, copy=False))
    count = int(proposals.max(initial=0))
    if count == 0:
        return np.zeros((h, w), dtype=np.int32), np.zeros(1)
    points = np.asarray(tessera_points(proposals), dtype=np.float32).reshape(-1, 2)
    areas = np.bincount(proposals.ravel(), minlength=count + 1)[1:].astype(np.float64)
    boxes = np.zeros((count, 4), dtype=np.int64)  # y0, y1, x0, x1
    for i, sl in enumerate(ndi.find_objects(proposals, max_label=count)):
        if sl is not None:
            boxes[i] = (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop)
    reference = float(np.median(areas)) if reference_area is None else reference_area
    cap = params.guided_max_area * np.maximum(areas, reference)
    tile = tile or max(h, w)
    rows, cols = axis_spans(h, tile, overlap), axis_spans(w, tile, overlap)
    row_of = np.searchsorted(core_bounds(rows, h)[1:-1], points[:, 1], side="right")
    col_of = np.searchsorted(core_bounds(cols, w)[1:-1], points[:, 0], side="right")

    fallback = np.ones(count, dtype=bool)
    predicted = np.full(count, np.nan)  # each proposal's best predicted IoU
    outlined = np.zeros(count, dtype=bool)  # SAM 2's outline kept
    tiles = [(r, c) for r in range(len(rows)) for c in range(len(cols))]
    # per tile: (rank, predicted IoU, y0, x0, mask in its box) of its kept masks
    per_tile: dict[tuple[int, int], list[tuple[float, float, int, int, np.ndarray]]] = {}
    for r, c in reversed(tiles) if reverse else tiles:
        (ty0, ty1), (tx0, tx1) = rows[r], cols[c]
        members = np.flatnonzero((row_of == r) & (col_of == c))
        if len(members):
            decode = decoder_for(np.ascontiguousarray(image[ty0:ty1, tx0:tx1]))
            outlines = per_tile[(r, c)] = []
            for start in range(0, len(members), params.points_per_batch):
                batch = members[start : start + params.points_per_batch]
                outlines += _outline_batch(decode, batch, proposals[ty0:ty1, tx0:tx1], points, boxes,
                                        cap, params, (ty0, tx0), fallback, predicted, outlined)
            del decode  # the tile's features go back to the engine's cache alone
        if progress is not None:
            progress(1)
    kept = [item for key in tiles for item in per_tile.get(key, ())]  # in tile order, however visited

    if drop_fraction > 0 and outlined.any():  # a fine-tune's "not a tessera"
        fallback &= ~(predicted < drop_fraction * float(np.median(predicted[outlined])))

    kept.sort(key=lambda item: -item[0])
    unoutlined = np.flatnonzero(fallback) if keep_unoutlined else np.zeros(0, dtype=np.int64)
    # each mask's score; a proposal SAM 2 did not outline: 0 (on the real photograph, most are wrong)
    offered = np.concatenate([[item[1] for item in kept], np.zeros(len(unoutlined))])

    def masks() -> Iterator[tuple[int, int, np.ndarray]]:
        for _, _, y0, x0, mask in kept:
            yield y0, x0, mask
        for index in unoutlined:  # the proposal itself
            y0, y1, x0, x1 = boxes[index]
            yield int(y0), int(x0), proposals[y0:y1, x0:x1] == index + 1

    positions: list[int] = []
    painted = paint_windows(masks(), (h, w), GUIDED_MIN_NEW_FRACTION, painted=positions)
    scores = np.concatenate([[0.0], offered[positions]])
    if not second_round:
        return painted, scores
    # Second round: tesserae neither the proposals nor SAM 2 covered (small fragments, tiles the
    # classical engine merged into grout): edge-free discs of at least SECOND_ROUND_RADIUS times
    # the median proposal's radius in the unpainted tile interior, outlined by SAM 2 or dropped.
    from .fast import tessera_prompts, tile_interior

    free = tile_interior(image) & (painted == 0)
    min_radius = SECOND_ROUND_RADIUS * float(np.sqrt(reference / np.pi))
    centres, radii = tessera_prompts(free, count, 0, min_radius=min_radius)
    if len(centres) == 0:
        return painted, scores
    discs = np.zeros((h, w), dtype=np.int32)
    for i, ((x, y), radius) in enumerate(zip(centres, radii)):
        cv2.circle(discs, (int(x), int(y)), max(1, int(radius)), i + 1, -1)
    discs[~free] = 0
    found, found_scores = guided_outlines(image, discs, params, decoder_for, tile, overlap, second_round=False,
                                          reference_area=reference, keep_unoutlined=False, reverse=True)
    slices = [(k + 1, sl) for k, sl in enumerate(ndi.find_objects(found)) if sl is not None]
    windows = ((sl[0].start, sl[1].start, found[sl] == label) for label, sl in slices)
    positions = []
    painted = paint_windows(windows, (h, w), GUIDED_MIN_NEW_FRACTION, painted, painted=positions)
    labels = np.array([label for label, _ in slices], dtype=np.int64)
    return painted, np.concatenate([scores, found_scores[labels[positions]]])


def _outline_batch(
    decode: WindowDecoder, batch: np.ndarray, crop_proposals: np.ndarray, points: np.ndarray,
    boxes: np.ndarray, cap: np.ndarray, params: GeneratorParams, origin: tuple[int, int],
    fallback: np.ndarray, predicted: np.ndarray, outlined: np.ndarray,
) -> list[tuple[float, float, int, int, np.ndarray]]:
    """Decode one batch of proposals of one tile; the kept masks (rank score, predicted IoU,
    window) in image coordinates. Updates
    ``fallback`` (the classical region is kept), ``predicted`` (best predicted IoU) and
    ``outlined`` (SAM 2's outline kept) of the batch's proposals."""
    ty0, tx0 = origin
    th, tw = crop_proposals.shape
    local_points = points[batch] - np.array([tx0, ty0], dtype=np.float32)
    b = boxes[batch] - np.array([ty0, ty0, tx0, tx0])
    centers = np.stack([(b[:, 2] + b[:, 3]) / 2, (b[:, 0] + b[:, 1]) / 2], axis=1)
    extent = float(np.max(np.maximum(b[:, 1] - b[:, 0], b[:, 3] - b[:, 2])))
    logits, ious, corners, (lh, lw) = decode(local_points, centers, extent * (1 + 2 * MARGIN))
    k, m, size, _ = logits.shape
    sy, sx = th / lh, tw / lw  # crop pixels per low-resolution pixel
    fg = (logits > params.mask_threshold).numpy()
    ious = ious.numpy()
    out = []
    for i in range(k):
        index = int(batch[i])
        r0, c0 = int(corners[i, 0]), int(corners[i, 1])
        cand = fg[i]  # M x size x size
        area = cand.reshape(m, -1).sum(1) * sy * sx
        py = int(np.clip((local_points[i, 1] + 0.5) / sy, 0, lh - 1)) - r0
        px = int(np.clip((local_points[i, 0] + 0.5) / sx, 0, lw - 1)) - c0
        inside = cand[:, py, px] if 0 <= py < size and 0 <= px < size else np.zeros(m, dtype=bool)
        edge = np.zeros(m, dtype=bool)  # touches a window edge that is not the image's edge
        if r0 > 0:
            edge |= cand[:, 0, :].any(1)
        if c0 > 0:
            edge |= cand[:, :, 0].any(1)
        if r0 + size < lh:
            edge |= cand[:, -1, :].any(1)
        if c0 + size < lw:
            edge |= cand[:, :, -1].any(1)
        own = _low_res_region(crop_proposals, index + 1, (r0, c0), size, (sy, sx))
        inter = (cand & own).reshape(m, -1).sum(1)
        union = np.maximum((cand | own).reshape(m, -1).sum(1), 1)
        score = ious[i] + AGREEMENT_WEIGHT * inter / union
        predicted[index] = float(ious[i].max())
        valid = inside & ~edge & (area <= cap[index]) & (ious[i] > params.pred_iou_thresh)
        if not valid.any():
            # SAM 2 confidently answers with a network spanning many tesserae: the point is on
            # grout (a patch the classical engine took for a tile), not on a tessera
            if np.any(inside & edge & (area > cap[index]) & (ious[i] >= GROUT_IOU)):
                fallback[index] = False
            continue
        best = int(np.argmax(np.where(valid, score, -np.inf)))
        y0, x0, mask = upsample_window(logits[i, best].numpy(), (r0, c0), (lh, lw), (th, tw),
                                       params.mask_threshold)
        if mask.any():
            fallback[index], outlined[index] = False, True
            by, bx = ndi.find_objects(mask.view(np.uint8))[0]  # its box: a ninth of the window
            out.append((float(score[best]), float(ious[i, best]), y0 + ty0 + by.start, x0 + tx0 + bx.start,
                        mask[by, bx]))
    return out


def _low_res_region(crop_proposals: np.ndarray, label: int, corner: tuple[int, int], size: int,
                    scale: tuple[float, float]) -> np.ndarray:
    """Proposal ``label`` sampled at the centres of a ``size``-square window of low-res pixels."""
    th, tw = crop_proposals.shape
    sy, sx = scale
    ys = np.clip(((np.arange(size) + corner[0] + 0.5) * sy).astype(np.int64), 0, th - 1)
    xs = np.clip(((np.arange(size) + corner[1] + 0.5) * sx).astype(np.int64), 0, tw - 1)
    return crop_proposals[np.ix_(ys, xs)] == label


def _interp_matrix(out_start: int, out_stop: int, scale: float, src_start: int, src_len: int,
                   src_total: int) -> np.ndarray:
    """Bilinear weights (out x src_len) of torch's ``interpolate(align_corners=False)`` from a
    ``src_total`` axis to an output axis ``scale`` times finer, for output pixels
    ``[out_start, out_stop)`` and source pixels ``[src_start, src_start + src_len)``."""
    out = np.arange(out_start, out_stop, dtype=np.float64)
    src = np.maximum((out + 0.5) / scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), src_total - 1)
    i1 = np.minimum(i0 + 1, src_total - 1)
    frac = src - i0
    weights = np.zeros((len(out), src_len))
    rows = np.arange(len(out))
    np.add.at(weights, (rows, np.clip(i0 - src_start, 0, src_len - 1)), 1.0 - frac)
    np.add.at(weights, (rows, np.clip(i1 - src_start, 0, src_len - 1)), frac)
    return weights


def upsample_window(
    logits: np.ndarray, corner: tuple[int, int], low_hw: tuple[int, int], hw: tuple[int, int],
    threshold: float,
) -> tuple[int, int, np.ndarray]:
    """The image-size mask of a window of low-resolution logits: (row, column, boolean mask).

    The same values as upsampling the whole low-resolution map bilinearly to the image size
    (SAM 2's post-processing) and cutting the window's interior: the outermost low-resolution
    pixel on each side (not at the image border) only serves as context.
    """
    size = logits.shape[0]
    (r0, c0), (lh, lw), (h, w) = corner, low_hw, hw
    sy, sx = h / lh, w / lw
    y0 = 0 if r0 == 0 else int(np.ceil((r0 + 1) * sy))
    y1 = h if r0 + size >= lh else int(np.floor((r0 + size - 1) * sy))
    x0 = 0 if c0 == 0 else int(np.ceil((c0 + 1) * sx))
    x1 = w if c0 + size >= lw else int(np.floor((c0 + size - 1) * sx))
    rows = _interp_matrix(y0, y1, sy, r0, size, lh)
    cols = _interp_matrix(x0, x1, sx, c0, size, lw)
    up = rows @ logits.astype(np.float64) @ cols.T
    return y0, x0, up > threshold


def carried_scores(raw: np.ndarray, raw_scores: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """The scores of ``instances`` (float array indexed by id, ``[0]`` unused) from those of the
    ``raw`` map they were post-processed from (which only removes pixels, splits and renumbers,
    so every region lies in one raw region): the raw region's score times the share of its
    area the region kept. A piece holding a fifth of an outline has at most a fifth of its IoU
    with the tessera the outline fits (on the real photograph such pieces are wrong regions)."""
    ids, source = source_ids(instances, raw)
    kept = np.bincount(instances.ravel())[ids] / np.bincount(raw.ravel())[source]
    out = np.zeros(int(instances.max(initial=0)) + 1)
    out[ids] = raw_scores[source] * np.minimum(kept, 1.0)
    return out


def speck_area(min_area: int, tessera_size: float) -> int:
    """The guided path's speck floor (px): ``min_area``, or ``SPECK_FRACTION`` of the squared
    ``tessera_size`` when that is smaller (fine tesserae)."""
    return min(int(min_area), int(round(SPECK_FRACTION * tessera_size**2)))


def drop_grout_shapes(instances: np.ndarray, min_solidity: float = GUIDED_MIN_SOLIDITY) -> np.ndarray:
    """``instances`` without the regions filling less than ``min_solidity`` of their convex hull
    (module docstring), renumbered 1..N in raster order."""
    concave = [p.label for p in regionprops(instances) if p.solidity < min_solidity]
    if not concave:
        return instances
    return relabel_sequential(np.where(np.isin(instances, concave), 0, instances))
