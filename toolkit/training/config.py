"""The one training configuration: TrainConfig, its defaults and its ranges (torch-free)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import MosaicError
from ..sam.params import OUTPUT_SINGLE, TRAINED_OUTPUTS, GeneratorParams, check_output


@dataclass(frozen=True)
class Limit:
    """The lowest allowed value of a hyper-parameter (``low_open``: the bound itself excluded)."""

    low: float
    low_open: bool
    what: str  # the rule in words, for error messages


#: Ranges of the numeric hyper-parameters (checked by TrainConfig, used by the CLI and the
#: backend's settings). ``min_lr`` is checked against ``lr`` separately.
LIMITS: dict[str, Limit] = {
    "epochs": Limit(1, False, "at least 1"),
    "batch_size": Limit(1, False, "at least 1"),
    "lr": Limit(0, True, "positive"),
    "weight_decay": Limit(0, False, "non-negative"),
    "score_weight": Limit(0, False, "non-negative"),
    "max_prompts": Limit(0, False, "non-negative (0 = all)"),
    "seed": Limit(0, False, "non-negative"),
    "val_every": Limit(1, False, "at least 1"),
}


def within(name: str, value: float) -> bool:
    """Whether ``value`` is allowed for the hyper-parameter ``name`` (see LIMITS)."""
    limit = LIMITS[name]
    return value > limit.low if limit.low_open else value >= limit.low


DICE_MODES = ("prompt", "image")


@dataclass(frozen=True)
class TrainConfig:
    """The hyper-parameters of a run (recorded in last.pt and the fine-tune's metadata).

    A resumed run must use the same values: they fix the data order, the prompts drawn and
    the learning-rate schedule.
    """

    epochs: int = 10
    batch_size: int = 4  # images per process and optimizer step
    lr: float = 1e-5
    min_lr: float | None = None  # end of the cosine schedule; None = lr / 100
    weight_decay: float = 1e-4
    score_weight: float = 0.2  # λ of the predicted-IoU term
    max_prompts: int = 64  # prompts per image and step; 0 = every tessera
    seed: int = 0
    image_size: int | None = None  # model input resolution override (tests, benchmarks)
    val_every: int = 1
    val_params: dict[str, Any] = field(default_factory=dict)  # GeneratorParams overrides
    #: The mask-decoder output trained, recorded in the fine-tune file and the only one served
    #: (``sam.adapter``, "Decoder outputs"): "single" (token 0) or "multimask-first" (token 1).
    output: str = OUTPUT_SINGLE
    #: "prompt": one Dice loss per prompt, averaged over an image's prompts; "image": one Dice
    #: over all prompts of an image (their overlaps and areas summed first: the thesis's).
    dice: str = "prompt"

    def __post_init__(self) -> None:
        for name in LIMITS:
            if name == "weight_decay":  # min_lr is checked in the order of the fields
                self._check("min_lr", self.min_lr is None or 0 <= self.min_lr <= self.lr, "between 0 and lr")
            self._check(name, within(name, getattr(self, name)), LIMITS[name].what)
        GeneratorParams.from_dict(self.val_params)  # unknown or invalid keys are errors here
        check_output(self.output, "train: output", TRAINED_OUTPUTS)
        if self.dice not in DICE_MODES:
            raise MosaicError(f"train: dice must be one of {', '.join(DICE_MODES)}, got {self.dice!r}")

    def _check(self, name: str, ok: bool, what: str) -> None:
        if not ok:
            raise MosaicError(f"train: {name} must be {what}, got {getattr(self, name)!r}")

    @property
    def final_lr(self) -> float:
        return self.lr / 100 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The defaults, one place: ``train()``, ``mosaic-toolkit train`` and the backend read them here.
DEFAULTS = TrainConfig()
