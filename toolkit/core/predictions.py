"""The segment-output folder (``mosaic-toolkit segment OUT``), written and read here.

    OUT/<stem>.png              black-on-white mask (tesserae 0, background 255)
    OUT/instances/<stem>.png    16-bit tessera ids (0 background, 1..N in raster order)
    OUT/overlays/<stem>.jpg     tessera outlines drawn over the image
    OUT/segment.json            engine, model version, parameters, per-image records

``eval --pred`` and ``stats`` read it (``instances/`` when present, else the masks); the same
``instances/`` name is the dataset contract's, so a dataset folder reads the same way.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .dataset import instances_to_mask
from .errors import MosaicError
from .io import write_image, write_instances, write_json, write_mask

INSTANCES_DIR = "instances"
OVERLAYS_DIR = "overlays"
RESULT_FILE = "segment.json"
OVERLAY_QUALITY = 90


def instances_path(folder: str | os.PathLike, stem: str) -> Path:
    return Path(folder) / INSTANCES_DIR / f"{stem}.png"


def write_prediction(folder: str | os.PathLike, stem: str, instances: np.ndarray, overlay: np.ndarray) -> None:
    """One image's mask, instance map and overlay in ``folder`` (a folder being built aside)."""
    folder = Path(folder)
    write_mask(folder / f"{stem}.png", instances_to_mask(instances))
    write_instances(instances_path(folder, stem), instances)
    write_image(folder / OVERLAYS_DIR / f"{stem}.jpg", overlay, quality=OVERLAY_QUALITY)


def write_result(folder: str | os.PathLike, result: dict[str, Any]) -> None:
    write_json(Path(folder) / RESULT_FILE, result)


def read_result(folder: str | os.PathLike) -> dict[str, Any] | None:
    """segment.json of a segment-output folder; None when the folder has none."""
    path = Path(folder) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MosaicError(f"{path}: not a readable segment result ({exc})") from exc


def check_out_is_separate(out: Path, inputs: Sequence[Path], what: str = "input") -> None:
    """Refuse an output folder that is, or contains, an input (--overwrite would delete it)."""
    out_resolved = Path(out).resolve()
    for folder in inputs:
        resolved = Path(folder).resolve()
        if resolved == out_resolved or out_resolved in resolved.parents:
            raise MosaicError(f"{out}: the report folder must not be or contain the {what} {folder}")
