"""Synthetic mosaics with exact ground truth, for tests, the demo and pre-training.

A mosaic is built in three steps, all vectorised (no per-pixel Python loops):

1. A *partition* of the image into cells, one per tessera: either rows of roughly rectangular
   tiles laid along gently curving guidelines ("opus", like opus tessellatum / vermiculatum),
   or a Voronoi diagram of jittered grid seeds ("irregular").
2. The *instance map*: every cell is shrunk away from its border by a varying grout width (a
   distance transform of the cell borders), some cells are left empty (missing tiles), some lose
   a corner, a bite or a deep wedge (chipped tiles, often concave), and every tile keeps only its
   largest 4-connected piece. Cells never touch each other 4-connectedly: there is at least one
   grout pixel between any two tiles.
3. The *image*, rendered from the instance map: palette colours laid out as a smooth design,
   per-tile texture and shading, bevelled edges, textured grout (sometimes close to a tile
   colour), rough mortar where tiles are missing, then a lighting gradient, blur, sensor noise
   and JPEG compression. The degradations only touch the image, so the instance map stays exact.

*Realism* (``MosaicParams.realism``, 0.5-1 for most mosaics of the default mix, 0 = clean): what
photographs of real mosaics show and clean renderings lack, so that engines do not score better
on synthetic data than on photographs. Geometry, applied to the cell partition before the grout
is cut (the ground truth stays exact): a border band of smaller tesserae (mixed sizes), a slight
perspective, grout of uneven width. Image: colour variation inside tiles, rounded edges shaded
by the light's direction, stone grain or glass streaks and bubbles, glossy specular highlights,
uneven and sometimes recessed (dark) grout, vignetting and signal-dependent camera noise.

Everything is a function of a ``numpy.random.Generator``: the same seed gives the same arrays
and byte-identical files.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from ..core.dataset import (
    Sample,
    label_components,
    relabel_sequential,
    write_manifest,
    write_sample,
)
from ..core.io import MAX_INSTANCES, atomic_output_dir
from ..core.errors import MosaicError

STYLES = ("opus", "irregular")
IMAGE_FORMATS = ("png", "jpg")

# Stone and glass colours common in ancient mosaics (RGB).
PALETTE: dict[str, tuple[int, int, int]] = {
    "marble white": (232, 228, 216),
    "cream": (222, 204, 168),
    "grey marble": (166, 164, 158),
    "yellow ochre": (212, 172, 88),
    "ochre": (190, 138, 66),
    "terracotta": (178, 92, 60),
    "red": (148, 46, 40),
    "brown": (108, 70, 48),
    "black": (40, 38, 40),
    "slate": (72, 76, 84),
    "green": (92, 120, 80),
    "dark green": (46, 76, 56),
    "blue": (58, 88, 142),
    "turquoise glass": (58, 138, 136),
}


@dataclass(frozen=True)
class MosaicParams:
    """Everything drawn once per mosaic; recorded in the manifest so a sample can be explained."""

    width: int
    height: int
    style: str
    tessera_size: float  # cell pitch in pixels, grout included
    grout_width: float  # mean full grout width in pixels (at least 1)
    colours: tuple[str, ...]  # palette names used for the tiles
    grout_rgb: tuple[int, int, int]
    grout_like_tile: bool  # grout colour drawn close to one of the tile colours (a hard case)
    missing_fraction: float
    chipped_fraction: float
    light_strength: float
    blur_sigma: float
    noise_sigma: float
    jpeg_quality: int | None
    realism: float = 0.0  # 0: clean tiles; up to 1: the photographic effects at full strength
    weathering: float = 0.0  # 0: none; up to 1: a weathered stone floor (see ``_weather``)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.weathering:
            del d["weathering"]  # manifests of unweathered mosaics stay as they were
        d["colours"] = list(self.colours)
        d["grout_rgb"] = list(self.grout_rgb)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def default_tessera_size(width: int, height: int) -> float:
    """Typical cell pitch: ~58 px at 1000 px (a few hundred tesserae), growing with sqrt(size).

    Larger images hold both bigger and more tesserae, like photographs of larger mosaic areas.
    """
    return 1.8 * math.sqrt(max(width, height))


def draw_params(
    rng: np.random.Generator,
    width: int,
    height: int,
    *,
    style: str | None = None,
    tessera_size: float | None = None,
    realism: float | None = None,
    weathering: float = 0.0,
) -> MosaicParams:
    """Draw one mosaic's style, sizes, colours and degradations (``style`` None: either style).

    ``weathering`` (0-1) makes a weathered stone floor: tight one-pixel grout close to the
    tiles' colour, worn and stained stone, cracks and mortar-filled gaps (``_weather``).

    ``realism`` None draws it: the default mix is mostly photographic (0.5-1 for 85 % of the
    mosaics, 0 for the rest); 0 gives the clean rendering of earlier versions."""
    if style is None:
        style = str(rng.choice(STYLES))
    if style not in STYLES:
        raise MosaicError(f"synth: unknown style {style!r} (choose from {', '.join(STYLES)})")
    if width < 16 or height < 16:
        raise MosaicError(f"synth: image {width}x{height} is too small (at least 16x16)")
    if tessera_size is None:
        size = default_tessera_size(width, height) * rng.uniform(0.75, 1.3)
    else:
        size = float(tessera_size)
        rng.uniform()  # keep the random stream the same whether or not the size is forced
    if not 4 <= size <= max(width, height):
        raise MosaicError(f"synth: tessera size {size:g} px must be between 4 and the image side")
    grout_width = max(1.0, size * rng.uniform(0.02, 0.1))
    names = list(PALETTE)
    colours = tuple(
        str(c) for c in rng.choice(names, size=int(rng.integers(3, 7)), replace=False)
    )
    grout_like_tile = bool(rng.random() < 0.25)
    if grout_like_tile:
        close_to = np.array(PALETTE[colours[int(rng.integers(len(colours)))]])
        grout = close_to + rng.integers(-18, 19, size=3)
    else:
        lightness = rng.uniform(50, 225)
        grout = lightness * np.array([1.0, 0.97, 0.9]) + rng.normal(0, 6, size=3)
    grout_rgb = tuple(int(c) for c in np.clip(grout, 0, 255))
    if realism is None:
        drawn = float(rng.uniform(0.5, 1.0)) if rng.random() < 0.85 else 0.0
    else:
        if not 0 <= realism <= 1:
            raise MosaicError(f"synth: realism {realism:g} must be between 0 and 1")
        drawn = float(realism)
        rng.uniform(), rng.uniform()
    if not 0 <= weathering <= 1:
        raise MosaicError(f"synth: weathering {weathering:g} must be between 0 and 1")
    missing = float(rng.uniform(0.005, 0.05)) if rng.random() < 0.5 else 0.0
    if weathering > 0:
        # Tight grout barely darker than the stone: the grout the tiles were set in, worn flush.
        grout_width = 1.0
        mean_tile = np.mean([PALETTE[c] for c in colours], axis=0)
        mix = 0.4 + 0.4 * weathering
        grout_rgb = tuple(int(c) for c in np.clip((1 - mix) * np.array(grout_rgb) + mix * mean_tile * 0.9, 0, 255))
        missing = max(missing, 0.03 * weathering)  # gaps filled with mortar
    return MosaicParams(
        width=int(width),
        height=int(height),
        style=style,
        tessera_size=float(size),
        grout_width=float(grout_width),
        colours=colours,
        grout_rgb=grout_rgb,  # type: ignore[arg-type]
        grout_like_tile=grout_like_tile,
        missing_fraction=missing,
        chipped_fraction=float(rng.uniform(0.03, 0.2)),
        light_strength=float(rng.uniform(0.0, 0.35)),
        blur_sigma=float(rng.uniform(0.3, 1.5)) if rng.random() < 0.5 else 0.0,
        noise_sigma=float(rng.uniform(0.0, 5.0)),
        jpeg_quality=int(rng.integers(35, 96)) if rng.random() < 0.8 else None,
        realism=drawn,
        weathering=float(weathering),
    )


def synth_mosaic(
    rng: np.random.Generator,
    width: int,
    height: int,
    *,
    style: str | None = None,
    tessera_size: float | None = None,
    realism: float | None = None,
    weathering: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic mosaic: (RGB uint8 image HxWx3, int32 instance map HxW with ids 1..N)."""
    params = draw_params(rng, width, height, style=style, tessera_size=tessera_size,
                         realism=realism, weathering=weathering)
    return render_mosaic(rng, params)


