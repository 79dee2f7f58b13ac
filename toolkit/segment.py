"""Segment every tessera of images with SAM 2 or the classical engine, and write the results.

Output folder (usable directly as ``eval --pred OUT``)::

    OUT/<stem>.png              black-on-white mask (tesserae 0, background 255)
    OUT/instances/<stem>.png    16-bit tessera ids (0 background, 1..N in raster order)
    OUT/overlays/<stem>.jpg     tessera outlines drawn over the image
    OUT/segment.json            engine, model version, parameters, per-image tesserae and seconds

Large images are segmented tile by tile at native resolution (``tiling.segment_tiled``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
from tqdm import tqdm

from .classical import ClassicalEngine
from .core.dataset import IMAGE_EXTENSIONS
from .core.io import atomic_output_dir, image_size, read_image
from .core.errors import MosaicError
from .core.tiling import MAX_TILE, segment_tiled
from .core.predictions import write_prediction, write_result
from .engines import Engine, engine_info

CLASSICAL_TILE = MAX_TILE  # the classical engine adapts to any tile; large tiles waste least
OUTLINE_RGB = (255, 0, 255)  # magenta: rare in stone and glass, visible on light and dark tiles


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------
def segment_image(
    engine: Engine, image: np.ndarray, *, tile: int | None = None, progress: bool = False
) -> np.ndarray:
    """Instance map (int32, ids 1..N in raster order) of every tessera in ``image``.

    Goes through ``segment_tiled``. ``tile`` None picks the tile side: for SAM 2 from the
    estimated tessera size (about 100 tesserae per tile, as the model was trained); the classical
    engine adapts to any tessera size and runs on CLASSICAL_TILE tiles, which waste the least
    work on overlaps.
    """
    if isinstance(engine, ClassicalEngine):
        return segment_tiled(image, engine.segment, tile=tile or CLASSICAL_TILE, progress=progress)
    return segment_tiled(image, engine.segment, tile=tile, progress=progress)


def overlay(image: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """RGB copy of ``image`` with every tessera's outline drawn in OUTLINE_RGB.

    The outline is the tessera's inner border (pixels with a 4-neighbour of another id),
    thickened on large images so it stays visible when the picture is viewed scaled down.
    """
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    out = np.ascontiguousarray(image[..., :3]).copy()
    edge = np.zeros(instances.shape, dtype=bool)
    dh = instances[:, 1:] != instances[:, :-1]
    dv = instances[1:] != instances[:-1]
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    edge[1:] |= dv
    edge[:-1] |= dv
    edge &= instances > 0
    width = max(1, round(max(instances.shape) / 2000))
    if width > 1:
        grown = cv2.dilate(edge.view(np.uint8), np.ones((width, width), np.uint8))
        edge = grown.view(bool) & (instances > 0)
    out[edge] = OUTLINE_RGB
    return out


# --------------------------------------------------------------------------------------------
# Many images
# --------------------------------------------------------------------------------------------
def collect_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders' images (a dataset folder: its
    images/ subfolder), in order. Duplicate stems are an error (their outputs would collide)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            folder = path / "images" if (path / "images").is_dir() else path
            images = sorted(
                p for p in folder.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            if not images:
                raise MosaicError(f"{folder}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
            found.extend(images)
        else:
            raise MosaicError(f"{path}: no such file or folder")
    if not found:
        raise MosaicError("segment: no input images given")
    unique: list[Path] = []
    by_stem: dict[str, Path] = {}
    for path in found:
        other = by_stem.get(path.stem)
        if other is not None and other.resolve() == path.resolve():
            continue  # the same file named twice
        if other is not None:
            raise MosaicError(
                f"{other} and {path}: both have the stem {path.stem!r} (outputs are named by stem)"
            )
        by_stem[path.stem] = path
        unique.append(path)
    return unique


def segment_paths(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    engine: Engine,
    *,
    overwrite: bool = False,
    tile: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Segment the images named by ``inputs`` into the folder ``out`` (module docstring).

    Every input is checked to be a readable image before any work starts; any failure leaves no
    output (the folder is built aside and moved into place at the end). Returns the per-image
    records of segment.json (stem, image, width, height, tesserae, seconds).
    """
    paths = collect_images(inputs)
    for path in paths:
        image_size(path)  # header check: a non-image fails now, not after hours of work
    records = []
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        bar = tqdm(paths, desc="segment", unit="image", disable=None if progress else True)
        for path in bar:
            bar.set_postfix_str(path.name)
            image = read_image(path)
            start = time.perf_counter()
            instances = segment_image(engine, image, tile=tile, progress=progress)
            seconds = time.perf_counter() - start
            stem = path.stem
            write_prediction(tmp, stem, instances, overlay(image, instances))
            records.append({
                "stem": stem, "image": str(path), "width": int(image.shape[1]),
                "height": int(image.shape[0]), "tesserae": int(instances.max(initial=0)),
                "seconds": round(seconds, 3),
            })
        write_result(tmp, {
            "version": 1, **engine_info(engine), "tile": tile or "auto", "images": records,
        })
    return records
