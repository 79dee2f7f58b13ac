"""Crop, rotate and flip a dataset into training samples, split per source mosaic.

The thesis's recipe: every annotated image is cut into crops that hold about 100 tesserae, each
crop is kept as is and rotated by 90/180/270 degrees and flipped horizontally and vertically, and
the longest side is brought to at most 1024 px (SAM 2's input size). Train/val/test splits are
drawn per source mosaic, never per crop, so that no mosaic is seen in two splits.

Choices made here (all deterministic; the seed only drives the split assignment):

* Crops form a regular grid that partitions the image (no overlap, no gaps, the last crop flush
  with the border); the grid is chosen so that one crop holds about ``tesserae_per_crop``
  tesserae, from the image's mean area per tessera (grout included). An image that holds at most
  1.5 times that many tesserae is kept whole.
* A tessera cut by a crop border is kept only if at least ``min_visible`` of its area lies in the
  crop; the pieces kept are renumbered so that every id is one 4-connected region.
* The crop is resized first (image: area interpolation, instances: nearest neighbour) and then
  rotated and flipped with exact array operations, so the six variants of a crop are pixel-exact
  rotations/mirrors of each other. ``rot90`` turns counter-clockwise (``numpy.rot90``), ``rot270``
  clockwise; ``hflip`` mirrors left-right, ``vflip`` top-bottom.
* Output images are PNG (lossless: no second JPEG compression of the crops).
* Crops left without any tessera are skipped.
* A dataset of one mosaic cannot be split per mosaic, so each of its images is split spatially
  instead (:func:`spatial_parts`): cut across its longer side into a train, a val and a test
  band (the positive fractions, in that order), with a gap between neighbouring bands as wide
  as the largest tessera's extent across the cut (from the instance map), so no tessera reaches
  two bands. Crops are planned inside each band, and every crop takes its band's split.
"""
from __future__ import annotations

import logging
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from ..core.dataset import SPLITS, Dataset, Sample, split_disconnected, write_manifest, write_sample
from ..core.io import atomic_output_dir
from ..core.errors import MosaicError

log = logging.getLogger(__name__)

# Name -> exact array transform (works on H x W and H x W x C arrays alike).
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda a: a,
    "rot90": lambda a: np.rot90(a, 1),  # counter-clockwise
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),  # clockwise
    "hflip": lambda a: np.flip(a, 1),  # left-right mirror
    "vflip": lambda a: np.flip(a, 0),  # top-bottom mirror
}
DEFAULT_SPLIT = (0.68, 0.17, 0.15)
WHOLE_IMAGE_FACTOR = 1.5  # keep an image whole when it holds <= this x tesserae_per_crop

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive), parent pixel coordinates


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------
def validate_split(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative train/val/test fractions that sum to 1, else a MosaicError."""
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLITS):
        raise MosaicError(
            f"--split: need three fractions train,val,test (e.g. 0.68,0.17,0.15), got {len(values)}"
        )
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise MosaicError(f"--split: fractions must be non-negative numbers, got {values}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise MosaicError(f"--split: fractions must sum to 1, got {values} (sum {sum(values):g})")
    return values  # type: ignore[return-value]


def parse_split(text: str) -> tuple[float, float, float]:
    """Parse ``"0.68,0.17,0.15"`` into validated train/val/test fractions."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise MosaicError(
            f"--split: {text!r} is not a comma-separated list of numbers (e.g. 0.68,0.17,0.15)"
        ) from None
    return validate_split(values)


def validate_transform_names(names: Sequence[str]) -> tuple[str, ...]:
    """Known, non-empty transform names, deduplicated, in the canonical order of TRANSFORMS."""
    chosen = set(names)
    unknown = sorted(chosen - TRANSFORMS.keys())
    if unknown:
        raise MosaicError(
            f"--transforms: unknown {', '.join(unknown)} (choose from {', '.join(TRANSFORMS)})"
        )
    if not chosen:
        raise MosaicError(f"--transforms: choose at least one of {', '.join(TRANSFORMS)}")
    return tuple(name for name in TRANSFORMS if name in chosen)


