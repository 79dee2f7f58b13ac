"""Image and file I/O: reading images (through ``imageio``, the one image reader), masks, instance maps, JSON, and
atomic writes (a temporary sibling renamed into place, so an output is complete or absent).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
from PIL import Image

from . import imageio
from .errors import MosaicError

MAX_INSTANCES = 65535


# --------------------------------------------------------------------------------------------
# Image and file I/O
# --------------------------------------------------------------------------------------------
def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 pixels in the displayed frame (EXIF orientation applied); ``imageio.read_image``."""
    return imageio.read_image(path)


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """RGB uint8 pixels of an opened PIL image, displayed frame; ``imageio.pil_to_rgb``."""
    return imageio.pil_to_rgb(im)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as displayed, without decoding the pixels; ``imageio.image_size``."""
    return imageio.image_size(path)


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
