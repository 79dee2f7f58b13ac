"""Segment every tessera of images with SAM 2 or the classical engine, and write the results.

Output folder (usable directly as ``eval --pred OUT``)::

    OUT/<stem>.png              black-on-white mask (tesserae 0, background 255)
    OUT/instances/<stem>.png    16-bit tessera ids (0 background, 1..N in raster order)
    OUT/overlays/<stem>.jpg     tessera outlines drawn over the image
    OUT/segment.json            engine, model version, parameters, per-image tesserae and seconds

Images are read in their displayed orientation (``imageio``: EXIF orientation applied, as Label
Studio's editor shows them); all outputs are in that frame and segment.json records the
orientation applied per image. Large images are segmented tile by tile at native resolution
(``tiling.segment_tiled``); a TIFF larger than ``imageio.STREAM_PIXELS`` is never decoded whole:
tiles are read from the file as they are segmented and the outputs are written in row bands.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
from tqdm import tqdm

from .classical import ClassicalEngine
from .core import imageio
from .core.dataset import IMAGE_EXTENSIONS
from .core.errors import MosaicError
from .core.io import atomic_output_dir, write_instances, write_mask
from .core.predictions import INSTANCES_DIR, OVERLAYS_DIR, RESULT_FILE, write_result
from .core.scale import estimate_scale
from .core.tiling import MAX_TILE, resolve_tiling, segment_tiled
from .engines import Engine, engine_info

CLASSICAL_TILE = MAX_TILE  # the classical engine adapts to any tile; large tiles waste least
OUTLINE_RGB = (255, 0, 255)  # magenta: rare in stone and glass, visible on light and dark tiles
BAND_ROWS = 1024  # rows of the outputs built at once (bounded memory on very large images)


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------
def segment_image(
    engine: Engine,
    image: np.ndarray | imageio.ImageTiles,
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
    image: np.ndarray | imageio.ImageTiles,
    *,
    tile: int | None = None,
    tessera_size: float | None = None,
    progress: bool = False,
    scores: bool = False,
) -> tuple[np.ndarray, dict]:
    """(instance map, {"tessera_size_px", "tile", "overlap"[, "scale", "warning"]}) of ``image``.

    ``scores`` adds ``"scores"`` where SAM 2's guided method segmented: every tessera's score
    (tessera 1 first), the IoU SAM 2 predicted for its outline (``Sam2Engine.segment_guided``).
    The classical engine and SAM 2's other methods give none.

    When the size is estimated, ``scale`` is the estimate (``ScaleEstimate.to_json``: confidence,
    method, alternatives) and ``warning`` a one-line message when it is uncertain. When the
    tesserae are too coarse to segment (``ScaleEstimate.coarse``: under ~6 px), nothing is
    segmented: the instance map is empty and ``warning`` says what resolution would do.

    The tessera size (median equivalent diameter, px) is ``tessera_size`` when given, else
    estimated once for the whole image (``core.scale.estimate_tessera_size``; on a streamed TIFF,
    ``imageio.ImageTiles``, on a central crop so the image is never read whole). It sets the
    tiles of ``segment_tiled``: for SAM 2 about 100 tesserae per tile (as the model was trained)
    unless ``tile`` is given; the classical engine adapts to any tile and runs on CLASSICAL_TILE
    tiles, which waste the least work on overlaps, and is told the size and the image's own
    statistics (``ClassicalEngine.statistics``: the grout colour, measured on the image or its
    central 2048-px window) so every tile is segmented alike. The
    overlap is about two tessera diameters.
    """
    h, w = image.shape[:2]
    side = 2 * MAX_TILE
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)

    def window() -> np.ndarray:  # the image, or its central window of at most side x side
        if isinstance(image, np.ndarray) and h <= side and w <= side:
            return image
        return np.asarray(image[top:top + side, left:left + side])

    scale = None
    if tessera_size is None:
        scale = estimate_scale(image if isinstance(image, np.ndarray) else window())
        tessera_size = scale.diameter
        if scale.coarse:  # tesserae of a few px: a warning, not figure-sized "tesserae"
            info = {"tessera_size_px": round(float(tessera_size), 2), "tile": None,
                    "overlap": None, "scale": scale.to_json(), "warning": scale.warning()}
            return np.zeros((h, w), np.int32), info
    elif not tessera_size > 0:
        raise MosaicError(f"tessera size must be positive, got {tessera_size}")
    if isinstance(engine, ClassicalEngine):
        tile = tile or CLASSICAL_TILE
        # The grout colour measured once for the image (its central window when large) and
        # shared by every tile, like the tessera size.
        statistics = engine.statistics(window(), tessera_size) if max(h, w) > tile else None
        segment_fn = functools.partial(engine.segment, tessera_size=tessera_size,
                                       statistics=statistics)
    elif engine.params.method == "guided":  # SAM 2 outlines the classical engine's proposals
        classical = ClassicalEngine()
        statistics = classical.statistics(window(), tessera_size) if max(h, w) > CLASSICAL_TILE else None
        proposals = segment_tiled(image, functools.partial(classical.segment, tessera_size=tessera_size,
                                                           statistics=statistics), tile=CLASSICAL_TILE,
                                  overlap=resolve_tiling(image, CLASSICAL_TILE, None, tessera_size)[1])
        tile, overlap = resolve_tiling(image, tile, None, tessera_size)
        instances = engine.segment_guided(np.asarray(image), tessera_size=tessera_size, proposals=proposals,
                                          tile=tile, overlap=overlap, with_scores=scores)
        info = {"tessera_size_px": round(float(tessera_size), 2), "tile": tile, "overlap": overlap}
        if scores:
            instances, info["scores"] = instances
        return instances, _with_scale(info, scale)
    else:  # SAM 2's fast and stock paths: the tessera size sets their speck floor
        segment_fn = functools.partial(engine.segment, tessera_size=tessera_size)
    tile, overlap = resolve_tiling(image, tile, None, tessera_size)
    instances = segment_tiled(image, segment_fn, tile=tile, overlap=overlap, progress=progress)
    info = {"tessera_size_px": round(float(tessera_size), 2), "tile": tile, "overlap": overlap}
    return instances, _with_scale(info, scale)


def _with_scale(info: dict, scale) -> dict:
    """``info`` with the estimate (``ScaleEstimate.to_json``) and its warning, when estimated."""
    if scale is not None:
        info["scale"] = scale.to_json()
        if scale.warning():
            info["warning"] = scale.warning()
    return info


def outline_width(shape: tuple[int, ...]) -> int:
    """Outline thickness (px) for an image of ``shape``: visible when viewed scaled down."""
    return max(1, round(max(shape[:2]) / 2000))


def overlay(image: np.ndarray, instances: np.ndarray, width: int | None = None) -> np.ndarray:
    """RGB copy of ``image`` with every tessera's outline drawn in OUTLINE_RGB.

    The outline is the tessera's inner border (pixels with a 4-neighbour of another id),
    thickened on large images (``outline_width``) so it stays visible when viewed scaled down.
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
    width = outline_width(instances.shape) if width is None else width
    if width > 1:
        grown = cv2.dilate(edge.view(np.uint8), np.ones((width, width), np.uint8))
        edge = grown.view(bool) & (instances > 0)
    out[edge] = OUTLINE_RGB
    return out


