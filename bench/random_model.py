"""The random-weight SAM 2 models every bench script uses (no weights can be downloaded here).

Random weights make masks meaningless but every timing real. ``random_checkpoint`` writes the
official checkpoint format (``{"model": state_dict}``) so the whole loading path runs;
``random_engine`` builds the engine in memory; ``open_filters`` opens the generator's quality
filters so a random model yields masks and both full-image paths do their full work.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mosaic_toolkit.sam.engine import Sam2Engine
from mosaic_toolkit.sam.fast import tessera_prompts, tile_interior
from mosaic_toolkit.sam.models import build_sam2_model
from mosaic_toolkit.sam.params import GeneratorParams
from mosaic_toolkit.sam.weights import MODELS

RANDOM_MODEL = "sam2.1-tiny"


def random_checkpoint(folder: Path, arch: str = RANDOM_MODEL, seed: int = 0, image_size: int | None = None) -> Path:
    """A randomly initialised checkpoint of ``arch`` in the official format, in ``folder``."""
    torch.manual_seed(seed)
    model = build_sam2_model(MODELS[arch].config, None, "cpu", image_size=image_size)
    path = Path(folder) / MODELS[arch].filename
    torch.save({"model": model.state_dict()}, path)
    return path


def random_engine(arch: str = RANDOM_MODEL, image_size: int | None = None, seed: int = 0,
                  device: str | None = None, **engine_kw) -> Sam2Engine:
    """A ``Sam2Engine`` on a randomly initialised ``arch`` (built in memory)."""
    torch.manual_seed(seed)
    net = build_sam2_model(MODELS[arch].config, None, device, image_size=image_size)
    return Sam2Engine(net, version=f"{arch} (random weights)", **engine_kw)


def open_filters(engine: Sam2Engine, image: np.ndarray, base: GeneratorParams) -> GeneratorParams:
    """Quality filters off and the mask threshold at the median logit, so random masks pass."""
    points, _ = tessera_prompts(tile_interior(image), 32, 8)
    logits, _ = engine.decode_points(image, points)
    return base.replace(
        pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.05,
        mask_threshold=float(logits.median()),
    )
