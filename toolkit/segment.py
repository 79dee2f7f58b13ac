"""Segment every tessera of images with SAM 2 or the classical engine, and write the results.

Output folder (usable directly as ``eval --pred OUT``)::

    OUT/<stem>.png              black-on-white mask (tesserae 0, background 255)
    OUT/instances/<stem>.png    16-bit tessera ids (0 background, 1..N in raster order)
    OUT/overlays/<stem>.jpg     tessera outlines drawn over the image
    OUT/segment.json            engine, model version, parameters, per-image tesserae and seconds

Large images are segmented tile by tile at native resolution (``tiling.segment_tiled``).
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Union

import cv2
import numpy as np
from tqdm import tqdm

from . import weights
from .classical import ClassicalEngine
from .dataset import (
    IMAGE_EXTENSIONS,
    atomic_output_dir,
    image_size,
    instances_to_mask,
    read_image,
    write_image,
    write_instances,
    write_json,
    write_mask,
)
from .errors import MosaicError
from .scale import estimate_tessera_size
from .tiling import MAX_TILE, resolve_tiling, segment_tiled

if TYPE_CHECKING:
    from .engine import Sam2Engine

Engine = Union[ClassicalEngine, "Sam2Engine"]

ENGINES = ("auto", "sam2", "classical")
FETCH_COMMAND = "mosaic-toolkit weights fetch sam2.1-large"
FETCH_HINT = f"run `{FETCH_COMMAND}` or use --engine classical"
CLASSICAL_TILE = MAX_TILE  # the classical engine adapts to any tile; large tiles waste least
OUTLINE_RGB = (255, 0, 255)  # magenta: rare in stone and glass, visible on light and dark tiles
RESULT_FILE = "segment.json"


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------
def load_engine(
    engine: str | None,
    model: str | None,
    device: str | None,
    method: str | None = None,
) -> Engine:
    """The engine to segment with.

    ``engine`` None or "auto": SAM 2 when a model is given or one is installed
    (``weights.default_model()``), otherwise the classical engine, so segmentation always works.
    ``model`` is a model name, a checkpoint or a fine-tune file (SAM 2 only); ``method``
    ("fast" or "stock") overrides the model's generator method.
    """
    if engine in (None, "auto"):
        engine = "sam2" if model or weights.default_model() else "classical"
    if engine == "classical":
        if model:
            raise MosaicError(f"{model}: a model only applies to --engine sam2, not classical")
        return ClassicalEngine()
    if engine != "sam2":
        raise MosaicError(f"engine {engine!r}: unknown (choose from {', '.join(ENGINES)})")
    name = model or weights.default_model()
    if name is None:
        raise MosaicError(f"SAM 2 engine: no SAM 2 weights are installed; {FETCH_HINT}")
    from .engine import Sam2Engine  # imports torch: only when SAM 2 is used

    # No embedding cache: batch segmentation never sees a tile twice.
    sam = Sam2Engine.from_spec(name, device=device, cache_bytes=0)
    if method is not None:
        sam.params = sam.params.replace(method=method)
    return sam


def engine_info(engine: Engine) -> dict:
    """What produced a segmentation: engine, model, model version and parameters (JSON-ready)."""
    if isinstance(engine, ClassicalEngine):
        return {"engine": engine.name, "model": None, "model_version": engine.name,
                "device": "cpu", "params": engine.params.to_dict()}
    spec = engine.spec
    model = None
    if spec is not None:
        model = str(spec.finetune) if spec.finetune else (spec.base_name or str(spec.base_checkpoint))
    return {"engine": engine.name, "model": model, "model_version": engine.model_version,
            "device": str(engine.device), "params": engine.params.to_dict()}


def describe_engine(engine: Engine) -> str:
    """One line saying which engine and model segment, for the user."""
    info = engine_info(engine)
    if info["engine"] == "classical":
        return "Engine: classical (colour watershed, no model weights)"
    return (f"Engine: SAM 2, model {info['model_version']} on {info['device']}, "
            f"method {info['params']['method']}")


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------
def segment_image(
    engine: Engine,
    image: np.ndarray,
    *,
    tile: int | None = None,
    tessera_size: float | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Instance map (int32, ids 1..N in raster order) of every tessera in ``image``.

    See ``segment_image_info``, which also says which scale and tiles were used.
    """
    return segment_image_info(engine, image, tile=tile, tessera_size=tessera_size,
                              progress=progress)[0]


def segment_image_info(
    engine: Engine,
    image: np.ndarray,
    *,
    tile: int | None = None,
    tessera_size: float | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, dict]:
    """(instance map, {"tessera_size_px", "tile", "overlap"}) of ``image``.

    The tessera size (median equivalent diameter, px) is ``tessera_size`` when given, else
    estimated once for the whole image (``scale.estimate_tessera_size``). It sets the tiles of
    ``segment_tiled``: for SAM 2 about 100 tesserae per tile (as the model was trained) unless
    ``tile`` is given; the classical engine adapts to any tile and runs on CLASSICAL_TILE tiles,
    which waste the least work on overlaps, and is told the size so every tile is segmented at
    the same scale. The overlap is about two tessera diameters.
    """
    if tessera_size is None:
        tessera_size = estimate_tessera_size(image)
    elif not tessera_size > 0:
        raise MosaicError(f"tessera size must be positive, got {tessera_size}")
    if isinstance(engine, ClassicalEngine):
        tile = tile or CLASSICAL_TILE
        segment_fn = functools.partial(engine.segment, tessera_size=tessera_size)
    else:
        segment_fn = engine.segment
    tile, overlap = resolve_tiling(image, tile, None, tessera_size)
    instances = segment_tiled(image, segment_fn, tile=tile, overlap=overlap, progress=progress)
    info = {"tessera_size_px": round(float(tessera_size), 2), "tile": tile, "overlap": overlap}
    return instances, info


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
    tessera_size: float | None = None,
    progress: bool = True,
) -> list[dict]:
    """Segment the images named by ``inputs`` into the folder ``out`` (module docstring).

    Every input is checked to be a readable image before any work starts; any failure leaves no
    output (the folder is built aside and moved into place at the end). Returns the per-image
    records of segment.json (stem, image, width, height, tesserae, seconds, tessera_size_px,
    tile, overlap). ``tessera_size`` (px) overrides the per-image estimate of the scale.
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
            instances, info = segment_image_info(engine, image, tile=tile,
                                                 tessera_size=tessera_size, progress=progress)
            seconds = time.perf_counter() - start
            stem = path.stem
            write_mask(tmp / f"{stem}.png", instances_to_mask(instances))
            write_instances(tmp / "instances" / f"{stem}.png", instances)
            write_image(tmp / "overlays" / f"{stem}.jpg", overlay(image, instances), quality=90)
            records.append({
                "stem": stem, "image": str(path), "width": int(image.shape[1]),
                "height": int(image.shape[0]), "tesserae": int(instances.max(initial=0)),
                "seconds": round(seconds, 3), **info,
            })
        write_json(tmp / RESULT_FILE, {
            "version": 1, **engine_info(engine), "tile": tile or "auto",
            "tessera_size": tessera_size or "auto", "images": records,
        })
    return records