def render_mosaic(
    rng: np.random.Generator, params: MosaicParams
) -> tuple[np.ndarray, np.ndarray]:
    """Build the partition, cut it into tesserae and render the degraded photograph of it."""
    h, w, s = params.height, params.width, params.tessera_size
    partition = _opus_partition if params.style == "opus" else _irregular_partition
    cells = partition(rng, h, w, s)
    if params.realism > 0:
        cells = _realistic_geometry(rng, cells, partition, params)
    n_cells = int(cells.max())

    tiles = _cut_grout(rng, cells, params)
    missing = rng.random(n_cells + 1) < params.missing_fraction
    missing[0] = False
    tiles[missing[tiles]] = 0
    _chip_tiles(rng, tiles, rng.random(n_cells + 1) < params.chipped_fraction)
    instances = _keep_largest_pieces(tiles, min_area=max(4, round(0.02 * s * s)))

    image = _render(rng, params, cells, instances > 0, missing[cells])
    return image, instances


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """A float32 noise field with unit standard deviation and features ~``scale`` px across."""
    step = max(1, int(round(scale)))
    gh, gw = height // step + 3, width // step + 3
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    field = cv2.resize(grid, (gw * step, gh * step), interpolation=cv2.INTER_CUBIC)
    field = field[step : step + height, step : step + width]
    std = float(field.std())
    return field / std if std > 0 else field


