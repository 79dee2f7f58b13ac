"""The one training configuration: TrainConfig, its defaults and its ranges (torch-free)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import MosaicError
from ..sam.params import GeneratorParams


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

    def __post_init__(self) -> None:
        checks = (
            ("epochs", self.epochs >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("lr", self.lr > 0, "positive"),
            ("min_lr", self.min_lr is None or 0 <= self.min_lr <= self.lr, "between 0 and lr"),
            ("weight_decay", self.weight_decay >= 0, "non-negative"),
            ("score_weight", self.score_weight >= 0, "non-negative"),
            ("max_prompts", self.max_prompts >= 0, "non-negative (0 = all)"),
            ("seed", self.seed >= 0, "non-negative"),
            ("val_every", self.val_every >= 1, "at least 1"),
        )
        for name, ok, what in checks:
            if not ok:
                raise MosaicError(f"train: {name} must be {what}, got {getattr(self, name)!r}")
        GeneratorParams.from_dict(self.val_params)  # unknown or invalid keys are errors here

    @property
    def final_lr(self) -> float:
        return self.lr / 100 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