def parse_transform_names(text: str) -> tuple[str, ...]:
    """Parse ``"identity,rot90"`` into validated transform names."""
    return validate_transform_names([part.strip() for part in text.split(",") if part.strip()])


# --------------------------------------------------------------------------------------------
# Pure array functions
# --------------------------------------------------------------------------------------------
def _edges(length: int, parts: int) -> list[int]:
    """``parts + 1`` evenly spaced integer cut positions from 0 to ``length``."""
    return [i * length // parts for i in range(parts + 1)]


def plan_crops(width: int, height: int, n_tesserae: int, per_crop: int) -> list[Box]:
    """A grid of crops partitioning the image, each holding about ``per_crop`` tesserae.

    The target crop area is ``per_crop`` times the mean area per tessera (image area / count,
    grout included). The shorter side is cut into ``round(short / sqrt(target))`` parts, the
    longer side into as many parts as make a crop's area closest to the target, so crops stay
    square-ish even on elongated images. Crops are listed row by row, left to right.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if per_crop <= 0:
        raise ValueError(f"tesserae per crop must be positive, got {per_crop}")
    if n_tesserae <= WHOLE_IMAGE_FACTOR * per_crop:
        return [(0, 0, width, height)]
    target_area = per_crop * width * height / n_tesserae
    short, long_ = min(width, height), max(width, height)
    n_short = max(1, min(short, round(short / math.sqrt(target_area))))
    n_long = max(1, min(long_, round(long_ * short / n_short / target_area)))
    nx, ny = (n_short, n_long) if width <= height else (n_long, n_short)
    xs, ys = _edges(width, nx), _edges(height, ny)
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(ny) for i in range(nx)]


def crop_instances(
    instances: np.ndarray,
    box: Box,
    min_visible: float,
    areas: np.ndarray | None = None,
) -> np.ndarray:
    """The crop of an instance map without the tesserae that the crop cuts too much.

    A tessera stays only if at least ``min_visible`` of its full area (in ``instances``) lies
    inside ``box``; the others become background. Ids are not renumbered here. ``areas`` (the
    ``np.bincount`` of ``instances``) may be passed to avoid recounting for every crop.
    """
    x0, y0, x1, y1 = box
    crop = instances[y0:y1, x0:x1]
    if areas is None:
        areas = np.bincount(instances.ravel())
    inside = np.bincount(crop.ravel(), minlength=len(areas))
    keep = inside >= min_visible * areas
    keep[0] = False
    ids = np.arange(len(areas), dtype=crop.dtype)
    return np.where(keep, ids, 0).astype(crop.dtype)[crop]


def resize_to_max_side(
    image: np.ndarray, instances: np.ndarray, max_side: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Shrink image and instance map so the longest side is at most ``max_side``.

    Returns the new image, the instance map renumbered so every id is one 4-connected region
    (resizing can split or drop thin tesserae), and the scale factor applied (1.0 if none).
    """
    height, width = instances.shape
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        instances = cv2.resize(instances.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
    return image, split_disconnected(instances), scale


def mosaic_id(sample: Sample) -> str:
    """The source mosaic a sample comes from: ``source.mosaic``, else its Label Studio task
    (``task:<id>``), else its stem. Crops of one mosaic always share a split."""
    source = sample.source or {}
    if source.get("mosaic") is not None:
        return str(source["mosaic"])
    if source.get("task") is not None:
        return f"task:{source['task']}"
    return sample.stem


def assign_splits(
    weights: dict[str, int], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Assign every mosaic to train/val/test so the summed weights approach ``fractions``.

    Mosaics are shuffled with ``seed``, then each goes to the split furthest below its target
    share (ties: train, val, test). Every split with a positive fraction gets at least one
    mosaic when there are enough; with fewer mosaics than such splits, train is filled first,
    then val, then test.
    """
    fractions = validate_split(fractions)
    target = dict(zip(SPLITS, fractions))
    wanted = [s for s in SPLITS if target[s] > 0]
    ids = sorted(weights)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    total = sum(weights.values())
    load = dict.fromkeys(SPLITS, 0)
    members: dict[str, int] = dict.fromkeys(SPLITS, 0)
    result = {}
    for i, mosaic in enumerate(order):
        empty = [s for s in wanted if members[s] == 0]
        if len(order) - i <= len(empty):
            choice = empty[0]
        else:
            choice = max(wanted, key=lambda s: target[s] * total - load[s])
        result[mosaic] = choice
        load[choice] += weights[mosaic]
        members[choice] += 1
    return result


def tessera_extents(instances: np.ndarray, axis: int) -> np.ndarray:
    """Extent in pixels of every tessera along ``axis`` (1: x, 0: y), from its bounding box."""
    return np.array([sl[axis].stop - sl[axis].start for sl in ndi.find_objects(instances) if sl is not None],
                    dtype=np.int64)


@dataclass
class SpatialSplit:
    """How one image of a single-mosaic dataset was cut into split bands."""

    parent: str
    axis: str  # "x": bands side by side across the width; "y": stacked across the height
    gap: int  # pixels between neighbouring bands (>= the largest tessera's extent across the cut)
    parts: dict[str, Box]  # split -> band, parent pixel coordinates

    def to_json(self) -> dict:
        return {"parent": self.parent, "axis": self.axis, "gap": self.gap,
                "parts": {k: list(v) for k, v in self.parts.items()}}


def spatial_parts(instances: np.ndarray, fractions: Sequence[float], parent: str = "image") -> SpatialSplit:
    """Cut an image into train/val/test bands across its longer side, with a gap between bands.

    Bands follow the positive ``fractions`` in the order train, val, test; their lengths share
    what the gaps leave in proportion to the fractions. The gap is the largest extent of a
    tessera across the cut (at least 1 px), so a tessera can touch at most one band: none is
    in two splits. A MosaicError when a band would be shorter than the gap.
    """
    fractions = validate_split(fractions)
    height, width = instances.shape
    axis = 1 if width >= height else 0
    length = instances.shape[axis]
    extents = tessera_extents(instances, axis)
    gap = max(1, int(extents.max())) if extents.size else 1
    wanted = [(name, f) for name, f in zip(SPLITS, fractions) if f > 0]
    usable = length - gap * (len(wanted) - 1)
    total = sum(f for _, f in wanted)
    parts: dict[str, Box] = {}
    start, acc = 0, 0.0
    for i, (name, f) in enumerate(wanted):
        acc += f
        end = length if i == len(wanted) - 1 else round(usable * acc / total) + gap * i
        if end - start < gap:
            raise MosaicError(
                f"{parent}: too small to split into {'/'.join(n for n, _ in wanted)} parts "
                f"{gap} px apart (the largest tessera); give more mosaics, other --split "
                "fractions, or --keep-splits"
            )
        parts[name] = (start, 0, end, height) if axis == 1 else (0, start, width, end)
        start = end + gap
    return SpatialSplit(parent, "x" if axis == 1 else "y", gap, parts)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
@dataclass
class AugmentSummary:
    """What ``augment_dataset`` wrote."""

    parents: int
    mosaics: int
    crops: int
    skipped_empty: int
    outputs: int
    per_split: dict[str, int] = field(default_factory=dict)
    mosaics_per_split: dict[str, int] = field(default_factory=dict)
    #: One entry per image when a single mosaic was split spatially (else empty).
    spatial: list[SpatialSplit] = field(default_factory=list)

    def spatial_note(self) -> str | None:
        """One line saying how a single mosaic was split, for the user (None when it was not)."""
        if not self.spatial:
            return None
        first = self.spatial[0]
        across = "width" if first.axis == "x" else "height"
        gaps = sorted({s.gap for s in self.spatial})
        gap = f"{gaps[0]} px" if len(gaps) == 1 else f"{gaps[0]}-{gaps[-1]} px"
        return (f"one mosaic: split spatially into {'/'.join(first.parts)} bands across its {across}, "
                f"{gap} apart (the largest tessera), so no tessera is in two splits")


def augment_dataset(
    dataset: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tesserae_per_crop: int = 100,
    min_visible: float = 0.5,
    max_side: int = 1024,
    transforms: Sequence[str] = tuple(TRANSFORMS),
    split: Sequence[float] = DEFAULT_SPLIT,
    keep_splits: bool = False,
    seed: int = 0,
    overwrite: bool = False,
) -> AugmentSummary:
    """Write the cropped, rotated and flipped samples of ``dataset`` into a new dataset ``out``.

    Output stems are ``<parent>_c<crop:03d>_<transform>``; each manifest source records the
    parent, the crop box in parent pixels, the transform, the scale and the parent's own source
    (plus ``mosaic``, the group used for splitting). With ``keep_splits`` every output inherits
    its parent's split (all parents must have one); otherwise splits are drawn per mosaic, and a
    dataset of one mosaic is split spatially (module docstring; recorded in the manifest's
    ``augment.spatial_split`` and in the summary).
    """
    fractions = validate_split(split)
    transforms = validate_transform_names(transforms)
    if tesserae_per_crop <= 0:
        raise MosaicError(f"--tesserae-per-crop must be positive, got {tesserae_per_crop}")
    if not 0.0 <= min_visible <= 1.0:
        raise MosaicError(f"--min-visible must be between 0 and 1, got {min_visible}")
    if max_side <= 0:
        raise MosaicError(f"--max-side must be positive, got {max_side}")
    if Path(out).resolve() == Path(dataset).resolve():
        raise MosaicError(f"{out}: output folder must differ from the input dataset")

    ds = Dataset.open(dataset)
    if not ds.samples:
        raise MosaicError(f"{dataset}: dataset has no samples")
    if keep_splits:
        missing = [s.stem for s in ds.samples if s.split not in SPLITS]
        if missing:
            raise MosaicError(
                f"{dataset}: --keep-splits needs a train/val/test split on every sample; "
                f"{len(missing)} have none (first: {missing[0]})"
            )
        _warn_split_leaks(ds.samples)

    positive = sum(f > 0 for f in fractions)
    spatial = not keep_splits and positive > 1 and len({mosaic_id(s) for s in ds.samples}) == 1
    cuts: list[SpatialSplit] = []
    written: list[tuple[Sample, Sample]] = []  # (parent, output)
    crops = skipped = 0
    with atomic_output_dir(out, overwrite) as tmp:
        bar = tqdm(ds.samples, desc="augment", unit="image", disable=None)
        for parent in bar:
            outputs, n_crops, n_empty, cut = _augment_parent(
                ds, parent, tmp, tesserae_per_crop, min_visible, max_side, transforms,
                fractions if spatial else None,
            )
            if cut is not None:
                cuts.append(cut)
            written.extend((parent, s) for s in outputs)
            crops += n_crops
            skipped += n_empty
            bar.set_postfix(crops=crops, samples=len(written))
        if not written:
            raise MosaicError(f"{dataset}: no crop holds a tessera; nothing to write")

        if keep_splits:
            split_of_parent = {p.stem: p.split for p in ds.samples}
            for parent, sample in written:
                sample.split = split_of_parent[parent.stem]
        elif not spatial:  # (spatially split samples carry their band's split already)
            weights = Counter(mosaic_id(parent) for parent, _ in written)
            split_of_mosaic = assign_splits(dict(weights), fractions, seed)
            for parent, sample in written:
                sample.split = split_of_mosaic[mosaic_id(parent)]

        samples = [s for _, s in written]
        write_manifest(
            tmp,
            samples,
            augment={
                "seed": seed,
                "tesserae_per_crop": tesserae_per_crop,
                "min_visible": min_visible,
                "max_side": max_side,
                "transforms": list(transforms),
                "split": list(fractions),
                "keep_splits": keep_splits,
                **({"spatial_split": [c.to_json() for c in cuts]} if spatial else {}),
            },
        )

    mosaics_in: dict[str, set[str]] = defaultdict(set)
    for parent, sample in written:
        mosaics_in[sample.split].add(mosaic_id(parent))
    per_split = Counter(s.split for s in samples)
    return AugmentSummary(
        parents=len(ds.samples),
        mosaics=len({mosaic_id(p) for p in ds.samples}),
        crops=crops,
        skipped_empty=skipped,
        outputs=len(samples),
        per_split={name: per_split.get(name, 0) for name in SPLITS},
        mosaics_per_split={name: len(mosaics_in.get(name, ())) for name in SPLITS},
        spatial=cuts,
    )


def _augment_parent(
    ds: Dataset,
    parent: Sample,
    root: Path,
    per_crop: int,
    min_visible: float,
    max_side: int,
    transforms: Sequence[str],
    fractions: Sequence[float] | None = None,
) -> tuple[list[Sample], int, int, SpatialSplit | None]:
    """Write every crop x transform of one parent; returns (samples, crops, empty crops, cut).

    With ``fractions`` the parent is first cut into split bands (:func:`spatial_parts`, the
    returned cut), crops are planned inside each band and take its split.
    """
    image = ds.image(parent)
    instances = ds.instances(parent)
    height, width = image.shape[:2]
    if instances.shape != (height, width):
        raise MosaicError(
            f"{parent.stem}: instance map is {instances.shape[1]}x{instances.shape[0]}, "
            f"image is {width}x{height}"
        )
    areas = np.bincount(instances.ravel())
    cut = spatial_parts(instances, fractions, parent.stem) if fractions is not None else None
    regions = list(cut.parts.items()) if cut is not None else [(None, (0, 0, width, height))]
    boxes: list[tuple[str | None, Box]] = []
    for split, (rx0, ry0, rx1, ry1) in regions:
        inside = crop_instances(instances, (rx0, ry0, rx1, ry1), min_visible, areas)
        n_tesserae = len(np.unique(inside)) - int(inside.min() == 0)
        boxes += [(split, (rx0 + x0, ry0 + y0, rx0 + x1, ry0 + y1))
                  for x0, y0, x1, y1 in plan_crops(rx1 - rx0, ry1 - ry0, max(n_tesserae, 0), per_crop)]
    source_base = {**parent.source, "mosaic": mosaic_id(parent), "parent": parent.stem}
    unknown = ds.unknown(parent)  # not annotated (partial export): no crop may hold any of it
    samples, empty = [], 0
    for index, (split, box) in enumerate(boxes):
        x0, y0, x1, y1 = box
        if unknown is not None and unknown[y0:y1, x0:x1].any():
            empty += 1
            continue
        crop_ids = crop_instances(instances, box, min_visible, areas)
        crop_image, crop_ids, scale = resize_to_max_side(image[y0:y1, x0:x1], crop_ids, max_side)
        if not crop_ids.any():
            empty += 1
            continue
        for name in transforms:
            transform = TRANSFORMS[name]
            source = {**source_base, "crop": list(box), "transform": name, "scale": round(scale, 6)}
            sample = write_sample(
                root,
                f"{parent.stem}_c{index:03d}_{name}",
                transform(crop_image),
                transform(crop_ids),
                source=source,
            )
            if split is not None:
                sample.split = split
            samples.append(sample)
    return samples, len(boxes), empty, cut


def _warn_split_leaks(samples: Sequence[Sample]) -> None:
    """Log a warning for every mosaic whose kept splits differ between its images."""
    splits: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        splits[mosaic_id(s)].add(str(s.split))
    for mosaic, names in sorted(splits.items()):
        if len(names) > 1:
            log.warning("mosaic %s is in several splits (%s): kept as given", mosaic,
                        ", ".join(sorted(names)))