def _irregular_partition(rng: np.random.Generator, h: int, w: int, s: float) -> np.ndarray:
    """Voronoi cells of jittered (sometimes staggered) grid seeds, ids 1..N."""
    jitter = rng.uniform(0.2, 0.45)
    pad = int(math.ceil(s))
    ph, pw = h + 2 * pad, w + 2 * pad
    gy, gx = np.mgrid[0 : int(ph / s) + 1, 0 : int(pw / s) + 1].astype(np.float64)
    if rng.random() < 0.5:
        gx += 0.5 * (gy % 2)  # staggered rows, closer to hexagonal cells
    ys = np.rint((gy + 0.5 + rng.uniform(-jitter, jitter, gy.shape)) * s).astype(np.int64)
    xs = np.rint((gx + 0.5 + rng.uniform(-jitter, jitter, gx.shape)) * s).astype(np.int64)
    inside = (ys >= 0) & (ys < ph) & (xs >= 0) & (xs < pw)
    seeds = np.ones((ph, pw), dtype=np.uint8)
    seeds[ys[inside], xs[inside]] = 0
    # Each seed pixel gets its own label; every pixel takes the label of its nearest seed.
    _, labels = cv2.distanceTransformWithLabels(
        seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    return _compact(labels[pad : pad + h, pad : pad + w])


def _opus_partition(rng: np.random.Generator, h: int, w: int, s: float) -> np.ndarray:
    """Rows of roughly rectangular cells along curving guidelines, ids 1..N.

    A row coordinate ``v`` and an along-row coordinate ``u`` are built (parallel waves, or
    concentric arcs around a centre that is often outside the image); rows are bands of ``v``
    of varying height, each cut along ``u`` at random lengths by slightly tilted, wavy cuts.
    """
    yy, xx = np.indices((h, w), dtype=np.float32)
    if rng.random() < 0.4:
        size = max(h, w)
        if rng.random() < 0.5:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        else:
            angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 2.5) * size
            cy, cx = h / 2 + dist * math.sin(angle), w / 2 + dist * math.cos(angle)
        v = np.hypot(xx - cx, yy - cy)
        # Angle measured from the image centre's direction: the seam at +-pi lies far away.
        phi = np.arctan2(yy - cy, xx - cx) - math.atan2(h / 2 - cy, w / 2 - cx)
        phi = (phi + math.pi) % (2 * math.pi) - math.pi
        u = phi * v  # arc length along the row
    else:
        theta = rng.uniform(0, math.pi)
        u = xx * math.cos(theta) + yy * math.sin(theta)
        v = yy * math.cos(theta) - xx * math.sin(theta)
        for _ in range(int(rng.integers(1, 3))):
            wavelength = rng.uniform(0.3, 1.5) * max(h, w)
            amplitude = rng.uniform(0.02, 0.12) * wavelength
            v += amplitude * np.sin(2 * math.pi * u / wavelength + rng.uniform(0, 2 * math.pi))
    del xx, yy
    v += _smooth_noise(rng, h, w, 3 * s) * (0.25 * s)

    vmin = float(v.min())
    n_rows = int((float(v.max()) - vmin) / (0.85 * s)) + 3
    heights = s * rng.uniform(0.85, 1.15, n_rows)
    bounds = vmin - rng.uniform(0, 1) * heights[0] + np.cumsum(heights)
    row = np.searchsorted(bounds, v, side="right")
    centre = (bounds - heights / 2).astype(np.float32)
    tilt = rng.uniform(-0.25, 0.25, n_rows).astype(np.float32)
    u += tilt[row] * (v - centre[row])
    del v
    u += _smooth_noise(rng, h, w, s) * (0.08 * s)

    umin = float(u.min()) - s
    span = float(u.max()) - umin + s
    n_cuts = int(span / (0.75 * s)) + 2
    lengths = s * rng.uniform(0.75, 1.35, (n_rows + 1, n_cuts))
    cuts = np.cumsum(lengths, axis=1) - rng.uniform(0, 1, (n_rows + 1, 1)) * lengths[:, :1]
    stride = float(cuts.max()) + s
    # One sorted key per (row, position along the row): a single searchsorted finds every cell.
    flat_cuts = (np.arange(n_rows + 1)[:, None] * stride + cuts).ravel()
    keys = row * stride + (u.astype(np.float64) - umin)
    return _compact(np.searchsorted(flat_cuts, keys).astype(np.int64) + 1)


