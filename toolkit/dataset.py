"""The dataset contract every command reads and writes.

```
DATASET/
  images/<stem>.<ext>       the image as given
  masks/<stem>.png          8-bit, same size: tesserae 0 (black), background 255 (white)
  instances/<stem>.png      16-bit, 0 = background, 1..N one id per tessera
  points/<stem>.json        {"points": [[x, y], ...]} pixel coordinates, one per tessera, in id order
  manifest.json             per sample: stem, source, size, tesserae, split
```

Points are integer pixel indices ``[column, row]`` that always lie inside their tessera: the
centroid when the (rounded) centroid is inside, otherwise the interior pixel farthest from the
tessera's border (distance-transform maximum).

Everything here is a pure function of arrays, except the small read/write helpers at the end.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from .errors import MosaicError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
MAX_INSTANCES = 65535

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
# Image and file I/O
# --------------------------------------------------------------------------------------------
def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 array; a clear MosaicError naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise MosaicError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return pil_to_rgb(im)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MosaicError(f"{path}: cannot read image ({exc})") from exc


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """RGB uint8 pixels of an opened PIL image (16-bit and float greys are scaled to 0..255)."""
    im.load()
    if im.mode in ("I;16", "I;16B", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = arr.max() if arr.size and arr.max() > 0 else 1.0
        arr = (arr / peak * 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as exc:
        raise MosaicError(f"{path}: cannot read image ({exc})") from exc


def write_image(path: str | os.PathLike, image: np.ndarray, quality: int = 95) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.ascontiguousarray(image))
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.convert("RGB").save(path, quality=quality)
    elif path.suffix.lower() == ".png":
        im.save(path, compress_level=1)  # lossless either way; level 1 is several times faster
    else:
        im.save(path)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """An 8-bit black-on-white mask (any PNG: grey, RGB or 16-bit is reduced to 8-bit grey)."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise MosaicError(f"{path}: cannot read mask")
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2GRAY)
    if arr.dtype != np.uint8:
        arr = (arr.astype(np.float64) / max(float(arr.max()), 1.0) * 255).astype(np.uint8)
    return arr


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), mask.astype(np.uint8)):
        raise MosaicError(f"{path}: cannot write mask")


def read_instances(path: str | os.PathLike) -> np.ndarray:
    """A 16-bit instance map as int32 (0 = background)."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise MosaicError(f"{path}: cannot read instance map")
    if arr.ndim == 3:
        raise MosaicError(f"{path}: instance map must be single-channel (16-bit PNG)")
    return arr.astype(np.int32)


def write_instances(path: str | os.PathLike, instances: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if instances.size and int(instances.max()) > MAX_INSTANCES:
        raise MosaicError(f"{path}: {int(instances.max())} tesserae exceed the 16-bit limit")
    if not cv2.imwrite(str(path), instances.astype(np.uint16)):
        raise MosaicError(f"{path}: cannot write instance map")


def write_json(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes it 0600; outputs are shared files
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build an output folder in a hidden temporary sibling and move it into place at the end.

    A failure (or Ctrl-C) leaves no partial output. An existing non-empty ``out`` is an error
    unless ``overwrite``, in which case it is replaced only once the new one is complete.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MosaicError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MosaicError(f"{out}: folder exists and is not empty (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; datasets are read by other users/services
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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

    def to_json(self) -> dict[str, Any]:
        return {
            "stem": self.stem,
            "image": self.image,
            "width": self.width,
            "height": self.height,
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
    if isinstance(image, np.ndarray):
        height, width = image.shape[:2]
        rel = f"images/{stem}{image_ext}"
        write_image(root / rel, image)
    else:
        src = Path(image)
        width, height = image_size(src)
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