def write_outputs(folder: Path, stem: str, image: np.ndarray | imageio.ImageTiles,
                  instances: np.ndarray) -> None:
    """The mask, instance map and overlay of one image, built in bands of BAND_ROWS rows so that
    no full-size temporary beyond the outputs themselves is needed (same pixels as
    ``instances_to_mask`` and ``overlay`` on the whole image)."""
    height = instances.shape[0]
    mask = np.empty(instances.shape, np.uint8)
    for y in range(0, height, BAND_ROWS):
        band = instances[y:y + BAND_ROWS]
        mask[y:y + BAND_ROWS] = np.where(band > 0, 0, 255)
    write_mask(folder / f"{stem}.png", mask)
    del mask
    write_instances(folder / INSTANCES_DIR / f"{stem}.png", instances)
    width = outline_width(instances.shape)
    halo = width + 2
    bgr = np.empty((*instances.shape, 3), np.uint8)  # OpenCV's order: encoded without a copy
    for y in range(0, height, BAND_ROWS):
        y0, y1 = max(0, y - halo), min(height, y + BAND_ROWS + halo)
        band = overlay(np.asarray(image[y0:y1]), instances[y0:y1], width)
        bgr[y:y + BAND_ROWS] = band[y - y0:y - y0 + min(BAND_ROWS, height - y), :, ::-1]
    path = folder / OVERLAYS_DIR / f"{stem}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise MosaicError(f"{path}: cannot write overlay")


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
    records of segment.json (stem, image, width, height, orientation, tesserae, seconds,
    tessera_size_px, tile, overlap, and when estimated the scale with its confidence and any
    warning). ``tessera_size`` (px) overrides the per-image estimate.
    """
    paths = collect_images(inputs)
    # header check: a non-image fails now, not after hours of work
    infos = {path: imageio.image_info(path) for path in paths}
    records = []
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        bar = tqdm(paths, desc="segment", unit="image", disable=None if progress else True)
        for path in bar:
            bar.set_postfix_str(path.name)
            image = imageio.open_image(path)
            try:
                start = time.perf_counter()
                instances, info = segment_image_info(engine, image, tile=tile,
                                                     tessera_size=tessera_size, progress=progress)
                seconds = time.perf_counter() - start
                write_outputs(tmp, path.stem, image, instances)
            finally:
                if isinstance(image, imageio.ImageTiles):
                    image.close()
            records.append({
                "stem": path.stem, "image": str(path), "width": int(instances.shape[1]),
                "height": int(instances.shape[0]), "orientation": infos[path].orientation,
                "tesserae": int(instances.max(initial=0)), "seconds": round(seconds, 3), **info,
            })
            del image, instances
        write_result(tmp, {
            "version": 1, **engine_info(engine), "tile": tile or "auto",
            "tessera_size": tessera_size or "auto", "images": records,
        })
    return records