def _realistic_geometry(rng: np.random.Generator, cells: np.ndarray, partition, params: MosaicParams
                        ) -> np.ndarray:
    """Mixed tessera sizes and a slight perspective, applied to the cell partition (before the
    grout is cut, so the ground truth stays exact).

    * Half of the mosaics more than 16 tesserae across get a border band along one or two
      image edges, 1.5-3 rows of tesserae 50-70 % the field's size (borders vs field).
    * 60 % are seen with a slight perspective: a homography whose source corners move inwards
      by up to 5 % of the image side, sampled nearest-neighbour (a partition stays one).
    """
    h, w, s = params.height, params.width, params.tessera_size
    if rng.random() < 0.5 and min(h, w) > 16 * s:
        ratio = rng.uniform(0.5, 0.7)
        small = partition(rng, h, w, s * ratio)
        yy, xx = np.indices((h, w), dtype=np.float32)
        edges = rng.permutation(4)[: int(rng.integers(1, 3))]
        dist = np.full((h, w), np.inf, np.float32)
        for e in edges:
            dist = np.minimum(dist, (yy, h - 1 - yy, xx, w - 1 - xx)[e])
        width = rng.uniform(1.5, 3) * ratio * s  # a few rows of the smaller tesserae
        band = dist + _smooth_noise(rng, h, w, 3 * s) * np.float32(0.2 * s) < width
        cells = _compact(np.where(band, small.astype(np.int64) + int(cells.max()), cells))
    if rng.random() < 0.6:
        side = min(h, w)
        dst = np.float32([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])
        inward = np.float32([[1, 1], [-1, 1], [-1, -1], [1, -1]])
        src = dst + inward * rng.uniform(0, 0.05 * side, (4, 1)).astype(np.float32)
        matrix = cv2.getPerspectiveTransform(dst, src)  # output pixel -> source pixel
        warped = cv2.warpPerspective(cells.astype(np.float32), matrix, (w, h),
                                     flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_REPLICATE)
        cells = _compact(np.rint(warped).astype(np.int64))
    return cells


def _compact(labels: np.ndarray) -> np.ndarray:
    """Renumber positive labels to 1..N (order preserved) as int32."""
    present = np.zeros(int(labels.max()) + 1, dtype=bool)
    present[labels] = True
    present[0] = False
    lut = np.cumsum(present).astype(np.int32) * present
    return lut[labels]


