"""The classical (no-weights) segmentation engine: colour-gradient, marker-controlled watershed.

It needs no model weights, so it is the default engine when no SAM 2 checkpoint is installed, and
it is the baseline row of every evaluation (the mosaic literature's TOS approach is a watershed
of the same family). The pipeline, all on Lab colour:

0. *Scale and working scale*: the tessera size comes from ``scale.estimate_scale`` (the period
   of the grout network, independent of any segmentation) unless the caller gives it. Stage 1
   (steps 1-3) runs on a copy shrunk until tiles measure ~45 px, or ~20 px when the tiles are
   textured (their interiors, step 2, are fragmented to under half a tessera); stage 2
   (steps 4-7) always runs at full resolution, on the regions scaled back up.
1. *Boundary map*: colour gradient magnitude plus a thin-line (Hessian ridge) strength, so that
   grout lines one or two pixels wide show up even where the two tiles have the same colour.
2. *Tile interiors*: pixels below a threshold of the boundary map (Otsu's threshold of its
   logarithm, which separates flat tile interiors from edges whatever the image's contrast).
   Their distance transform gives the typical tessera size and one marker per tile (its local
   maxima, at least a fraction of a tessera apart).
3. *Regions*: a watershed of the boundary map from those markers partitions the image, one
   region per tessera plus its share of the surrounding grout. Regions much larger than the
   typical one are re-split with a local threshold (a weak grout line between similar tiles).
4. *Colour models*: per region a linear colour ramp fitted to its central pixels (tiles are
   tilted and unevenly lit), and a smooth grout colour map fitted to the pixels that look like
   grout; every pixel gets a score from -1 (its tile's colour) to +1 (the grout's colour).
   Grout-coloured regions that are large and flat, or thin, are background (plain grout, mortar
   where tiles are missing, a wall around the mosaic); other grout-coloured regions are tiles
   whose border only the gradient can find.
5. *Tile / grout split*: a second watershed, on a finer colour gradient, grows the confidently
   tile-coloured pixels of each region and the confidently grout-coloured pixels into the
   uncertain band between them, so the tile border lands on the strongest edge (not on the dark
   bevel of a tile or the shadow in the grout).
6. *Clean-up*: touching tiles are separated by one grout pixel (the more grout-like of the two),
   every tile keeps its largest 4-connected piece with holes filled, and slivers are dropped.
7. *Fragment merging* (``merge_fragments``): a region adjacency graph of the tiles that face
   each other across a one-pixel separation; pairs whose separation is tile-coloured rather
   than grout-coloured and whose colours agree are joined, most tile-like first, while the
   union stays under 1.3 median tessera areas (texture and highlights split real tiles).
8. *Tidy at the scale* (``_tidy``): notches closed, grout junction specks, strips of grout
   line and crumbs dropped, all lengths in estimated tessera diameters.
9. *Missed tesserae* (``rescue_missed``): tesserae too narrow to have an interior at the
   working scale got no marker; solid pieces of the remaining background coloured unlike the
   grout (the smooth grout map and the grout right around them) become tiles, large ones
   split at their colour edges.
10. *Outlines onto the edge* (``snap_outlines``): a watershed of the fine colour gradient in a
   band of -0.05..+0.1 tessera diameters around every tile border moves it onto the
   strongest edge there (the clean-up leaves borders a pixel or two inside soft tile edges);
   a pixel that changes hands never touches another tile, not even diagonally. Step 8 then
   runs once more on the moved outlines (smooth outlines, and the rescued tiles judged too).

Output: an int32 instance map, 0 = grout / background, ids 1..N in raster order, every id one
4-connected component, no two tiles 4-adjacent. A 1024x1024 image takes 2-4 s on one core.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from .core.dataset import FOUR_CONNECTED, relabel_sequential
from .core.errors import MosaicError
from .core.scale import estimate_scale


@dataclass
class ClassicalParams:
    """Tunable knobs of the classical engine. Lengths marked "fraction" are relative to the
    estimated tessera size, so the defaults work from tiny to large tesserae."""

    work_size: float = 45.0  # tesserae larger than ~1.5x this (px) are segmented shrunk
    textured_work_size: float = 20.0  # the same for textured tesserae (fragmented interiors)
    fragmented: float = 0.5  # interiors narrower than this fraction of a tessera: textured
    sigma: float = 1.0  # Gaussian sigma (px) before the colour gradient of the boundary map
    ridge_weight: float = 1.0  # weight of the thin-line (Hessian) strength in the boundary map
    ridge_sigma: float = 1.0  # scale (px) of the thin-line detector, about half a grout width
    grad_k: float = 1.2  # interior threshold = grad_k x Otsu threshold of the log boundary map
    grad_min: float = 2.0  # lowest interior threshold (Lab units per px): flat, noise-free images
    marker_min_distance: float = 0.35  # fraction: minimum distance between two tile markers
    marker_min_radius: float = 0.15  # fraction: a marker lies this deep inside a tile interior
    compactness: float = 0.0  # watershed compactness of the regions (0 = classic watershed)
    class_sigma: float = 0.5  # Gaussian sigma (px) of the colours scored as tile or grout
    edge_sigma: float = 0.5  # Gaussian sigma (px) of the gradient the tile border snaps to
    tile_confidence: float = 0.5  # score below -this: surely tile (a seed of the 2nd watershed)
    grout_confidence: float = 0.6  # score above this: surely grout
    min_contrast: float = 6.0  # tile-grout colour distance (Lab) below which colour is ignored
    split_area: float = 1.8  # regions above this many typical areas are re-split locally
    background_area: float = 3.0  # flat grout-coloured areas above this many typical areas: bg
    min_roundness: float = 0.2  # grout-coloured regions less round than this are grout (bg)
    min_area: float = 0.05  # fraction of the squared tessera size: smaller tiles are dropped
    merge_reach: int = 1  # px: grout evidence is taken this far around the separation
    merge_colour: float = 18.0  # Lab distance: fragments of one tile differ less than this
    merge_score: float = -0.1  # mean grout score between fragments below this: no grout there
    merge_area: float = 1.3  # merged fragments stay under this many median tessera areas
    close_radius: float = 0.12  # tessera diameters: notches narrower than ~twice this close
    open_radius: float = 0.05  # tessera diameters: spurs narrower than ~twice this are cut
    min_tile_area: float = 0.12  # median tessera areas: smaller tiles are crumbs
    grout_speck_area: float = 0.5  # median tessera areas: grout-coloured tiles under it: grout
    min_inradius: float = 0.1  # tessera diameters: thinner tiles are strips of grout
    rescue_contrast: float = 2.0  # x min_contrast: a tile found in the grout differs this much
    snap_out: float = 0.1  # tessera diameters: a tile border may move this far out (0: no snap)
    snap_in: float = 0.05  # tessera diameters: ... and this far in, to the strongest edge

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassicalParams":
        """Parameters from a dict (e.g. JSON); unknown keys are an error, missing keys default."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MosaicError(f"classical parameters: unknown key(s) {', '.join(unknown)}")
        try:
            return cls(**{k: type(getattr(cls(), k))(v) for k, v in data.items()})
        except (TypeError, ValueError) as exc:
            raise MosaicError(f"classical parameters: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Image maps
# --------------------------------------------------------------------------------------------
def _check_image(image: np.ndarray) -> np.ndarray:
    """An RGB uint8 HxWx3 array (grey and RGBA are accepted and converted)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise MosaicError(
            f"classical engine: expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}"
        )
    if min(image.shape[:2]) < 8:
        raise MosaicError(
            f"classical engine: image {image.shape[1]}x{image.shape[0]} is too small (min 8x8)"
        )
    return np.ascontiguousarray(image[..., :3])


def _lab(image: np.ndarray) -> np.ndarray:
    """CIE Lab as float32 (L 0..100): distances there follow perceived colour differences."""
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def _gradient(lab: np.ndarray) -> np.ndarray:
    """Colour gradient magnitude in Lab units per pixel (Scharr, all channels together)."""
    sq = np.zeros(lab.shape[:2], np.float32)
    for c in range(3):
        gx = cv2.Scharr(lab[..., c], cv2.CV_32F, 1, 0, borderType=cv2.BORDER_REFLECT)
        gy = cv2.Scharr(lab[..., c], cv2.CV_32F, 0, 1, borderType=cv2.BORDER_REFLECT)
        sq += gx * gx + gy * gy
    return np.sqrt(sq) / 32.0  # Scharr's kernel weights sum to 32 per unit step


def _ridge(lab: np.ndarray) -> np.ndarray:
    """Thin-line strength: the largest absolute Hessian eigenvalue, over the Lab channels.

    A grout line a pixel or two wide is a ridge (or valley) of every channel it differs in; its
    gradient is weak after blurring, its second derivative is not.
    """
    sq = np.zeros(lab.shape[:2], np.float32)
    for c in range(3):
        ch = lab[..., c]
        dxx = cv2.Sobel(ch, cv2.CV_32F, 2, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
        dyy = cv2.Sobel(ch, cv2.CV_32F, 0, 2, ksize=3, borderType=cv2.BORDER_REFLECT)
        dxy = cv2.Sobel(ch, cv2.CV_32F, 1, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
        lam = np.abs(dxx + dyy) * 0.5 + np.sqrt(((dxx - dyy) * 0.5) ** 2 + dxy * dxy)
        sq += lam * lam
    return np.sqrt(sq) / 4.0  # the 3x3 second-derivative kernels weigh 4 per unit curvature


def _boundary_map(lab: np.ndarray, p: ClassicalParams) -> np.ndarray:
    """Edge-and-line strength: high on grout and on colour edges, low inside tiles."""
    grad = _gradient(_blur(lab, p.sigma))
    if p.ridge_weight > 0:
        ridge = _ridge(_blur(lab, p.ridge_sigma)) * p.ridge_weight
        grad = np.sqrt(grad * grad + ridge * ridge)
    return grad


def _interior_threshold(boundary: np.ndarray, p: ClassicalParams) -> float:
    """Otsu's threshold of the log boundary map: flat interiors vs. edges, scale-free."""
    logb = np.log(boundary + 0.5)
    if float(logb.max() - logb.min()) < 1e-6:
        return p.grad_min
    t = float(np.exp(threshold_otsu(logb)) - 0.5)
    return max(p.grad_k * t, p.grad_min)


def _interior_size(interior: np.ndarray, dist: np.ndarray) -> float:
    """Typical tessera size from the inscribed radii of the interior components.

    Each component's deepest point is about one tile's inradius even when a weak grout line
    lets two tiles merge, so the median is robust to under-segmentation.
    """
    labels, n = ndi.label(interior, structure=FOUR_CONNECTED)
    if n == 0:
        return max(4.0, min(interior.shape) / 4)
    radii = np.asarray(ndi.maximum(dist, labels, np.arange(1, n + 1)))
    radii = radii[radii >= 2]
    if radii.size == 0:
        return 4.0
    # +1 per side: the threshold eats about a pixel of every tile's border.
    return float(2 * np.median(radii) + 2)


# --------------------------------------------------------------------------------------------
# Colour models
# --------------------------------------------------------------------------------------------
def _region_colour_ramps(
    colour: np.ndarray, regions: np.ndarray, fit: np.ndarray, n: int
) -> np.ndarray:
    """Per pixel, its region's colour predicted by a linear ramp ``a + b*x + c*y`` per region.

    The ramp is fitted (least squares, slopes shrunk towards 0) to the pixels where ``fit`` is
    True; it follows tilted tiles and lighting gradients that a single mean colour would not.
    Every region needs at least one ``fit`` pixel.
    """
    h, w = regions.shape
    yy, xx = np.mgrid[0:h, 0:w]
    sel = fit & (regions > 0)
    lab_ids = regions[sel]
    x = xx[sel].astype(np.float64)
    y = yy[sel].astype(np.float64)
    c = colour[sel].astype(np.float64)

    def sums(weights: np.ndarray | None) -> np.ndarray:
        return np.bincount(lab_ids, weights=weights, minlength=n + 1)

    cnt = sums(None)
    safe = np.maximum(cnt, 1)
    mx, my = sums(x) / safe, sums(y) / safe
    dx, dy = x - mx[lab_ids], y - my[lab_ids]
    # Slopes shrink towards 0 like a prior of 4 px^2 variance per pixel: tiny cores stay flat.
    reg = 4.0 * cnt
    sxx, syy, sxy = sums(dx * dx) + reg, sums(dy * dy) + reg, sums(dx * dy)
    det = np.maximum(sxx * syy - sxy * sxy, 1e-9)
    mean_c = np.stack([sums(c[:, k]) for k in range(3)], 1) / safe[:, None]
    sxc = np.stack([sums(dx * c[:, k]) for k in range(3)], 1)
    syc = np.stack([sums(dy * c[:, k]) for k in range(3)], 1)
    bx = (syy[:, None] * sxc - sxy[:, None] * syc) / det[:, None]
    by = (sxx[:, None] * syc - sxy[:, None] * sxc) / det[:, None]
    r = regions
    pred = mean_c[r] + bx[r] * (xx - mx[r])[..., None] + by[r] * (yy - my[r])[..., None]
    return pred.astype(np.float32)


def _smooth_colour_map(colour: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """A smooth colour map from the pixels where ``weight`` is set (normalised convolution).

    Fills the whole image; far from any weighted pixel it tends to their global median. The
    blur runs on a reduced copy: the map is smooth at the scale of a few tesserae anyway.
    """
    if not weight.any():
        return np.broadcast_to(colour.reshape(-1, 3).mean(0), colour.shape).astype(np.float32)
    fallback = np.median(colour[weight], axis=0)
    h, w = weight.shape
    factor = max(1, int(sigma // 4))
    small = (max(1, w // factor), max(1, h // factor))
    wt = cv2.resize(weight.astype(np.float32), small, interpolation=cv2.INTER_AREA)
    num = cv2.resize(colour * weight[..., None], small, interpolation=cv2.INTER_AREA)
    num = _blur(num, sigma / factor)
    den = _blur(wt, sigma / factor)[..., None]
    prior = 1e-3  # a whisper of the global colour where no grout pixel is near
    smooth = (num + prior * fallback) / (den + prior)
    return cv2.resize(smooth, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Label-map helpers
# --------------------------------------------------------------------------------------------
def _boundary_pixels(regions: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another region (both sides of every border)."""
    edge = np.zeros(regions.shape, bool)
    dh = regions[:, 1:] != regions[:, :-1]
    dv = regions[1:] != regions[:-1]
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    edge[1:] |= dv
    edge[:-1] |= dv
    return edge


def _grout_sample(regions: np.ndarray, interior: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Pixels to take a first grout colour from.

    The floors of grout lines at least ~3 px wide: flat pixels in thin structures (no deep
    interior within 2 px). Failing enough of those (thin grout), the region borders, which run
    along the grout lines.
    """
    thin = interior & (ndi.maximum_filter(dist, size=5) <= 2.5)
    if np.count_nonzero(thin) >= 0.005 * thin.size:
        return thin
    border = _boundary_pixels(regions)
    return border if border.any() else ~interior


def _separate(labels: np.ndarray, score: np.ndarray) -> None:
    """Put one grout pixel between 4-adjacent pixels of different tiles, in place.

    Of the two touching pixels the one that looks more like grout (higher score) becomes grout.
    """
    for a, b, sa, sb in (
        (labels[:, :-1], labels[:, 1:], score[:, :-1], score[:, 1:]),
        (labels[:-1], labels[1:], score[:-1], score[1:]),
    ):
        touch = (a != b) & (a > 0) & (b > 0)
        first = touch & (sa >= sb)
        second = touch & ~first
        a[first] = 0
        b[second] = 0


def _keep_solid(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Every tile keeps its largest 4-connected piece with its holes filled; small tiles go.

    Small tiles are dropped before holes are filled, so a speck inside a tile does not keep
    a hole open; a hole with a real tile inside stays open (tiles must not touch).
    """
    solid = np.zeros(labels.shape, np.int32)
    slices = ndi.find_objects(labels)
    for k, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        pieces, _ = ndi.label(labels[sl] == k, structure=FOUR_CONNECTED)
        areas = np.bincount(pieces.ravel())
        areas[0] = 0
        if areas.max() >= min_area:
            solid[sl][pieces == int(np.argmax(areas))] = k
    out = solid.copy()
    for k, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        obj = solid[sl] == k
        if not obj.any():
            continue
        holes, n_holes = ndi.label(ndi.binary_fill_holes(obj) & ~obj)
        if n_holes:
            other = solid[sl] != 0  # hole pixels are never k itself
            occupied = np.bincount(holes.ravel(), weights=other.ravel(), minlength=n_holes + 1)
            fill = occupied == 0
            fill[0] = False
            out[sl][fill[holes]] = k
    return out


def _split_large(
    regions: np.ndarray, boundary: np.ndarray, dist: np.ndarray, size: float, p: ClassicalParams
) -> tuple[np.ndarray, int]:
    """Re-segment regions much larger than the typical one with their own, lower threshold.

    A weak grout line between two similar tiles stays below the global threshold; within the
    merged region it is among the strongest edges, so a local Otsu threshold finds it.
    ``dist`` is updated in place with the local interior distances.
    """
    n = int(regions.max())
    areas = np.bincount(regions.ravel(), minlength=n + 1)
    typical = float(np.median(areas[1:]))
    out = regions.copy()
    next_id = n + 1
    min_dist = max(1, int(round(p.marker_min_distance * size)))
    for k, sl in enumerate(ndi.find_objects(regions), start=1):
        if sl is None or areas[k] <= p.split_area * typical:
            continue
        mask = regions[sl] == k
        sub = boundary[sl]
        vals = np.log(sub[mask] + 0.5)
        if float(vals.max() - vals.min()) < 1e-6:
            continue
        t = float(np.exp(threshold_otsu(vals)) - 0.5)
        inner = (sub < t) & mask
        d = ndi.distance_transform_edt(inner).astype(np.float32)
        peaks = peak_local_max(
            d, min_distance=min_dist, threshold_abs=max(1.0, p.marker_min_radius * size),
            exclude_border=False, labels=mask.astype(np.int32),
        )
        if len(peaks) < 2:
            continue
        m = np.zeros(mask.shape, np.int32)
        m[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
        parts = watershed(sub, m, mask=mask)
        view = out[sl]
        view[mask] = np.where(parts[mask] == 1, k, parts[mask] + next_id - 2)
        next_id += len(peaks) - 1
        dview = dist[sl]
        dview[mask] = d[mask]
    return out, next_id - 1


def _flat_background(
    regions: np.ndarray, weak: np.ndarray, boundary: np.ndarray, threshold: float, factor: float
) -> np.ndarray:
    """Per region: True where it belongs to a large flat grout-coloured area (background).

    Weak regions (coloured like the grout) that meet without an edge between them (a mean
    boundary strength along their border under half the interior threshold) are joined;
    a joined area larger than ``factor`` typical regions is background, not a tessera: plain
    grout, mortar or a wall around the mosaic. Tiles coloured like the grout keep a grout line
    (an edge) to their neighbours and stay separate.
    """
    n = int(regions.max())
    keys, values = [], []
    for a, b, va, vb in (
        (regions[:, :-1], regions[:, 1:], boundary[:, :-1], boundary[:, 1:]),
        (regions[:-1], regions[1:], boundary[:-1], boundary[1:]),
    ):
        sel = (a != b) & weak[a] & weak[b]
        lo, hi = np.minimum(a[sel], b[sel]), np.maximum(a[sel], b[sel])
        keys.append(lo.astype(np.int64) * (n + 1) + hi)
        values.append(np.maximum(va[sel], vb[sel]))
    pairs, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    mean_edge = np.bincount(inverse, weights=np.concatenate(values)) / np.maximum(
        np.bincount(inverse), 1
    )
    flat = pairs[mean_edge < 0.5 * threshold]
    graph = sparse.coo_matrix(
        (np.ones(flat.size), (flat // (n + 1), flat % (n + 1))), shape=(n + 1, n + 1)
    )
    _, comp = connected_components(graph, directed=False)
    areas = np.bincount(regions.ravel(), minlength=n + 1).astype(np.float64)
    typical = float(np.median(areas[1:])) if n else 0.0
    comp_area = np.bincount(comp, weights=np.where(weak, areas, 0))
    background = weak & (comp_area[comp] > factor * typical)
    background[0] = False
    return background



def _ring_contrast(
    labels: np.ndarray, colour: np.ndarray, ids: np.ndarray, diameter: float
) -> np.ndarray:
    """Per id in ``ids``: the Lab distance between the median colour of its pixels and that of
    the background (label 0) 0.1-0.25 tessera diameters around it; inf where there is none.

    A tessera differs from the grout around it; a piece of grout (a junction, uneven mortar)
    has the colour of the grout around it even where that is off the smooth grout colour map.
    """
    near, far = 0.1 * diameter, 0.25 * diameter
    pad = int(math.ceil(far)) + 1
    h, w = labels.shape
    slices = ndi.find_objects(labels)
    out = np.full(len(ids), np.inf)
    for i, k in enumerate(ids):
        sl = slices[k - 1] if k - 1 < len(slices) else None
        if sl is None:
            continue
        y0, y1 = max(0, sl[0].start - pad), min(h, sl[0].stop + pad)
        x0, x1 = max(0, sl[1].start - pad), min(w, sl[1].stop + pad)
        window = labels[y0:y1, x0:x1]
        obj = window == k
        d = cv2.distanceTransform((~obj).view(np.uint8), cv2.DIST_L2, 3)
        ring = (d > near) & (d <= far) & (window == 0)
        if ring.any():
            c = colour[y0:y1, x0:x1]
            out[i] = np.linalg.norm(np.median(c[obj], axis=0) - np.median(c[ring], axis=0))
    return out


def _touching_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background pixels between two tiles: (row-major pixel index, smaller id, larger id).

    A pixel of 0 whose 3x3 neighbourhood holds two different tile ids separates those two
    tiles by that one pixel (with several, the smallest and the largest id count).
    """
    h, w = labels.shape
    pad = np.pad(labels, 1)
    big = np.iinfo(np.int32).max
    lo = np.full((h, w), big, np.int32)
    hi = np.zeros((h, w), np.int32)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            nb = pad[dy:dy + h, dx:dx + w]
            np.maximum(hi, nb, out=hi)
            np.minimum(lo, np.where(nb > 0, nb, big), out=lo)
    sep = (labels == 0) & (hi > 0) & (lo < hi)
    idx = np.flatnonzero(sep)
    return idx, lo.ravel()[idx], hi.ravel()[idx]


def merge_fragments(
    labels: np.ndarray,
    colour: np.ndarray,
    score: np.ndarray,
    tessera_area: float,
    p: ClassicalParams,
    grout_c: np.ndarray | None = None,
) -> np.ndarray:
    """Join tiles that are fragments of one tessera: a region adjacency graph, merged greedily.

    Texture, stains and highlights inside a tessera can split it; the fragments then face each
    other across a one-pixel separation (``_separate``) that is *not* grout. Two tiles are
    joined when, along the pixels separating them, the colour is the tiles' own rather than the
    grout's (mean of the highest ``score`` within ``p.merge_reach`` px of each separating pixel
    below ``p.merge_score``: -1 tile colour, +1 grout colour), their
    mean colours differ by less than ``p.merge_colour`` (Lab), and the result stays under
    ``p.merge_area`` times ``tessera_area`` (the median tessera area at the estimated scale).
    Pairs with the most tile-like separation merge first. Two tesserae with grout between them
    are never joined: a grout line of one pixel or more is grout-coloured or, when grout and
    tile colours are alike (``score`` near 0), the pair's score stays at or above the bar.

    ``labels``: tiles 1..N, none 4-adjacent; ``colour``: Lab image; ``score``: per pixel grout
    score; ``grout_c``: the grout colour map, when given tiles whose mean colour is within
    ``p.min_contrast`` of it are never joined (dark tiles on dark grout). Returns the merged
    map (separating pixels filled, holes closed), tiles 1..M.
    """
    n = int(labels.max())
    if n < 2:
        return labels
    idx, a, b = _touching_pairs(labels)
    if idx.size == 0:
        return labels
    key = a.astype(np.int64) * (n + 1) + b
    pairs, inverse = np.unique(key, return_inverse=True)
    count = np.bincount(inverse)
    # The strongest grout evidence within a pixel of the separation: where the tile borders are
    # a pixel off the grout line, the line runs beside the separating pixel, not through it.
    if p.merge_reach > 0:
        near = ndi.maximum_filter(score, size=2 * p.merge_reach + 1)
    else:
        near = score
    mean_score = np.bincount(inverse, weights=near.ravel()[idx]) / count
    pa, pb = (pairs // (n + 1)).astype(np.int64), (pairs % (n + 1)).astype(np.int64)

    area = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
    flat = labels.ravel()
    mean_c = np.stack([np.bincount(flat, weights=colour[..., c].ravel(), minlength=n + 1)
                       for c in range(3)], 1) / np.maximum(area, 1)[:, None]
    delta = np.linalg.norm(mean_c[pa] - mean_c[pb], axis=1)
    # A contact of a couple of pixels (corners meeting) says nothing about the border.
    side = np.sqrt(np.minimum(area[pa], area[pb]))
    ok = (mean_score < p.merge_score) & (delta < p.merge_colour) & (count >= 0.25 * side)
    if grout_c is not None:
        # Tiles coloured like the grout: the score cannot tell grout from tile there.
        diff = colour - grout_c
        off = np.linalg.norm(np.stack([np.bincount(flat, diff[..., c].ravel(), n + 1)
                                       for c in range(3)], 1) / np.maximum(area, 1)[:, None], axis=1)
        ok &= np.minimum(off[pa], off[pb]) >= p.min_contrast
    order = np.argsort(mean_score[ok], kind="stable")
    cand = np.flatnonzero(ok)[order]

    parent = np.arange(n + 1)
    size = area.copy()
    cap = p.merge_area * tessera_area

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    merged = False
    for e in cand.tolist():
        ra, rb = find(int(pa[e])), find(int(pb[e]))
        if ra == rb or size[ra] + size[rb] > cap:
            continue
        parent[max(ra, rb)] = min(ra, rb)
        size[min(ra, rb)] += size[max(ra, rb)]
        merged = True
    if not merged:
        return labels
    root = np.array([find(k) for k in range(n + 1)])
    out = root[labels].astype(np.int32)
    # Fill the separating pixels of joined pairs.
    joined = root[a] == root[b]
    out.ravel()[idx[joined]] = root[a[joined]]
    _separate(out, score)  # a filled pixel may touch a third tile
    return relabel_sequential(_keep_solid(out, 0))

def _tidy(
    labels: np.ndarray,
    colour: np.ndarray,
    grout_c: np.ndarray,
    score: np.ndarray,
    tessera_area: float,
    p: ClassicalParams,
) -> np.ndarray:
    """Tiles at the estimated scale: notches closed, grout specks and crumbs dropped.

    * Every tile is closed with a disc of ``p.close_radius`` tessera diameters, on grout pixels
      only: a stain or highlight at a tile's edge coloured like the grout leaves a notch.
    * Tiles smaller than ``p.min_tile_area`` median tessera areas go, and so do tiles under
      ``p.grout_speck_area`` areas whose colour is the grout's (a wide grout junction: within
      half ``p.min_contrast`` of it, or within ``p.min_contrast`` and narrower than half a
      tessera, its inscribed circle under 0.25 diameters) and tiles whose inscribed circle is
      under ``p.min_inradius`` tessera diameters (a stretch of grout line); tiles cut by the
      image border may be small, not that thin.
    """
    n = int(labels.max())
    if n == 0:
        return labels
    diameter = 2 * np.sqrt(tessera_area / np.pi)
    radius = int(round(p.close_radius * diameter))
    out = labels.copy()
    if radius >= 1:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        r_open = int(round(p.open_radius * diameter))
        open_disc = (cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_open + 1,) * 2)
                     if r_open >= 1 else None)
        h, w = labels.shape
        for k, sl in enumerate(ndi.find_objects(labels), start=1):
            if sl is None:
                continue
            y0, y1 = max(0, sl[0].start - radius), min(h, sl[0].stop + radius)
            x0, x1 = max(0, sl[1].start - radius), min(w, sl[1].stop + radius)
            obj = (labels[y0:y1, x0:x1] == k).view(np.uint8)
            closed = cv2.morphologyEx(obj, cv2.MORPH_CLOSE, disc, borderType=cv2.BORDER_CONSTANT,
                                      borderValue=0) | obj
            if open_disc is not None:
                closed = cv2.morphologyEx(closed, cv2.MORPH_OPEN, open_disc,
                                          borderType=cv2.BORDER_REPLICATE)
            closed = closed.view(bool)
            view = out[y0:y1, x0:x1]
            view[(view == k) & ~closed] = 0
            view[closed & (view == 0)] = k
        _separate(out, score)
    area = np.bincount(out.ravel(), minlength=n + 1).astype(np.float64)
    idx = np.arange(1, n + 1)
    flat, safe = out.ravel(), np.maximum(area, 1)
    diff = colour - grout_c
    mean = np.stack([np.bincount(flat, diff[..., c].ravel(), n + 1) for c in range(3)], 1)
    contrast = np.linalg.norm(mean / safe[:, None], axis=1)  # tile colour minus grout colour
    edge = np.zeros(n + 1, bool)  # tiles cut by the image border may be small
    edge[np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])] = True
    drop = (area < p.min_tile_area * tessera_area) & ~edge
    speck = area < p.grout_speck_area * tessera_area
    drop |= speck & (contrast < 0.5 * p.min_contrast)
    # Strips thinner than a fraction of a tessera are stretches of grout, not tiles (a tile cut
    # by the image border may be that thin, unless it has the grout's colour).
    inner = np.zeros(n + 1)
    solid = np.pad((out > 0).view(np.uint8), 1)  # outside the image is not tile either
    inner[1:] = ndi.maximum(cv2.distanceTransform(solid, cv2.DIST_L2, 3)[1:-1, 1:-1], out, idx)
    drop |= (inner < p.min_inradius * diameter) & (~edge | (contrast < p.min_contrast))
    # Grout junctions (where three or four grout lines meet) are small, coloured like the grout
    # and narrower than half a tessera; a small tile that dark is at least that wide.
    drop |= speck & (contrast < p.min_contrast) & (inner < 0.25 * diameter) & ~edge
    # A small region off the smooth grout colour map but with the colour of the grout right
    # around it (within ``p.min_contrast``) is grout too: a junction of stained or shaded
    # grout lines, cut by the image border or not. (Regions on the map's colour are judged by
    # their width above: a small tile as dark as the grout stays.)
    check = np.flatnonzero(speck & ~drop & (contrast >= p.min_contrast))
    check = check[check > 0]
    if check.size:
        drop[check] |= _ring_contrast(out, colour, check, diameter) < p.min_contrast
    drop[0] = True
    out[drop[out]] = 0
    return relabel_sequential(_keep_solid(out, 0))


def rescue_missed(
    labels: np.ndarray,
    colour: np.ndarray,
    grout_c: np.ndarray,
    tessera_area: float,
    p: ClassicalParams,
) -> np.ndarray:
    """Tesserae that stage 1 found no marker for, taken from the grout left between the tiles.

    A tessera much narrower than the typical one (a sliver along a curve, a cut piece) has no
    interior at the working scale, so it has no marker and stage 2 leaves it as grout. What is
    left of the background after every tile is placed should be grout-coloured: a solid piece
    of it coloured unlike the grout (farther than ``p.min_contrast`` Lab from the grout colour
    map), still there after an opening with a disc of ``p.min_inradius`` tessera diameters (so
    not a strip along a tile border, not a stain on the grout) and at least ``p.min_tile_area``
    median tessera areas, and differing from the grout around it (the median colours of the
    piece and of the background 0.1-0.25 diameters around it) by more than
    ``p.rescue_contrast`` x ``p.min_contrast``, is a tessera: uneven grout (a wide junction
    coloured off the smooth map) has the colour of the grout around it. It is kept 2 px clear
    of every tile (tiles never touch); a piece larger than ``p.merge_area`` tessera areas is
    split at its colour edges (several narrow tesserae joined across blurred grout);
    ``snap_outlines`` then takes every piece to its edges. Returns tiles 1..M.
    """
    if p.min_contrast <= 0 or p.min_inradius <= 0:
        return labels
    diameter = 2 * np.sqrt(tessera_area / np.pi)
    background = labels == 0
    if not background.any():
        return labels
    away = cv2.distanceTransform(background.view(np.uint8), cv2.DIST_L2, 3) >= 2
    unlike = np.linalg.norm(colour - grout_c, axis=2) > p.min_contrast
    cand = (background & away & unlike).view(np.uint8)
    r = max(1, int(round(p.min_inradius * diameter)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    # The image border is not an edge of the piece: a tessera cut by it may be thin there.
    cand = cv2.morphologyEx(cand, cv2.MORPH_OPEN, disc, borderType=cv2.BORDER_REPLICATE)
    pieces, n = ndi.label(cand.view(bool), structure=FOUR_CONNECTED)
    if n == 0:
        return labels
    keep = np.bincount(pieces.ravel()) >= p.min_tile_area * tessera_area
    keep[np.concatenate([pieces[0], pieces[-1], pieces[:, 0], pieces[:, -1]])] = True
    keep[0] = False
    # Grout is not one colour: where it differs from the smooth grout map (a wide junction,
    # mortar in a gap) the piece has the colour of the grout around it. A tessera differs
    # from the grout around it by more than ``p.rescue_contrast`` times the contrast below
    # which colour cannot tell tile from grout.
    ids = np.flatnonzero(keep)
    if ids.size:
        # The ring is taken on the background with the existing tiles in place.
        trial = np.where(keep[pieces], pieces + int(labels.max()), labels)
        gap = _ring_contrast(trial, colour, ids + int(labels.max()), diameter)
        keep[ids] = gap > p.rescue_contrast * p.min_contrast
    if not keep.any():
        return labels
    out = labels.copy()
    found = keep[pieces]
    out[found] = pieces[found] + int(labels.max())
    # A piece larger than merged fragments may be (``p.merge_area`` tessera areas) is a row
    # of missed tesserae joined where the thin grout between them is blurred: as in stage 1's
    # re-split of large regions, its flat parts (the colour gradient under the piece's own
    # Otsu threshold) of at least ``p.min_area`` squared diameters are one marker each, and a
    # watershed of the gradient splits the piece between them.
    area = np.bincount(pieces.ravel(), minlength=n + 1)
    next_id = int(out.max()) + 1
    for k, sl in enumerate(ndi.find_objects(pieces), start=1):
        if sl is None or not keep[k] or area[k] <= p.merge_area * tessera_area:
            continue
        obj = pieces[sl] == k
        grad = _gradient(colour[sl])
        vals = np.log(grad[obj] + 0.5)
        if float(vals.max() - vals.min()) < 1e-6:
            continue
        flat = (grad < float(np.exp(threshold_otsu(vals)) - 0.5)) & obj
        cores, m = ndi.label(flat, structure=FOUR_CONNECTED)
        big = np.bincount(cores.ravel(), minlength=m + 1) >= p.min_area * diameter ** 2
        big[0] = False
        if big.sum() < 2:
            continue
        renumber = np.zeros(m + 1, np.int32)
        renumber[big] = np.arange(next_id, next_id + int(big.sum()))
        next_id += int(big.sum())
        parts = watershed(grad, renumber[cores], mask=obj)
        view = out[sl]
        view[obj] = parts[obj]
    return relabel_sequential(out)


def snap_outlines(
    labels: np.ndarray,
    lab: np.ndarray,
    score: np.ndarray,
    tessera_area: float,
    p: ClassicalParams,
) -> np.ndarray:
    """Every tile border moved onto the strongest colour edge near it.

    The tile/grout split and the clean-up after it (one-pixel separations, dropped pieces,
    closing and opening) leave borders a pixel or two off the edge, most often inside the tile
    where a bevel or soft edge sits between tile and grout colour. A watershed of the fine
    colour gradient grows each tile's core (its pixels deeper than ``p.snap_in`` tessera
    diameters) and the grout (background farther than ``p.snap_out`` diameters from every tile,
    or confidently grout-coloured: ``score`` above ``p.grout_confidence``) into the band
    between them, so each border lands on the edge within that band; tiles are then separated
    by one grout pixel again, and a pixel that changed hands is given back to the grout where it
    touches another tile, even diagonally (tiles meeting corner to corner across thin grout
    would get overlapping polygons). The number of tiles does not change. Returns tiles 1..M.
    """
    n = int(labels.max())
    if n == 0 or p.snap_out <= 0:
        return labels
    diameter = 2 * np.sqrt(tessera_area / np.pi)
    reach_out = max(1, int(round(p.snap_out * diameter)))
    reach_in = int(round(p.snap_in * diameter))
    tiles = labels > 0
    seeds = labels.copy()
    if reach_in > 0:
        # The image border is not a tile edge; a tile thinner than the band keeps all of it.
        inside = cv2.distanceTransform(np.pad(tiles.view(np.uint8), 1, constant_values=1),
                                       cv2.DIST_L2, 3)[1:-1, 1:-1]
        seeds[inside <= reach_in] = 0
        lost = np.bincount(seeds.ravel(), minlength=n + 1) == 0
        lost[0] = False
        seeds[lost[labels]] = labels[lost[labels]]
    outside = cv2.distanceTransform((~tiles).view(np.uint8), cv2.DIST_L2, 3)
    seeds[~tiles & ((outside > reach_out) | (score > p.grout_confidence))] = n + 1
    # Only the band is flooded, from the seed pixels that border it (a fraction of the image).
    band = seeds == 0
    near = cv2.dilate(band.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
    flooded = watershed(_gradient(_blur(lab, p.edge_sigma)), np.where(near, seeds, 0),
                        mask=near)
    out = np.where(band, flooded, seeds)
    out[out == n + 1] = 0
    # A pixel that changed hands may not touch another tile, not even diagonally: the band
    # closes in on thin grout from both sides, and tiles meeting corner to corner there
    # would leave outlines (polygons) that overlap.
    big = np.iinfo(np.int32).max
    hi = ndi.maximum_filter(out, size=3, mode="constant", cval=0)
    lo = ndi.minimum_filter(np.where(out > 0, out, big), size=3, mode="constant", cval=big)
    out[(out != labels) & (out > 0) & ((hi != out) | (lo != out))] = 0
    _separate(out, score)
    return relabel_sequential(_keep_solid(out, 0))


# --------------------------------------------------------------------------------------------
# The two stages
# --------------------------------------------------------------------------------------------
@dataclass
class _Regions:
    """Stage 1's partition and the maps stage 2 reuses (all at one resolution)."""

    regions: np.ndarray  # int32, 1..n, one region per tile with its share of the grout
    n: int
    boundary: np.ndarray  # edge-and-line strength
    threshold: float  # interior threshold of ``boundary``
    interior: np.ndarray  # boundary < threshold
    dist: np.ndarray  # distance to the nearest non-interior pixel
    size: float  # interior-map tessera size estimate (px)

    def upsampled(self, factor: int, shape: tuple[int, int]) -> "_Regions":
        """The same maps at ``factor`` times the resolution (``shape`` = (height, width))."""
        dsize = (shape[1], shape[0])
        return _Regions(
            regions=cv2.resize(self.regions, dsize, interpolation=cv2.INTER_NEAREST),
            n=self.n,
            boundary=cv2.resize(self.boundary, dsize, interpolation=cv2.INTER_LINEAR),
            threshold=self.threshold,
            interior=cv2.resize(self.interior.view(np.uint8), dsize,
                                interpolation=cv2.INTER_NEAREST).astype(bool),
            dist=cv2.resize(self.dist, dsize, interpolation=cv2.INTER_LINEAR) * factor,
            size=self.size * factor,
        )


def _interior_maps(
    lab: np.ndarray, p: ClassicalParams
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, float]:
    """Boundary map, its interior threshold, the interior, its distance map and the size."""
    boundary = _boundary_map(lab, p)
    threshold = _interior_threshold(boundary, p)
    interior = boundary < threshold
    dist = ndi.distance_transform_edt(interior).astype(np.float32)
    return boundary, threshold, interior, dist, _interior_size(interior, dist)


def _shrink(lab: np.ndarray, factor: int) -> np.ndarray:
    h, w = lab.shape[:2]
    size = (max(8, w // factor), max(8, h // factor))
    return cv2.resize(lab, size, interpolation=cv2.INTER_AREA)


def _find_regions(
    lab: np.ndarray, p: ClassicalParams, maps: tuple | None = None
) -> _Regions | None:
    """Stage 1: tile markers from the interior map and a watershed from them (None: no tile).

    ``maps``: ``_interior_maps(lab, p)`` when already computed.
    """
    boundary, threshold, interior, dist, size = maps or _interior_maps(lab, p)
    peaks = peak_local_max(
        dist,
        min_distance=max(1, int(round(p.marker_min_distance * size))),
        threshold_abs=max(1.0, p.marker_min_radius * size),
        exclude_border=False,
    )
    n = len(peaks)
    if n == 0:
        return None
    markers = np.zeros(lab.shape[:2], np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, n + 1)
    regions = watershed(boundary, markers, compactness=p.compactness)
    if p.split_area > 0:
        regions, n = _split_large(regions, boundary, dist, size, p)
    return _Regions(regions, n, boundary, threshold, interior, dist, size)


def _first_grout_colour(colour: np.ndarray, r: _Regions) -> np.ndarray | None:
    """A first (global) grout colour: the median of ``_grout_sample``; None when there is none."""
    sample = _grout_sample(r.regions, r.interior, r.dist)
    return np.median(colour[sample], axis=0) if sample.any() else None


def _split_tiles(
    lab: np.ndarray,
    r: _Regions,
    p: ClassicalParams,
    tessera_area: float | None = None,
    grout: np.ndarray | None = None,
) -> np.ndarray:
    """Stage 2: within every region, the tile and the grout around it (0), touching tiles apart.

    ``grout``: the first grout colour (Lab) when known for the whole image, else measured here.
    """
    regions, n = r.regions, r.n
    idx = np.arange(1, n + 1)

    # Colour models: a ramp per tile fitted to its centre, a smooth grout colour map.
    colour = _blur(lab, p.class_sigma)
    depth = np.zeros(n + 1, np.float32)
    depth[1:] = ndi.maximum(r.dist, regions, idx)
    centre = r.dist >= 0.5 * depth[regions]
    tile_c = _region_colour_ramps(colour, regions, centre, n)
    d_tile = np.linalg.norm(colour - tile_c, axis=2)
    first = _first_grout_colour(colour, r)
    if first is None:  # a featureless image: nothing to segment
        return np.zeros(regions.shape, np.int32)
    if grout is not None:
        first = np.asarray(grout, np.float32)
    grout_c = np.broadcast_to(first, colour.shape)
    score = _score(colour, tile_c, grout_c, d_tile)
    grout_c = _smooth_colour_map(colour, score >= 0, 2.0 * r.size)
    score = _score(colour, tile_c, grout_c, d_tile)

    # Regions coloured like the grout ("weak"): colour cannot tell their tile from the grout.
    contrast = np.linalg.norm(tile_c - grout_c, axis=2)
    weak = np.zeros(n + 1, bool)
    weak[1:] = np.asarray(ndi.mean(contrast, regions, idx)) < p.min_contrast
    background = _flat_background(regions, weak, r.boundary, r.threshold, p.background_area)
    # Weak regions far from compact (a disc scores 1, a square 0.79) are stretches of the grout
    # network itself, not tesserae.
    area = np.bincount(regions.ravel(), minlength=n + 1)
    roundness = np.pi * (depth + 1) ** 2 / np.maximum(area, 1)
    background |= weak & (roundness < p.min_roundness)
    weak_px = weak[regions]

    # Second watershed: sure tile and sure grout grow into the uncertain band between them.
    sure_tile = np.where(weak_px, centre, score < -p.tile_confidence)
    seeds = np.where(sure_tile, regions, 0)
    seeds[(score > p.grout_confidence) & ~weak_px] = n + 1
    seeds[background[regions]] = n + 1
    labels = watershed(_gradient(_blur(lab, p.edge_sigma)), seeds)
    labels[labels == n + 1] = 0

    # Separate touching tiles, keep solid pieces, drop slivers.
    _separate(labels, score)
    labels = _keep_solid(labels, p.min_area * r.size * r.size)
    if tessera_area and p.merge_area > 0:
        labels = merge_fragments(labels, colour, score, tessera_area, p, grout_c)
    if tessera_area:
        labels = _tidy(labels, colour, grout_c, score, tessera_area, p)
        labels = rescue_missed(labels, colour, grout_c, tessera_area, p)
        labels = snap_outlines(labels, lab, score, tessera_area, p)
        # Once more on the moved outlines: the snap follows the gradient pixel by pixel (a
        # ragged outline needs more polygon vertices), and the rescued tiles are judged too.
        labels = _tidy(labels, colour, grout_c, score, tessera_area, p)
    return labels


def _score(
    colour: np.ndarray, tile_c: np.ndarray, grout_c: np.ndarray, d_tile: np.ndarray
) -> np.ndarray:
    """Per pixel: -1 on its tile's colour, +1 on the grout's colour, 0 half-way."""
    d_grout = np.linalg.norm(colour - grout_c, axis=2)
    contrast = np.linalg.norm(tile_c - grout_c, axis=2)
    return np.clip((d_tile - d_grout) / np.maximum(contrast, 1e-3), -1.5, 1.5)


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------
def estimate_tessera_size(image: np.ndarray, params: ClassicalParams | None = None) -> float:
    """Typical tessera diameter in pixels (median equivalent-circle diameter).

    Measured without segmenting, from the period of the grout network (``scale``); ``params``
    is accepted for compatibility and unused.
    """
    del params
    return estimate_scale(_check_image(image)).diameter


def _median_diameter(instances: np.ndarray) -> float | None:
    areas = np.bincount(instances.ravel())[1:]
    areas = areas[areas > 0]
    if areas.size == 0:
        return None
    return float(2 * np.sqrt(np.median(areas) / np.pi))


@dataclass(frozen=True)
class ImageStatistics:
    """What the classical engine measures on a whole image and every tile of it then shares.

    The grout is one material across a mosaic: its first colour estimate (the median of the
    pixels that look like grout lines, before the smooth local grout colour map) is taken on the
    whole image. Measured per tile, a tile dominated by pale stained tesserae or by dark ones
    takes some of their colour into it and then keeps grout junctions as tiles
    (``ClassicalEngine.statistics``). The interior threshold and the working scale stay per
    tile: sharing them was measured not to help.
    """

    grout: tuple[float, float, float]  # first grout colour (Lab), before the local colour map


NEAREST_SIZES = 2.0  # a click on grout takes a tessera within this many diameters
BOX_INSIDE = 0.5  # a tessera belongs to a box when this part of it lies inside


@dataclass
class ClassicalIndex:
    """A classical segmentation of one image, ready for clicks."""

    instances: np.ndarray  # int32, 0 = grout, 1..N
    areas: np.ndarray  # pixels per id (index 0 unused)
    size: float  # median tessera diameter (px)

    @classmethod
    def of(cls, instances: np.ndarray) -> "ClassicalIndex":
        areas = np.bincount(instances.ravel())
        tiles = areas[1:][areas[1:] > 0]
        size = float(2 * np.sqrt(np.median(tiles) / np.pi)) if tiles.size else 0.0
        return cls(instances, areas, size)

    @property
    def nbytes(self) -> int:
        return self.instances.nbytes + self.areas.nbytes

    def tessera_at(self, x: float, y: float) -> int:
        """The id under pixel (x, y), else the nearest within NEAREST_SIZES diameters, else 0."""
        h, w = self.instances.shape
        c, r = min(int(x), w - 1), min(int(y), h - 1)
        found = int(self.instances[r, c])
        if found or self.size == 0:
            return found
        reach = int(math.ceil(NEAREST_SIZES * self.size))
        r0, c0 = max(r - reach, 0), max(c - reach, 0)
        window = self.instances[r0 : r + reach + 1, c0 : c + reach + 1]
        rows, cols = np.nonzero(window)
        if rows.size == 0:
            return 0
        d2 = (rows + r0 - r) ** 2 + (cols + c0 - c) ** 2
        best = int(np.argmin(d2))
        return int(window[rows[best], cols[best]]) if d2[best] <= reach * reach else 0

    def in_box(self, box: np.ndarray) -> set[int]:
        """Ids at least BOX_INSIDE inside the box [x0, y0, x1, y1]; else the one covering most."""
        x0, y0 = int(math.floor(box[0])), int(math.floor(box[1]))
        x1, y1 = int(math.ceil(box[2])), int(math.ceil(box[3]))
        inside = np.bincount(self.instances[y0:y1, x0:x1].ravel(), minlength=len(self.areas))
        inside[0] = 0
        whole = np.nonzero(inside >= BOX_INSIDE * np.maximum(self.areas, 1))[0]
        chosen = {int(k) for k in whole if k > 0}
        if not chosen and inside.any():
            chosen = {int(np.argmax(inside))}
        return chosen


class ClassicalEngine:
    """Segments every tessera of an RGB image without model weights."""

    name = "classical"

    def __init__(self, params: ClassicalParams | None = None):
        self.params = params or ClassicalParams()
        self._cache_key: str | None = None
        self._cache: ClassicalIndex | None = None

    # ----------------------------------------------------------------------------------------
    def segment(
        self,
        image: np.ndarray,
        tessera_size: float | None = None,
        statistics: ImageStatistics | None = None,
    ) -> np.ndarray:
        """Instance map (int32, 0 = grout/background, ids 1..N, each one 4-connected tile).

        ``tessera_size``: median tessera diameter (px) when known (e.g. estimated once for a
        whole photograph that is segmented tile by tile); else estimated on ``image``. The
        engine's lengths follow from it: the working scale (tesserae shrunk to about
        ``work_size`` px), the area cap of fragment merging and the tidying radii and areas.
        ``statistics``: the whole image's (``statistics``) when ``image`` is one tile of it,
        so that every tile shares the first grout colour.
        """
        p = self.params
        lab, tessera_size, found = self._prepare(image, tessera_size)
        if found is None:
            return np.zeros(lab.shape[:2], np.int32)
        area = np.pi / 4 * tessera_size ** 2
        grout = None if statistics is None else np.asarray(statistics.grout, np.float32)
        return relabel_sequential(_split_tiles(lab, found, p, area, grout))

    def _prepare(self, image: np.ndarray, tessera_size: float | None):
        """The start ``segment`` and ``statistics`` share: the checked image in Lab, the tessera
        size (estimated on ``image`` when not given) and stage 1's tiles (None: nothing tile-like)."""
        image = _check_image(image)
        if tessera_size is None:
            tessera_size = estimate_scale(image).diameter
        if not tessera_size > 0:
            raise MosaicError(f"classical engine: tessera size must be positive, got {tessera_size}")
        lab = _lab(image)
        return lab, tessera_size, self._stage1(lab, tessera_size)

    def statistics(self, image: np.ndarray, tessera_size: float | None = None) -> ImageStatistics:
        """The image-wide statistics ``segment`` shares between the tiles of one image.

        Measured exactly as ``segment(image)`` measures them, so segmenting ``image`` whole
        with or without them gives the same result; passed to ``segment`` for every tile of a
        larger image (``segment.segment_image_info`` measures them on the image, or a central
        window of a very large one), every tile is segmented with the same first grout colour.
        """
        p = self.params
        lab, tessera_size, found = self._prepare(image, tessera_size)
        grout = None if found is None else _first_grout_colour(_blur(lab, p.class_sigma), found)
        if grout is None:  # nothing tile-like: the image's median colour
            grout = np.median(lab.reshape(-1, 3), axis=0)
        return ImageStatistics(tuple(float(v) for v in grout))

    def _factor(self, lab: np.ndarray, tessera_size: float) -> tuple[int, tuple]:
        """Working-scale factor (tesserae shrunk to about ``work_size``, or the textured one)
        and the full-resolution interior maps it was decided on."""
        p = self.params
        # Texture, stains and highlights break tile interiors into fragments much narrower than
        # a tessera; seen shrunk, they average out (a clean tile is better seen sharp).
        maps = _interior_maps(lab, p)
        work_size = p.textured_work_size if maps[4] < p.fragmented * tessera_size else p.work_size
        factor = max(1, int(round(tessera_size / work_size)))
        return min(factor, max(1, min(lab.shape[:2]) // 16)), maps

    def _stage1(self, lab: np.ndarray, tessera_size: float) -> _Regions | None:
        """Stage 1 at the working scale, scaled back to full resolution (None: no tile)."""
        p = self.params
        factor, maps = self._factor(lab, tessera_size)
        work = lab if factor == 1 else _shrink(lab, factor)
        found = _find_regions(work, p, maps if factor == 1 else None)
        if found is not None and factor > 1:
            found = found.upsampled(factor, lab.shape[:2])
        return found

    # ----------------------------------------------------------------------------------------
    def predict_point(self, image: np.ndarray, x: float, y: float) -> np.ndarray | None:
        """Boolean mask of the tessera under pixel ``(x, y)`` (column, row).

        On grout, the nearest tessera within two tessera sizes; ``None`` when there is none or
        the point is outside the image (``ClassicalIndex.tessera_at``, the backend's click rule
        too). The image's segmentation is cached (keyed by a hash of its bytes and the
        parameters), so repeated clicks on one image cost microseconds.
        """
        index = self._cached(image)
        h, w = index.instances.shape
        if not (0 <= x < w and 0 <= y < h):
            return None
        tile = index.tessera_at(x, y)
        return None if tile == 0 else index.instances == tile

    def _cached(self, image: np.ndarray) -> ClassicalIndex:
        """The segmentation of ``image`` as a ClassicalIndex (the last image's is kept)."""
        image = _check_image(image)
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr((image.shape, sorted(self.params.to_dict().items()))).encode())
        digest.update(image.tobytes())
        key = digest.hexdigest()
        if key != self._cache_key or self._cache is None:
            self._cache = ClassicalIndex.of(self.segment(image))
            self._cache_key = key
        return self._cache
