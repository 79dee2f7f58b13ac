"""The dataset contract every command reads and writes.

```
DATASET/
  images/<stem>.<ext>       the image as given
  masks/<stem>.png          8-bit, same size: tesserae 0 (black), background 255 (white)
  instances/<stem>.png      16-bit, 0 = background, 1..N one id per tessera
  points/<stem>.json        {"points": [[x, y], ...]} pixel coordinates, one per tessera, in id order
  manifest.json             per sample: stem, source, size, orientation, tesserae, split
```

Images are read in their displayed orientation (``imageio``: the EXIF orientation applied, as
browsers and Label Studio's editor show them); masks, instances, points and the manifest's
size are in that frame, and ``orientation`` records the EXIF value that was applied.

Points are integer pixel indices ``[column, row]`` that always lie inside their tessera: the
centroid when the (rounded) centroid is inside, otherwise the interior pixel farthest from the
tessera's border (distance-transform maximum).

Everything here is a pure function of arrays, except the samples' reading and writing (I/O in ``io.py``).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from . import imageio
from .errors import MosaicError
from .io import (
    MAX_INSTANCES,
    image_size,
    read_image,
    read_instances,
    read_mask,
    write_image,
    write_instances,
    write_json,
    write_mask,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")

# 4-connectivity: tesserae touching only at a corner are separate tiles.
FOUR_CONNECTED = ndi.generate_binary_structure(2, 1)


# --------------------------------------------------------------------------------------------
# Pure array functions
# --------------------------------------------------------------------------------------------
def instances_to_mask(instances: np.ndarray) -> np.ndarray:
    """Black-on-white mask (tesserae 0, background 255) from an instance map."""
    return np.where(instances > 0, 0, 255).astype(np.uint8)


def mask_foreground(mask: np.ndarray) -> np.ndarray:
    """Boolean tessera mask from a black-on-white mask (dark pixels are tesserae).

    Never computes ``1 - mask`` on uint8 (that wraps around); compares instead.
    """
    if mask.ndim == 3:
        mask = mask[..., :3].mean(axis=2)
    return mask < 128


def label_components(foreground: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask as an int32 label map and the count."""
    labels, n = ndi.label(foreground, structure=FOUR_CONNECTED)
    return labels.astype(np.int32, copy=False), int(n)


def mask_to_instances(mask: np.ndarray) -> np.ndarray:
    """Instance map (one id per 4-connected tessera) from a black-on-white mask."""
    labels, _ = label_components(mask_foreground(mask))
    return labels