def _cut_grout(rng: np.random.Generator, cells: np.ndarray, params: MosaicParams) -> np.ndarray:
    """Shrink every cell away from the cell borders by its grout half-width, with rough edges.

    Border pixels are those whose right or lower neighbour is another cell; they are always
    grout, so two tiles can never be 4-adjacent. Pixels closer to a border than the local
    half-width (per-cell width plus a smooth roughness field) become grout as well.
    """
    h, w = cells.shape
    s = params.tessera_size
    border = np.zeros((h, w), dtype=bool)
    border[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    border[:-1, :] |= cells[:-1, :] != cells[1:, :]
    dist = cv2.distanceTransform((~border).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    half = (params.grout_width - 1) / 2 * rng.uniform(0.5, 1.5, int(cells.max()) + 1)
    local = half.astype(np.float32)[cells]
    local += _smooth_noise(rng, h, w, max(2.0, s / 5)) * np.float32(rng.uniform(0.005, 0.025) * s)
    if params.realism > 0:  # uneven grout: wider and narrower stretches along the lines
        local += np.abs(_smooth_noise(rng, h, w, s)) * np.float32(params.realism * 0.04 * s)
    return np.where(dist > np.maximum(local, 0.5), cells, 0).astype(np.int32)


def _chip_tiles(rng: np.random.Generator, tiles: np.ndarray, chipped: np.ndarray) -> None:
    """Cut a corner, a round bite or a deep wedge out of the chosen tiles, in place.

    Bites and wedges make tiles concave; a wedge past the middle moves the centroid out of
    the tile (prompt points must then fall back to the distance-transform maximum). A chip that
    would leave less than 40 % of a tile is skipped.
    """
    for idx, sl in enumerate(ndi.find_objects(tiles), start=1):
        if sl is None or not chipped[idx]:
            continue
        sub = tiles[sl]
        rr, cc = np.nonzero(sub == idx)
        if len(rr) < 16:
            continue
        angle = rng.uniform(0, 2 * math.pi)
        dx, dy = math.cos(angle), math.sin(angle)
        x, y = cc - cc.mean(), rr - rr.mean()
        along, across = x * dx + y * dy, y * dx - x * dy
        extent = float(along.max())
        kind = rng.random()
        if kind < 0.45:  # a corner or edge broken off straight: stays convex
            cut = along > extent * rng.uniform(0.45, 0.8)
        elif kind < 0.85:  # a round bite from the edge
            radius = extent * rng.uniform(0.35, 0.6)
            cut = (along - extent) ** 2 + across**2 < radius**2
        else:  # a wedge broken out from the edge to past the middle
            apex = -extent * rng.uniform(0.25, 0.4)
            cut = np.abs(across) < (along - apex) * math.tan(rng.uniform(0.35, 0.6))
        if cut.sum() < 0.6 * len(rr):
            sub[rr[cut], cc[cut]] = 0


def _keep_largest_pieces(tiles: np.ndarray, min_area: int) -> np.ndarray:
    """Keep each tile's largest 4-connected piece if at least ``min_area`` px; ids 1..N.

    Tiles never touch, so every 4-connected component of the foreground is a piece of one tile.
    """
    pieces, n = label_components(tiles > 0)
    if n == 0:
        return pieces
    area = np.bincount(pieces.ravel(), minlength=n + 1)
    owner = np.zeros(n + 1, dtype=np.int64)
    owner[pieces.ravel()] = tiles.ravel()
    order = np.lexsort((-area[1:], owner[1:])) + 1  # by tile, largest piece first
    first = np.r_[True, owner[order][1:] != owner[order][:-1]]
    keep = np.zeros(n + 1, dtype=bool)
    keep[order[first]] = True
    keep &= area >= min_area
    keep[0] = False
    return relabel_sequential(np.where(keep[pieces], pieces, 0))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _cell_colours(
    rng: np.random.Generator, params: MosaicParams, cells: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cell RGB (float32, row 0 unused) from a smooth design, and the cell centroids."""
    h, w = cells.shape
    n = int(cells.max()) + 1
    flat = cells.ravel()
    count = np.maximum(np.bincount(flat, minlength=n), 1)
    cy = np.bincount(flat, weights=np.repeat(np.arange(h, dtype=np.float64), w), minlength=n)
    cx = np.bincount(flat, weights=np.tile(np.arange(w, dtype=np.float64), h), minlength=n)
    cy, cx = cy / count, cx / count
    # The design: a smooth field quantised into the palette colours, plus random speckles.
    design = _smooth_noise(rng, h, w, params.tessera_size * rng.uniform(3, 12))
    iy = np.clip(np.rint(cy), 0, h - 1).astype(int)
    ix = np.clip(np.rint(cx), 0, w - 1).astype(int)
    values = design[iy, ix]
    k = len(params.colours)
    shares = np.cumsum(rng.dirichlet(np.full(k, 2.0)))[:-1]
    index = np.searchsorted(np.quantile(values[1:], shares), values)
    speckle = rng.random(n) < 0.06
    index[speckle] = rng.integers(0, k, int(speckle.sum()))
    base = np.array([PALETTE[c] for c in params.colours], dtype=np.float32)[index]
    base *= rng.uniform(0.88, 1.1, (n, 1)).astype(np.float32)
    base += rng.normal(0, 5, (n, 3)).astype(np.float32)
    return base, cy.astype(np.float32), cx.astype(np.float32)


def _render(
    rng: np.random.Generator,
    params: MosaicParams,
    cells: np.ndarray,
    tile_mask: np.ndarray,
    missing_mask: np.ndarray,
) -> np.ndarray:
    """Photograph-like RGB image of the tiles, grout and mortar, then lighting and degradations."""
    h, w = cells.shape
    s = params.tessera_size
    colour, cy, cx = _cell_colours(rng, params, cells)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    grain = rng.standard_normal((h, w), dtype=np.float32)

    # Tiles: palette colour, a tilt of the tile surface, mottled texture, darker bevelled edges.
    n = len(colour)
    slope_x, slope_y = rng.normal(0, 0.25 / s, (2, n)).astype(np.float32)
    offset = 1 - slope_x * cx - slope_y * cy  # shade is 1 at the cell centroid
    shade = slope_x[cells] * xx
    shade += slope_y[cells] * yy
    shade += offset[cells]
    inner = cv2.distanceTransform(tile_mask.astype(np.uint8), cv2.DIST_L2, 3)
    shade *= 1 - np.float32(rng.uniform(0.05, 0.25)) * np.exp(-(inner - 1) / 1.5)
    texture = _smooth_noise(rng, h, w, max(2.0, s / 4)) * np.float32(rng.uniform(2, 8))
    texture += grain * np.float32(rng.uniform(2, 6))
    tiles = colour[cells]
    tiles *= shade[..., None]
    tiles += texture[..., None]
    light_angle = rng.uniform(0, 2 * math.pi)
    if params.realism > 0:
        _photographic_tiles(rng, params, tiles, cells, tile_mask, inner, cy, cx, light_angle)

    # Grout: textured, darker in the shadow of the tiles; rough darker mortar where tiles are gone.
    outer = cv2.distanceTransform((~tile_mask).astype(np.uint8), cv2.DIST_L2, 3)
    grout_shade = 1 + 0.08 * _smooth_noise(rng, h, w, max(2.0, s / 3))
    grout_shade *= 1 - np.float32(rng.uniform(0.0, 0.25)) * np.exp(-(outer - 1) / 2)
    grout_shade[missing_mask] *= np.float32(rng.uniform(0.7, 0.9))
    roughness = np.where(missing_mask, np.float32(12), np.float32(5)) * grain
    grout = np.asarray(params.grout_rgb, dtype=np.float32) * grout_shade[..., None]
    grout += roughness[..., None]
    if params.realism > 0:
        _photographic_grout(rng, params, grout, outer)
    image = tiles
    np.copyto(image, grout, where=~tile_mask[..., None])
    del grout
    if params.weathering > 0:
        _weather(rng, params, image, cells, tile_mask)

    # Lighting: a linear gradient in a random direction plus a broad uneven glow.
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xx - w / 2) * math.cos(angle) + (yy - h / 2) * math.sin(angle)
    ramp /= max(abs(w * math.cos(angle)) + abs(h * math.sin(angle)), 1.0) / 2
    light = 1 + params.light_strength * ramp
    light += 0.3 * params.light_strength * _smooth_noise(rng, h, w, max(h, w) / 2)
    image *= light[..., None]
    if params.realism > 0:  # vignetting: the corners of the frame darker
        r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
        image *= (1 - np.float32(rng.uniform(0.05, 0.35) * params.realism) * r2 / 2)[..., None]

    if params.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), params.blur_sigma)
    if params.noise_sigma > 0:
        noise = rng.standard_normal(image.shape, dtype=np.float32)
        if params.realism > 0:  # camera noise: grows with the signal, partly shared (luma)
            luma = rng.standard_normal((h, w, 1), dtype=np.float32)
            noise = 0.6 * noise + 0.8 * luma
            noise *= np.sqrt(np.clip(image, 8, 255) / 128)
        image += noise * np.float32(params.noise_sigma)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if params.jpeg_quality is not None:
        ok, data = cv2.imencode(
            ".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, params.jpeg_quality]
        )
        if not ok:
            raise MosaicError("synth: JPEG encoding failed")
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
    return np.ascontiguousarray(image)


def _photographic_tiles(
    rng: np.random.Generator,
    params: MosaicParams,
    tiles: np.ndarray,
    cells: np.ndarray,
    tile_mask: np.ndarray,
    inner: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    light_angle: float,
) -> None:
    """What photographs of real tesserae show, drawn into ``tiles`` (float RGB) in place.

    Colour variation inside a tile (mottled hue), rounded or bevelled edges lit from one side
    (bright where the edge faces the light, dark opposite), stone grain or glass (streaks along
    a direction per tile, small bubbles), and glossy specular highlights offset towards the
    light. ``realism`` scales every strength; surface detail also fades below ~24 px tesserae.
    """
    h, w = cells.shape
    s, k = params.tessera_size, np.float32(params.realism)
    n = len(cy)
    # Small tesserae are photographed from afar: their surface detail is not resolved.
    fine = k * np.float32(min(1.0, s / 24))
    # Colour variation inside a tile: a smooth field per channel.
    for c in range(3):
        tiles[..., c] += _smooth_noise(rng, h, w, max(2.0, s / 3)) * (k * np.float32(rng.uniform(3, 10)))
    # Bevels: the slope of a rounded edge, shaded by its direction to the light.
    bevel = np.float32(max(1.5, s * rng.uniform(0.06, 0.16)))
    height = np.minimum(inner, bevel)
    gx = cv2.Sobel(height, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(height, cv2.CV_32F, 0, 1, ksize=3) / 8
    facing = -(gx * np.float32(math.cos(light_angle)) + gy * np.float32(math.sin(light_angle)))
    tiles *= (1 + k * np.float32(rng.uniform(0.2, 0.6)) * np.clip(facing, -1, 1))[..., None]
    # Glass: streaks along a direction per tile, and bubbles; the rest is stone grain.
    glass = rng.random(n) < rng.uniform(0.2, 0.7)
    if params.weathering > 0:  # a stone floor: no glass
        glass[:] = False
    theta = rng.uniform(0, math.pi, n).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    along = xx * np.cos(theta)[cells] + yy * np.sin(theta)[cells]
    wobble = _smooth_noise(rng, h, w, max(2.0, s / 2)) * np.float32(2.5)
    streak = np.sin(along * np.float32(2 * math.pi / max(3.0, s / 5)) + wobble)
    glass_px = glass[cells] & tile_mask
    tiles[glass_px] += (streak[glass_px] * fine * np.float32(rng.uniform(3, 9)))[:, None]
    bubbles = (rng.random((h, w)) < 1.5 / max(s, 4.0) ** 2 * 3) & glass_px
    if bubbles.any():
        radius = max(1, int(round(s / 25)))
        spots = cv2.dilate(bubbles.view(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8)).view(bool)
        spots &= glass_px
        tiles[spots] += np.float32(rng.choice([-1, 1]) * 40) * fine
    grain = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 0.8)
    stone_px = ~glass[cells] & tile_mask
    tiles[stone_px] += (grain[stone_px] * fine * np.float32(rng.uniform(4, 12)))[:, None]
    # Specular highlights: a bright blur offset from the centre towards the light.
    glossy = rng.random(n) < rng.uniform(0.3, 1.0)
    offset = s * rng.uniform(0.1, 0.3, n)
    hx = (cx + offset * math.cos(light_angle) + rng.normal(0, 0.08 * s, n)).astype(np.float32)
    hy = (cy + offset * math.sin(light_angle) + rng.normal(0, 0.08 * s, n)).astype(np.float32)
    sigma = (s * rng.uniform(0.08, 0.2, n)).astype(np.float32)
    d2 = (xx - hx[cells]) ** 2 + (yy - hy[cells]) ** 2
    spot = np.exp(-d2 / (2 * sigma[cells] ** 2)) * (glossy[cells] & tile_mask)
    spot *= k * np.float32(rng.uniform(0.5, 1.0)) * np.float32(1 - params.weathering)  # worn: matte
    tiles += spot[..., None] * (np.float32(255) - tiles) * np.float32(0.85)


def _weather(
    rng: np.random.Generator, params: MosaicParams, image: np.ndarray, cells: np.ndarray,
    tile_mask: np.ndarray
) -> None:
    """A weathered stone floor, drawn into ``image`` (float RGB) in place; the instance map is
    not touched (a cracked or stained tessera is still one tessera).

    * Worn stone: the grout worn flush and dusty, pulled towards the colour of the tiles around
      it (85 % of their brightness); every tile's colour pulled towards the floor's mean and
      desaturated, so neighbouring tiles and the tight grout between them differ little.
    * Stains and patina: broad smooth blotches (several tesserae across) darkening or
      yellowing tiles and grout alike.
    * Cracks: thin dark wandering lines across tiles and grout.
    * Pitting: small dark pits in the stone.
    """
    h, w = cells.shape
    s, k = params.tessera_size, np.float32(params.weathering)
    # Grout worn flush and filled with dust of the stone: close to the tiles around it.
    weight = cv2.GaussianBlur(tile_mask.astype(np.float32), (0, 0), max(1.0, s / 3))
    local = cv2.GaussianBlur(image * tile_mask[..., None], (0, 0), max(1.0, s / 3))
    local /= np.maximum(weight, 1e-3)[..., None]
    grout = ~tile_mask
    image[grout] = (1 - 0.4 * k) * image[grout] + (0.4 * k * 0.85) * local[grout]
    mean = image[tile_mask].mean(axis=0) if tile_mask.any() else image.reshape(-1, 3).mean(axis=0)
    grey = image.mean(axis=2, keepdims=True)
    image *= 1 - 0.35 * k
    image += (0.35 * k) * (0.5 * mean + 0.5 * grey)
    stain = _smooth_noise(rng, h, w, s * rng.uniform(4, 10))
    image *= (1 - np.float32(0.12) * k * np.clip(stain, 0, None))[..., None]
    image[..., 2] -= np.float32(8) * k * np.clip(-stain, 0, None)  # yellowed patches
    # Cracks: random walks of a few tessera lengths, one pixel wide, darker than the stone.
    cracks = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.poisson(k * h * w / (s * s) / 40)) + 1):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        angle = rng.uniform(0, 2 * math.pi)
        points = []
        for _ in range(int(rng.integers(4, 12))):
            points.append((int(x), int(y)))
            angle += rng.normal(0, 0.5)
            x += math.cos(angle) * s * 0.7
            y += math.sin(angle) * s * 0.7
        cv2.polylines(cracks, [np.array(points, np.int32)], False, 1, 1)
    image[cracks.view(bool)] *= np.float32(1 - 0.4 * k)
    pits = (rng.random((h, w)) < 0.004 * k) & tile_mask
    image[pits] *= np.float32(0.7)


def _photographic_grout(
    rng: np.random.Generator, params: MosaicParams, grout: np.ndarray, outer: np.ndarray
) -> None:
    """Grout as photographed, in place: uneven colour (a smooth field per channel) and, for a
    third of the mosaics, recessed grout in deep shadow (dark tiles then sit on dark grout)."""
    h, w = outer.shape
    k = np.float32(params.realism)
    for c in range(3):
        grout[..., c] += _smooth_noise(rng, h, w, max(2.0, params.tessera_size / 2)) * (k * 6)
    if rng.random() < 0.35 and params.weathering == 0:  # weathered grout is worn flush
        depth = np.float32(rng.uniform(0.3, 0.6)) * k
        grout *= (1 - depth * np.exp(-(outer - 1) / 3))[..., None]


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
def synth_dataset(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    min_size: int = 300,
    max_size: int = 1200,
    *,
    style: str | None = None,
    tessera_size: float | None = None,
    realism: float | None = None,
    weathering: float = 0.0,
    image_format: str = "png",
    overwrite: bool = False,
) -> list[Sample]:
    """Write ``n`` synthetic mosaics as a dataset folder (built atomically) and its manifest.

    The longest side of each image is drawn uniformly from ``min_size..max_size``, the other
    side from 60-100 % of it. ``style`` None mixes both styles; ``realism`` None draws the
    photographic effects per mosaic (the default mix), 0 renders clean tiles; ``weathering``
    (0-1) renders weathered stone floors with tight grout. Sample ``i`` depends only on
    ``(seed, i)``: the same seed gives byte-identical files, and a larger ``n`` extends a set.
    """
    if n < 1:
        raise MosaicError(f"synth: --n must be at least 1 (got {n})")
    if seed < 0:
        raise MosaicError(f"synth: --seed must be non-negative (got {seed})")
    if not 32 <= min_size <= max_size:
        raise MosaicError(
            f"synth: need 32 <= --min-size <= --max-size (got {min_size} and {max_size})"
        )
    if style is not None and style not in STYLES:
        raise MosaicError(f"synth: unknown style {style!r} (choose from {', '.join(STYLES)})")
    if image_format not in IMAGE_FORMATS:
        raise MosaicError(f"synth: unknown image format {image_format!r}")
    if tessera_size is not None:
        if not 4 <= tessera_size <= min_size:
            raise MosaicError(
                f"synth: --tessera-size {tessera_size:g} must be between 4 and --min-size"
            )
        if (max_size / tessera_size) ** 2 > MAX_INSTANCES:
            raise MosaicError(
                f"synth: --tessera-size {tessera_size:g} gives more than {MAX_INSTANCES} "
                f"tesserae at {max_size} px (the 16-bit instance map limit)"
            )

    samples = []
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for i in tqdm(range(n), desc="synth", unit="image", disable=None):
            rng = np.random.default_rng([seed, i])
            longest = int(rng.integers(min_size, max_size + 1))
            shorter = max(16, int(round(longest * rng.uniform(0.6, 1.0))))
            width, height = (longest, shorter) if rng.random() < 0.5 else (shorter, longest)
            params = draw_params(rng, width, height, style=style, tessera_size=tessera_size,
                                 realism=realism, weathering=weathering)
            image, instances = render_mosaic(rng, params)
            source = {"synthetic": {"seed": seed, "index": i, **params.to_json()}}
            samples.append(
                write_sample(
                    tmp, f"synth_{i:05d}", image, instances,
                    image_ext=f".{image_format}", source=source, relabel=False,
                )
            )
        write_manifest(
            tmp, samples,
            synthetic={
                "seed": seed, "n": n, "min_size": min_size, "max_size": max_size,
                "style": style or "mixed", "tessera_size": tessera_size,
                "realism": "mixed" if realism is None else realism,
                **({"weathering": weathering} if weathering else {}),
            },
        )
    return samples

