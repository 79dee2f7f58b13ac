"""Tessera statistics: shape, orientation and colour of every tessera, and per-mosaic summaries.

Everything here is a pure function of an instance map (0 = grout/background, other values are
tessera ids, not necessarily consecutive) and, for colour, the RGB image. Lengths are computed in
pixels and converted to millimetres only when a pixel size is given (:class:`Units`).

Conventions and definitions (the report repeats them for its readers):

- **Image axes**: x to the right, y down. Angles are in degrees in [0, 180), measured
  counter-clockwise from the x axis *as seen on screen* (so a tile rising to the right has a
  small positive angle, although image y decreases along it).
- **Area**: number of pixels of the tessera.
- **Perimeter**: length of the tessera's outer boundary (holes ignored) traced through the
  centres of its boundary pixels, as OpenCV's ``findContours`` + ``arcLength`` measure it
  (8-connected chain, diagonal steps count sqrt(2)). A k x k square measures 4 (k - 1).
- **Equivalent diameter**: diameter of the disc of the same area, sqrt(4 A / pi).
- **Minimum-area rectangle**: OpenCV's ``minAreaRect`` of the pixel centres, each side
  lengthened by one pixel (the pixels' own extent), so a k x k square has a k x k rectangle.
  Digitisation makes rotated tiles look a little stubbier: a 40 x 10 px rectangle measures
  elongation 4 axis-aligned and about 3.7 at 30 degrees.
- **Orientation**: direction of the long side of the minimum-area rectangle.
- **Elongation**: long side / short side of the minimum-area rectangle (>= 1).
- **Solidity**: area / pixels of the convex hull, the hull's pixels being those whose centres lie
  inside or on the convex hull of the tile's pixel centres (as scikit-image's
  ``convex_hull_image(offset_coordinates=False)``): 1 for convex tiles, digital ones included,
  less for concave ones.
- **Joints**: every background pixel is given to its nearest tessera (a Voronoi partition of the
  grout). Two tesserae whose parts share an edge meet at a *joint*; across the joint, the two
  pixels' distances to their own tesserae add up to the local gap width (2 for a 2-pixel grout
  line, 0 for touching tiles). A joint's width is the median of its gaps. Joints wider than
  3 times the median joint width (taken as at least 1 pixel) are not grout lines but holes
  (missing tesserae, uncovered areas) and are ignored below.
- **Neighbours**: number of other tesserae met at a joint. On a square grid, tiles sharing an
  edge are neighbours and diagonal tiles (meeting only at a grout crossing) are not: the centre
  of a 3 x 3 grid has 4 neighbours.
- **Border tesserae** touch the image's outermost rows or columns: the frame cuts them, so
  their size, shape and orientation are partial (and often axis-aligned). They are counted
  (count, density, palette) and listed (``touches_border`` = 1) but left out of the
  distributions and of the orientation field, which describe *complete* tesserae.
- **Mean colour**: mean of the tessera's pixels in CIE L*a*b* (D65), i.e. the Lab of each pixel
  (``skimage.color.rgb2lab``), then averaged.
- **Grout fraction**: background pixels / image pixels.
- **Grout width** (the mean grout width): mean width of the joints.
- **Orientation field**: every tessera votes with its doubled-angle vector (cos 2t, sin 2t)
  (so 0 and 180 degrees agree), weighted by area x (1 - 1/elongation): a square has no long axis
  and does not vote, nor does a border tessera. Votes are smoothed with a Gaussian (sigma = 2
  median equivalent diameters of the complete tesserae). **Coherence** is the mean resultant
  length |sum w v| / sum w: 1 when all tiles are parallel, near 0 for random orientations. The
  global value uses every vote; the local one is the weighted mean, over the voting tiles, of
  the smoothed field's coherence at each of them.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy.cluster.vq import kmeans2
from skimage.color import lab2rgb, rgb2lab

from ..core.errors import MosaicError

# Gaps longer than this many median gaps are holes, not grout lines.
_GAP_OUTLIER_FACTOR = 3.0
# The orientation field's Gaussian sigma, in median equivalent diameters.
_FIELD_SIGMA_DIAMETERS = 2.0
PALETTE_SIZE = 8

# Per-tessera measures, in tesserae.csv's column order (L, a, b: the mean Lab colour).
MEASURES = ("area", "perimeter", "equivalent_diameter", "orientation", "elongation", "solidity",
            "neighbours", "L", "a", "b")
# Measures summarised by median and IQR (orientation is axial: it gets circular statistics).
SUMMARISED = ("area", "perimeter", "equivalent_diameter", "elongation", "solidity", "neighbours",
              "L", "a", "b")


@dataclass(frozen=True)
class Units:
    """Millimetres when a pixel size (mm per pixel) is known, pixels otherwise."""

    pixel_size_mm: float | None = None

    def __post_init__(self) -> None:
        s = self.pixel_size_mm
        if s is not None and not (math.isfinite(s) and s > 0):
            raise MosaicError(f"--pixel-size: must be a positive number of mm per pixel (got {s})")

    @property
    def physical(self) -> bool:
        return self.pixel_size_mm is not None

    @property
    def length(self) -> str:
        """Unit suffix of lengths in headers: ``mm`` or ``px``."""
        return "mm" if self.physical else "px"

    @property
    def area(self) -> str:
        """Unit suffix of areas in headers: ``mm2`` or ``px`` (a pixel count)."""
        return "mm2" if self.physical else "px"

    @property
    def length_scale(self) -> float:
        return self.pixel_size_mm if self.physical else 1.0

    @property
    def area_scale(self) -> float:
        return self.pixel_size_mm**2 if self.physical else 1.0

    @property
    def density_key(self) -> str:
        return "density_per_cm2" if self.physical else "density_per_megapixel"

    def density(self, count: int, n_pixels: int) -> float:
        """Tesserae per cm^2 of image with a pixel size, per megapixel otherwise."""
        if n_pixels == 0:
            return float("nan")
        if self.physical:
            return count / (n_pixels * self.area_scale / 100.0)
        return count / (n_pixels / 1e6)

    def describe(self) -> str:
        """One sentence for report headers."""
        if self.physical:
            return (f"Lengths in mm and areas in mm² (pixel size {self.pixel_size_mm:g} mm); "
                    "density in tesserae per cm² of image; centroids in pixels.")
        return ("Lengths in pixels and areas in pixels (no pixel size given); density in "
                "tesserae per megapixel of image.")

    def column(self, measure: str) -> str:
        """CSV/JSON header of a measure, its unit included (e.g. ``area_mm2``)."""
        return {
            "area": f"area_{self.area}",
            "perimeter": f"perimeter_{self.length}",
            "equivalent_diameter": f"equivalent_diameter_{self.length}",
            "orientation": "orientation_deg",
            "elongation": "elongation_ratio",
            "solidity": "solidity_ratio",
            "neighbours": "neighbours_count",
            "L": "L_cielab",
            "a": "a_cielab",
            "b": "b_cielab",
        }[measure]

    def scale(self, measure: str) -> float:
        if measure == "area":
            return self.area_scale
        if measure in ("perimeter", "equivalent_diameter"):
            return self.length_scale
        return 1.0


# --------------------------------------------------------------------------------------------
# Per-tessera measures (pixels)
# --------------------------------------------------------------------------------------------
def dense_ids(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(map with ids renumbered 1..N in increasing id order, the original ids as an array)."""
    if instances.ndim != 2:
        raise MosaicError(f"instance map must be 2-D, got shape {instances.shape}")
    if instances.size and int(instances.min()) < 0:
        raise MosaicError("instance map has negative ids")
    ids = np.unique(instances)
    ids = ids[ids > 0].astype(np.int64)
    lut = np.zeros(int(instances.max(initial=0)) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[instances], ids


def areas_and_centroids(dense: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts (N,) and centroids (N, 2) as (x, y) of ids 1..n of a dense map."""
    rows, cols = np.nonzero(dense)
    labels = dense[rows, cols]
    counts = np.bincount(labels, minlength=n + 1)[1:].astype(np.float64)
    cx = np.bincount(labels, weights=cols, minlength=n + 1)[1:] / np.maximum(counts, 1)
    cy = np.bincount(labels, weights=rows, minlength=n + 1)[1:] / np.maximum(counts, 1)
    return counts, np.stack([cx, cy], axis=1)


def touches_border(dense: np.ndarray, n: int) -> np.ndarray:
    """Whether each dense id 1..n has a pixel in the image's outermost rows or columns."""
    border = np.zeros(n + 1, dtype=bool)
    if dense.size:
        for edge in (dense[0], dense[-1], dense[:, 0], dense[:, -1]):
            border[edge] = True
    return border[1:]


def equivalent_diameter(area: np.ndarray) -> np.ndarray:
    """Diameter of the disc of the same area: sqrt(4 A / pi)."""
    return np.sqrt(4.0 * np.asarray(area, dtype=np.float64) / math.pi)


def long_axis_angle(box: np.ndarray) -> tuple[float, float, float]:
    """(orientation in degrees [0, 180), long side, short side) of a rectangle's 4 corners.

    Corners are image (x, y-down) points in order around the rectangle; the angle is
    counter-clockwise from the x axis as seen on screen.
    """
    e1, e2 = box[1] - box[0], box[2] - box[1]
    l1, l2 = float(np.hypot(*e1)), float(np.hypot(*e2))
    long_edge = e1 if l1 >= l2 else e2
    angle = math.degrees(math.atan2(-float(long_edge[1]), float(long_edge[0]))) % 180.0
    if angle >= 180.0 - 1e-9:  # -0.0 % 180 and rounding can land on 180
        angle = 0.0
    return angle, max(l1, l2), min(l1, l2)


def lattice_points_in_polygon(polygon: np.ndarray) -> int:
    """Integer points inside or on a simple polygon with integer vertices (Pick's theorem).

    Pick: area = interior + boundary / 2 - 1, where boundary counts gcd(|dx|, |dy|) points per
    edge; so interior + boundary = area + boundary / 2 + 1. Exact, and right for a degenerate
    polygon too (a point: 1; a segment: its pixels).
    """
    pts = polygon.reshape(-1, 2).astype(np.int64)
    nxt = np.roll(pts, -1, axis=0)
    twice_area = abs(int(np.sum(pts[:, 0] * nxt[:, 1] - nxt[:, 0] * pts[:, 1])))
    boundary = int(np.sum(np.gcd(np.abs(nxt[:, 0] - pts[:, 0]), np.abs(nxt[:, 1] - pts[:, 1]))))
    return (twice_area + boundary) // 2 + 1


def tile_shape(tile: np.ndarray) -> dict[str, float]:
    """Perimeter, orientation, elongation and convex-hull pixel count of one boolean tile image.

    See the module docstring for the definitions. An empty tile is an error.
    """
    contours, _ = cv2.findContours(
        tile.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    if not contours:
        raise ValueError("tile_shape: empty tile")
    perimeter = float(sum(cv2.arcLength(c, True) for c in contours))
    centres_hull = cv2.convexHull(np.vstack(contours).reshape(-1, 2))
    box = cv2.boxPoints(cv2.minAreaRect(centres_hull))
    angle, long_side, short_side = long_axis_angle(box)
    return {
        "perimeter": perimeter,
        "orientation": angle,
        "elongation": (long_side + 1.0) / (short_side + 1.0),
        # Pixel centres are lattice points: the hull's pixels are the lattice points it holds.
        "hull_pixels": float(lattice_points_in_polygon(centres_hull)),
    }


def tile_shapes(dense: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """:func:`tile_shape` of ids 1..n of a dense map, as arrays of length n."""
    out = {k: np.empty(n, dtype=np.float64)
           for k in ("perimeter", "orientation", "elongation", "hull_pixels")}
    for k, sl in enumerate(ndi.find_objects(dense, max_label=n)):
        shape = tile_shape(dense[sl] == k + 1)
        for key, value in shape.items():
            out[key][k] = value
    return out


def mean_lab(image: np.ndarray, dense: np.ndarray, n: int) -> np.ndarray:
    """Mean CIE L*a*b* (D65) colour of ids 1..n of a dense map: (n, 3)."""
    if image.shape[:2] != dense.shape:
        raise MosaicError(
            f"image is {image.shape[1]}x{image.shape[0]}, instance map is "
            f"{dense.shape[1]}x{dense.shape[0]}"
        )
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    rows, cols = np.nonzero(dense)
    labels = dense[rows, cols]
    rgb = image[rows, cols, :3].astype(np.uint32)
    # Convert each distinct colour once (photos hold far fewer colours than pixels).
    colours, inverse = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2],
                                 return_inverse=True)
    channels = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1)
    lab = rgb2lab(channels[None].astype(np.float64) / 255.0)[0][inverse.ravel()]
    counts = np.maximum(np.bincount(labels, minlength=n + 1)[1:], 1)
    return np.stack(
        [np.bincount(labels, weights=lab[:, c], minlength=n + 1)[1:] / counts for c in range(3)],
        axis=1,
    )


# --------------------------------------------------------------------------------------------
# Grout and neighbours
# --------------------------------------------------------------------------------------------
def grout_fraction(instances: np.ndarray) -> float:
    """Background pixels / image pixels."""
    return float(np.count_nonzero(instances == 0) / instances.size) if instances.size else 0.0


@dataclass
class Joints:
    """Joints between tesserae: dense id pairs (i < j), width (pixels) and length (pixel
    pairs) of each, and which ones are grout lines rather than holes."""

    pairs: np.ndarray  # (M, 2)
    width: np.ndarray  # (M,)
    length: np.ndarray  # (M,)
    grout: np.ndarray  # (M,) bool


def joints(dense: np.ndarray) -> Joints:
    """The joints of a dense instance map (see the module docstring)."""
    background = dense == 0
    empty = Joints(np.zeros((0, 2), dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64),
                   np.zeros(0, dtype=bool))
    if background.all():
        return empty
    if background.any():
        dist, (iy, ix) = ndi.distance_transform_edt(background, return_indices=True)
        owner = dense[iy, ix]
    else:
        dist, owner = np.zeros(dense.shape), dense
    lo, hi, gaps = [], [], []
    for a, b, da, db in (
        (owner[:, :-1], owner[:, 1:], dist[:, :-1], dist[:, 1:]),
        (owner[:-1, :], owner[1:, :], dist[:-1, :], dist[1:, :]),
    ):
        edge = a != b
        lo.append(np.minimum(a[edge], b[edge]))
        hi.append(np.maximum(a[edge], b[edge]))
        gaps.append(da[edge] + db[edge])
    lo, hi, gaps = (np.concatenate(x) for x in (lo, hi, gaps))
    if len(gaps) == 0:  # a single tessera
        return empty
    code = lo.astype(np.int64) * (int(dense.max()) + 1) + hi
    order = np.lexsort((gaps, code))
    code, gaps = code[order], gaps[order]
    starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
    ends = np.r_[starts[1:], len(code)]
    width = (gaps[(starts + ends - 1) // 2] + gaps[(starts + ends) // 2]) / 2  # median
    pairs = np.stack(np.divmod(code[starts], int(dense.max()) + 1), axis=1)
    cap = _GAP_OUTLIER_FACTOR * max(float(np.median(width)), 1.0)
    return Joints(pairs, width, ends - starts, width <= cap)


def mean_grout_width(j: Joints) -> float:
    """Mean width of the grout joints (pixels); NaN without any."""
    return float(j.width[j.grout].mean()) if j.grout.any() else float("nan")


def neighbour_counts(j: Joints, n: int) -> np.ndarray:
    """Number of tesserae met at a grout joint, for each dense id 1..n."""
    pairs = j.pairs[j.grout]
    return (np.bincount(pairs[:, 0], minlength=n + 1)
            + np.bincount(pairs[:, 1], minlength=n + 1))[1:]


# --------------------------------------------------------------------------------------------
# Orientation field
# --------------------------------------------------------------------------------------------
def orientation_weights(area: np.ndarray, elongation: np.ndarray) -> np.ndarray:
    """Vote of each tile in the orientation field: area x (1 - 1/elongation)."""
    with np.errstate(divide="ignore"):
        return np.asarray(area, dtype=np.float64) * (1.0 - 1.0 / np.asarray(elongation))


def doubled_angle_vectors(angles_deg: np.ndarray) -> np.ndarray:
    """(cos 2t, sin 2t) of axial angles in degrees: (N, 2)."""
    t = np.radians(np.asarray(angles_deg, dtype=np.float64)) * 2.0
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def coherence(angles_deg: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean resultant length of doubled-angle vectors: 1 all parallel, ~0 random; NaN if no
    weight."""
    v = doubled_angle_vectors(angles_deg)
    w = np.ones(len(v)) if weights is None else np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    if total <= 0:
        return float("nan")
    return min(1.0, float(np.hypot(*(w @ v)) / total))


def dominant_orientation(angles_deg: np.ndarray, weights: np.ndarray) -> float:
    """Axial mean direction in degrees [0, 180) (NaN if no weight)."""
    c, s = np.asarray(weights, dtype=np.float64) @ doubled_angle_vectors(angles_deg)
    if c == 0 and s == 0:
        return float("nan")
    return math.degrees(0.5 * math.atan2(s, c)) % 180.0


@dataclass
class OrientationField:
    """A smoothed doubled-angle field on a grid of ``step``-pixel cells.

    ``cos2``/``sin2`` are the smoothed weighted mean components, ``weight`` the smoothed total
    weight (0 far from any voting tile); coherence is ``hypot(cos2, sin2)``.
    """

    cos2: np.ndarray
    sin2: np.ndarray
    weight: np.ndarray
    step: int
    sigma: float  # pixels

    @property
    def coherence(self) -> np.ndarray:
        return np.hypot(self.cos2, self.sin2)

    @property
    def angle_deg(self) -> np.ndarray:
        return np.degrees(0.5 * np.arctan2(self.sin2, self.cos2)) % 180.0

    def at(self, points_xy: np.ndarray) -> np.ndarray:
        """Grid cell indices (row, col) of image points (x, y)."""
        h, w = self.weight.shape
        col = np.clip((points_xy[:, 0] / self.step).astype(np.int64), 0, w - 1)
        row = np.clip((points_xy[:, 1] / self.step).astype(np.int64), 0, h - 1)
        return row, col


def orientation_field(
    shape: tuple[int, int],
    centroids_xy: np.ndarray,
    angles_deg: np.ndarray,
    weights: np.ndarray,
    sigma: float,
) -> OrientationField:
    """Gaussian-smoothed doubled-angle votes placed at the tile centroids."""
    sigma = max(float(sigma), 1.0)
    step = max(1, int(round(sigma / 3)))
    gh, gw = -(-shape[0] // step), -(-shape[1] // step)
    field = OrientationField(np.zeros((gh, gw)), np.zeros((gh, gw)), np.zeros((gh, gw)),
                             step, sigma)
    if len(weights) == 0:
        return field
    row, col = field.at(np.asarray(centroids_xy, dtype=np.float64))
    v = doubled_angle_vectors(angles_deg) * weights[:, None]
    sums = []
    for values in (v[:, 0], v[:, 1], weights):
        grid = np.zeros((gh, gw))
        np.add.at(grid, (row, col), values)
        sums.append(ndi.gaussian_filter(grid, sigma / step, mode="constant", truncate=3.0))
    total = sums[2]
    floor = 1e-6 * max(float(total.max()), 1e-300)
    with np.errstate(invalid="ignore", divide="ignore"):
        field.cos2 = np.where(total > floor, sums[0] / total, 0.0)
        field.sin2 = np.where(total > floor, sums[1] / total, 0.0)
    field.weight = np.where(total > floor, total, 0.0)
    return field


def local_coherence(field: OrientationField, centroids_xy: np.ndarray, weights: np.ndarray
                    ) -> float:
    """Weighted mean, over tiles, of the field's coherence at each tile (NaN if no weight)."""
    total = float(np.sum(weights))
    if total <= 0:
        return float("nan")
    row, col = field.at(np.asarray(centroids_xy, dtype=np.float64))
    return min(1.0, float(np.sum(field.coherence[row, col] * weights) / total))


# --------------------------------------------------------------------------------------------
# Colour palette
# --------------------------------------------------------------------------------------------
def colour_palette(lab: np.ndarray, area: np.ndarray, k: int = PALETTE_SIZE
                   ) -> list[dict[str, Any]]:
    """Dominant tile colours: k-means (k <= 8, fixed seed) of the tiles' mean Lab colours.

    Each entry: Lab centre, sRGB hex, number of tesserae and share of tessera area, largest share
    first. Empty without tiles.
    """
    n = len(lab)
    if n == 0:
        return []
    k = min(k, len(np.unique(np.round(lab, 3), axis=0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "one of the clusters is empty": dropped below
        centres, labels = kmeans2(lab.astype(np.float64), k, minit="++", seed=0)
    palette = []
    total = float(area.sum())
    for c in range(k):
        members = labels == c
        if not members.any():
            continue
        rgb = np.clip(lab2rgb(centres[c][None, None, :])[0, 0], 0, 1)
        palette.append({
            "lab": [round(float(x), 2) for x in centres[c]],
            "hex": "#" + "".join(f"{int(round(x * 255)):02x}" for x in rgb),
            "tesserae": int(members.sum()),
            "area_share": float(area[members].sum() / total) if total else 0.0,
        })
    palette.sort(key=lambda p: (-p["area_share"], p["hex"]))
    return palette


# --------------------------------------------------------------------------------------------
# One mosaic
# --------------------------------------------------------------------------------------------
@dataclass
class TesseraMeasures:
    """Per-tessera measures in pixels, one entry per id (increasing id order)."""

    ids: np.ndarray
    area: np.ndarray
    perimeter: np.ndarray
    equivalent_diameter: np.ndarray
    orientation: np.ndarray  # degrees [0, 180)
    elongation: np.ndarray
    solidity: np.ndarray
    neighbours: np.ndarray
    centroid: np.ndarray  # (N, 2) x, y in pixels
    border: np.ndarray  # (N,) bool: touches the image border (partial tessera)
    lab: np.ndarray | None  # (N, 3) or None without an image

    def __len__(self) -> int:
        return len(self.ids)

    def values(self, measure: str) -> np.ndarray | None:
        """One measure by name (``L``, ``a``, ``b`` are the Lab channels; None without image)."""
        if measure in ("L", "a", "b"):
            return None if self.lab is None else self.lab[:, "Lab".index(measure)]
        return getattr(self, measure)


@dataclass
class MosaicStats:
    """Everything measured on one mosaic, in pixels, plus the units to report it in."""

    name: str
    shape: tuple[int, int]  # (height, width)
    units: Units
    tesserae: TesseraMeasures
    grout_fraction: float
    grout_width: float  # pixels
    weights: np.ndarray  # orientation votes
    field: OrientationField
    coherence_global: float
    coherence_local: float
    dominant_orientation: float
    palette: list[dict[str, Any]] | None

    def column(self, measure: str) -> np.ndarray | None:
        """A measure of every tessera in report units (None for colour without an image)."""
        values = self.tesserae.values(measure)
        return None if values is None else values * self.units.scale(measure)

    def complete(self, measure: str) -> np.ndarray | None:
        """:meth:`column` of the complete tesserae only (not touching the image border)."""
        values = self.column(measure)
        return None if values is None else values[~self.tesserae.border]


def measure_tesserae(
    instances: np.ndarray, image: np.ndarray | None = None
) -> tuple[TesseraMeasures, float]:
    """Per-tessera measures and the mean grout width (pixels)."""
    dense, ids = dense_ids(np.asarray(instances))
    n = len(ids)
    area, centroid = areas_and_centroids(dense, n)
    shapes = tile_shapes(dense, n)
    tile_joints = joints(dense)
    measures = TesseraMeasures(
        ids=ids,
        area=area,
        perimeter=shapes["perimeter"],
        equivalent_diameter=equivalent_diameter(area),
        orientation=shapes["orientation"],
        elongation=shapes["elongation"],
        solidity=area / shapes["hull_pixels"],
        neighbours=neighbour_counts(tile_joints, n),
        centroid=centroid,
        border=touches_border(dense, n),
        lab=None if image is None else mean_lab(image, dense, n),
    )
    return measures, mean_grout_width(tile_joints)


def measure_mosaic(
    instances: np.ndarray,
    image: np.ndarray | None = None,
    *,
    name: str = "mosaic",
    units: Units = Units(),
) -> MosaicStats:
    """Measure every tessera of an instance map and summarise the mosaic."""
    instances = np.asarray(instances)
    t, width = measure_tesserae(instances, image)
    weights = orientation_weights(t.area, t.elongation) * ~t.border
    diameters = t.equivalent_diameter[~t.border]
    if len(diameters) == 0:  # every tessera touches the border (or there are none)
        diameters = t.equivalent_diameter if len(t) else np.ones(1)
    diameter = float(np.median(diameters))
    field = orientation_field(instances.shape, t.centroid, t.orientation, weights,
                              _FIELD_SIGMA_DIAMETERS * diameter)
    return MosaicStats(
        name=name,
        shape=instances.shape,
        units=units,
        tesserae=t,
        grout_fraction=grout_fraction(instances),
        grout_width=width,
        weights=weights,
        field=field,
        coherence_global=coherence(t.orientation, weights),
        coherence_local=local_coherence(field, t.centroid, weights),
        dominant_orientation=dominant_orientation(t.orientation, weights),
        palette=None if t.lab is None else colour_palette(t.lab, t.area),
    )


def tessera_table(stats: MosaicStats) -> dict[str, list[Any]]:
    """Columns of tesserae.csv (headers carry units); colour cells are None without an image."""
    t, units = stats.tesserae, stats.units
    table: dict[str, list[Any]] = {
        "id": t.ids.tolist(),
        "centroid_x_px": np.round(t.centroid[:, 0], 2).tolist(),
        "centroid_y_px": np.round(t.centroid[:, 1], 2).tolist(),
        "touches_border": t.border.astype(np.int64).tolist(),
    }
    for measure in MEASURES:
        values = stats.column(measure)
        header = units.column(measure)
        if values is None:
            table[header] = [None] * len(t)
        elif measure == "neighbours" or (measure == "area" and not units.physical):
            table[header] = values.astype(np.int64).tolist()
        else:
            table[header] = [_round(v) for v in values]
    return table


def distribution(values: np.ndarray) -> dict[str, float | None]:
    """Median, quartiles, IQR and mean (None when empty)."""
    if len(values) == 0:
        return dict.fromkeys(("median", "q25", "q75", "iqr", "mean"))
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return {"median": _round(median), "q25": _round(q25), "q75": _round(q75),
            "iqr": _round(q75 - q25), "mean": _round(np.mean(values))}


def summarise(stats: MosaicStats) -> dict[str, Any]:
    """The content of summary.json: counts, density, distributions, grout and orientation."""
    units, t = stats.units, stats.tesserae
    h, w = stats.shape
    distributions = {}
    for measure in SUMMARISED:
        values = stats.complete(measure)
        if values is not None:
            distributions[units.column(measure)] = distribution(values)
    return {
        "mosaic": stats.name,
        "width_px": int(w),
        "height_px": int(h),
        "units": {
            "pixel_size_mm": units.pixel_size_mm,
            "length": units.length,
            "area": units.area,
            "note": units.describe(),
        },
        "tesserae": len(t),
        "tesserae_complete": int(np.count_nonzero(~t.border)),
        units.density_key: _round(units.density(len(t), h * w)),
        "grout_fraction": _round(stats.grout_fraction),
        f"grout_width_{units.length}": _round(stats.grout_width * units.length_scale),
        "orientation": {
            "dominant_deg": _round(stats.dominant_orientation),
            "coherence_global": _round(stats.coherence_global),
            "coherence_local": _round(stats.coherence_local),
            f"field_sigma_{units.length}": _round(stats.field.sigma * units.length_scale),
            "voting_tesserae": int(np.count_nonzero(stats.weights > 0)),
        },
        "distributions": distributions,
        "palette": stats.palette,
    }


def group_summary(name: str, members: Sequence[MosaicStats]) -> dict[str, Any]:
    """A summary of several mosaics taken together (for --compare).

    Distributions pool the complete tesserae; count and density add up over all images; grout
    fraction is over all pixels; grout width and coherences are the means over mosaics; the
    dominant orientation pools the votes of all tiles.
    """
    if not members:
        raise MosaicError(f"{name}: no mosaic to summarise")
    units = members[0].units
    pixels = sum(m.shape[0] * m.shape[1] for m in members)
    count = sum(len(m.tesserae) for m in members)
    distributions = {}
    for measure in SUMMARISED:
        columns = [m.complete(measure) for m in members]
        if all(c is not None for c in columns):
            distributions[units.column(measure)] = distribution(np.concatenate(columns))
    grout_pixels = sum(m.grout_fraction * m.shape[0] * m.shape[1] for m in members)
    return {
        "group": name,
        "mosaics": [m.name for m in members],
        "tesserae": count,
        "tesserae_complete": sum(int(np.count_nonzero(~m.tesserae.border)) for m in members),
        units.density_key: _round(units.density(count, pixels)),
        "grout_fraction": _round(grout_pixels / pixels),
        f"grout_width_{units.length}": _round(
            _nanmean([m.grout_width for m in members]) * units.length_scale),
        "orientation": {
            "dominant_deg": _round(dominant_orientation(
                np.concatenate([m.tesserae.orientation for m in members]),
                np.concatenate([m.weights for m in members]))),
            "coherence_global": _round(_nanmean([m.coherence_global for m in members])),
            "coherence_local": _round(_nanmean([m.coherence_local for m in members])),
        },
        "distributions": distributions,
    }


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _round(value: float, digits: int = 6) -> float | None:
    """A JSON-friendly float (None for NaN/inf) with ``digits`` significant digits."""
    value = float(value)
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None