def relabel_sequential(instances: np.ndarray) -> np.ndarray:
    """Renumber ids to 1..N in order of first appearance in raster order (0 stays 0).

    Raster-order numbering makes outputs deterministic whatever produced the ids.
    """
    flat = instances.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids != 0
    ids, first = ids[keep], first[keep]
    order = ids[np.argsort(first, kind="stable")]
    lut_size = int(instances.max()) + 1 if instances.size else 1
    lut = np.zeros(lut_size, dtype=np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut[instances]


def split_disconnected(instances: np.ndarray) -> np.ndarray:
    """Give every 4-connected piece of every id its own id (a cropped tile can fall apart)."""
    out = np.zeros(instances.shape, dtype=np.int32)
    next_id = 1
    for idx, sl in enumerate(ndi.find_objects(instances), start=1):
        if sl is None:
            continue
        pieces, n = ndi.label(instances[sl] == idx, structure=FOUR_CONNECTED)
        if n == 0:
            continue
        view = out[sl]
        sel = pieces > 0
        view[sel] = pieces[sel] + (next_id - 1)
        next_id += n
    return relabel_sequential(out)


def tessera_points(instances: np.ndarray) -> list[list[int]]:
    """One prompt point ``[x, y]`` per tessera id 1..N, always inside its tessera.

    The centroid when it falls inside the tile, otherwise the interior pixel farthest from the
    tile's border (concave and chipped tiles are common). ``instances`` must be numbered 1..N.
    """
    n = int(instances.max()) if instances.size else 0
    if n == 0:
        return []
    rows, cols = np.nonzero(instances)
    ids = instances[rows, cols]
    counts = np.bincount(ids, minlength=n + 1).astype(np.float64)
    if np.any(counts[1:] == 0):
        raise ValueError("instance ids must be consecutive 1..N (relabel_sequential first)")
    cy = np.bincount(ids, weights=rows, minlength=n + 1) / np.maximum(counts, 1)
    cx = np.bincount(ids, weights=cols, minlength=n + 1) / np.maximum(counts, 1)
    ry = np.clip(np.rint(cy).astype(np.int64), 0, instances.shape[0] - 1)
    rx = np.clip(np.rint(cx).astype(np.int64), 0, instances.shape[1] - 1)
    inside = instances[ry, rx] == np.arange(n + 1)
    points = np.stack([rx, ry], axis=1)
    outside = np.nonzero(~inside[1:])[0] + 1
    if len(outside):
        slices = ndi.find_objects(instances)
        for idx in outside:
            sl = slices[idx - 1]
            tile = np.pad(instances[sl] == idx, 1)
            dist = ndi.distance_transform_edt(tile)
            r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
            points[idx] = (c - 1 + sl[1].start, r - 1 + sl[0].start)
    return points[1:].tolist()


# --------------------------------------------------------------------------------------------
# Samples and manifest
# --------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One manifest entry."""

    stem: str
    image: str  # path relative to the dataset root, e.g. "images/foo.jpg"
    width: int
    height: int
    tesserae: int
    split: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    # EXIF/TIFF orientation of the image file, applied when it is read (1: stored upright);
    # width, height, masks, instances and points are all in the displayed frame.
    orientation: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "stem": self.stem,
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "orientation": self.orientation,
            "tesserae": self.tesserae,
            "split": self.split,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Sample":
        return cls(
            stem=d["stem"],
            image=d["image"],
            width=int(d["width"]),
            height=int(d["height"]),
            tesserae=int(d["tesserae"]),
            split=d.get("split"),
            source=d.get("source") or {},
            orientation=int(d.get("orientation", 1)),
        )


def write_sample(
    root: str | os.PathLike,
    stem: str,
    image: np.ndarray | str | os.PathLike,
    instances: np.ndarray,
    *,
    image_ext: str = ".png",
    source: dict[str, Any] | None = None,
    split: str | None = None,
    relabel: bool = True,
) -> Sample:
    """Write one sample (image, mask, instances, points) into a dataset folder.

    ``image`` is an array (written as ``images/<stem><image_ext>``) or a path to an existing image
    file, copied byte for byte ("the image as given"). ``instances`` is relabelled 1..N in raster
    order unless ``relabel=False`` (then it must already be 1..N).
    """
    root = Path(root)
    if relabel:
        instances = relabel_sequential(instances)
    orientation = 1
    if isinstance(image, np.ndarray):
        height, width = image.shape[:2]
        rel = f"images/{stem}{image_ext}"
        write_image(root / rel, image)
    else:
        src = Path(image)
        info = imageio.image_info(src)
        width, height, orientation = info.width, info.height, info.orientation
        rel = f"images/{stem}{src.suffix.lower()}"
        (root / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / rel)
    if instances.shape != (height, width):
        raise MosaicError(
            f"{stem}: instance map is {instances.shape[1]}x{instances.shape[0]}, "
            f"image is {width}x{height}"
        )
    write_mask(root / "masks" / f"{stem}.png", instances_to_mask(instances))
    write_instances(root / "instances" / f"{stem}.png", instances)
    points = tessera_points(instances)
    write_json(root / "points" / f"{stem}.json", {"points": points})
    return Sample(
        stem=stem,
        image=rel,
        width=int(width),
        height=int(height),
        tesserae=len(points),
        split=split,
        source=source or {},
        orientation=orientation,
    )


def write_manifest(root: str | os.PathLike, samples: list[Sample], **extra: Any) -> None:
    data = {"version": 1, **extra, "samples": [s.to_json() for s in samples]}
    write_json(Path(root) / MANIFEST, data)


@dataclass
class Dataset:
    """A dataset folder opened for reading."""

    root: Path
    samples: list[Sample]
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Dataset":
        root = Path(root)
        if not root.is_dir():
            raise MosaicError(f"{root}: dataset folder not found")
        manifest = root / MANIFEST
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text())
                samples = [Sample.from_json(s) for s in data["samples"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise MosaicError(f"{manifest}: not a valid manifest ({exc})") from exc
            info = {k: v for k, v in data.items() if k != "samples"}
            return cls(root, samples, info)
        return cls(root, _scan_samples(root), {})

    def __len__(self) -> int:
        return len(self.samples)

    def split(self, name: str | None) -> list[Sample]:
        """Samples of one split; ``None`` means all."""
        if name is None:
            return list(self.samples)
        return [s for s in self.samples if s.split == name]

    def get(self, stem: str) -> Sample:
        for s in self.samples:
            if s.stem == stem:
                return s
        raise MosaicError(f"{self.root}: no sample named {stem!r}")

    def image_path(self, sample: Sample) -> Path:
        return self.root / sample.image

    def image(self, sample: Sample) -> np.ndarray:
        return read_image(self.image_path(sample))

    def mask(self, sample: Sample) -> np.ndarray:
        return read_mask(self.root / "masks" / f"{sample.stem}.png")

    def instances(self, sample: Sample) -> np.ndarray:
        """The instance map; derived from the mask's 4-connected components if absent."""
        path = self.root / "instances" / f"{sample.stem}.png"
        if path.is_file():
            return read_instances(path)
        return mask_to_instances(self.mask(sample))

    def unknown(self, sample: Sample) -> np.ndarray | None:
        """Where nobody annotated (``source["unknown"]``, written by a partial export of a
        tiled mosaic) as a boolean map, or None: training crops and metrics leave it out."""
        name = sample.source.get("unknown") if isinstance(sample.source, dict) else None
        if not name:
            return None
        return read_mask(self.root / name) >= 128

    def points(self, sample: Sample) -> list[list[int]]:
        path = self.root / "points" / f"{sample.stem}.json"
        if path.is_file():
            return json.loads(path.read_text())["points"]
        return tessera_points(relabel_sequential(self.instances(sample)))


def _scan_samples(root: Path) -> list[Sample]:
    """Samples of a folder without manifest: every image in images/ that has a mask."""
    images = root / "images"
    if not images.is_dir():
        raise MosaicError(f"{root}: neither manifest.json nor images/ found")
    samples = []
    for path in sorted(images.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if not (root / "masks" / f"{path.stem}.png").is_file():
            continue
        width, height = image_size(path)
        samples.append(Sample(path.stem, f"images/{path.name}", width, height, tesserae=-1))
    if not samples:
        raise MosaicError(f"{root}: no image in images/ has a mask in masks/")
    return samples
