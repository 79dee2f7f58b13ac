"""Parameters of full-image segmentation (torch-free: the CLI, models and the backend read them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ..core.errors import MosaicError

METHODS = ("guided", "fast", "stock")

#: Which output of SAM 2's mask decoder a model is served (and was trained) with; see
#: ``sam.adapter.select_output``. "sam2": SAM 2's own choice, for a decoder nobody trained
#: (three candidates for a single click, the stability fallback for one mask); "single":
#: token 0 only; "multimask-first": token 1 only (the thesis's ``multimask_output=True``,
#: ``prd_masks[:, 0]``).
OUTPUT_SAM2, OUTPUT_SINGLE, OUTPUT_MULTIMASK_FIRST = "sam2", "single", "multimask-first"
OUTPUTS = (OUTPUT_SAM2, OUTPUT_SINGLE, OUTPUT_MULTIMASK_FIRST)
#: The outputs training can train (one decoder output each); the default is ours, token 0.
TRAINED_OUTPUTS = (OUTPUT_SINGLE, OUTPUT_MULTIMASK_FIRST)


def check_output(output: str, what: str = "output", choices: tuple[str, ...] = OUTPUTS) -> str:
    """``output`` when it is one of ``choices``, else a MosaicError naming ``what``."""
    if output not in choices:
        raise MosaicError(f"{what}: unknown decoder output {output!r} (choose from {', '.join(choices)})")
    return output


@dataclass
class GeneratorParams:
    """Parameters of full-image segmentation.

    Defaults were chosen on the official SAM 2 hiera-tiny (a base model) on a real photograph
    (``bench/bench_real.py``): the guided method (SAM 2 outlines the classical engine's
    proposals, ``sam.guided``), masks cut at logit 0 (SAM 2's own threshold; 0.2 and -0.2 gave the
    same tile F) and no erosion (eroding by 1 px cost 0.09 of recall on 37-px tesserae: guided
    masks never overlap, so nothing needs separating). ``pred_iou_thresh``, the stability
    thresholds (fast and stock only) and the grid and crop settings are the thesis's (its Optuna
    study of a fine-tuned large model); a tuned fine-tune file carries its own.
    """

    pred_iou_thresh: float = 0.735  # keep masks whose predicted IoU is above this
    stability_score_thresh: float = 0.864  # keep masks at least this stable
    stability_score_offset: float = 0.909  # logit offset used by the stability score
    mask_threshold: float = 0.0  # logit threshold binarising the masks
    points_per_side: int = 32  # stock: prompt grid side; fast: cap of points_per_side² prompts
    points_per_batch: int = 16  # prompts decoded at once (64: as fast on a CPU, 1.1 GB more at peak)
    crop_n_layers: int = 2  # stock only: extra layers of image crops
    crop_overlap_ratio: float = 0.3  # stock only: overlap of the crops
    crop_n_points_downscale_factor: int = 2  # stock only: grid thinning per crop layer
    box_nms_thresh: float = 0.7  # box IoU above which a lower-scored duplicate is dropped
    opening: int = 1  # radius (px) of the per-tessera morphological opening; 0 = none
    min_area: int = 64  # tesserae smaller than this (px) are dropped
    erosion: int = 0  # radius (px) of the per-tessera erosion; 0 = none
    method: str = "guided"  # "guided", "fast" or "stock"
    guided_max_area: float = 2.5  # guided: a candidate over this many proposal areas is not a tessera

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = {"float": float, "int": int, "str": str}[str(f.type)]
            if kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise MosaicError(f"generator parameter {f.name}: expected {kind.__name__}, got {value!r}")
            setattr(self, f.name, kind(value))
        if self.method not in METHODS:
            raise MosaicError(f"generator parameter method: {self.method!r} is not one of {METHODS}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "crop_overlap_ratio", "box_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise MosaicError(f"generator parameter {name}: must lie in [0, 1]")
        for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
            if getattr(self, name) < 1:
                raise MosaicError(f"generator parameter {name}: must be at least 1")
        if not self.guided_max_area > 0:
            raise MosaicError("generator parameter guided_max_area: must be positive")
        for name in ("crop_n_layers", "opening", "min_area", "erosion"):
            if getattr(self, name) < 0:
                raise MosaicError(f"generator parameter {name}: must not be negative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "GeneratorParams":
        """Parameters from a (partial) dict; missing keys keep their defaults."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MosaicError(
                f"generator parameters: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> "GeneratorParams":
        return self.from_dict({**self.to_dict(), **changes})
