"""The engines behind one interface, and the one place that opens them.

An engine (``Sam2Engine`` or ``ClassicalEngine``) has a ``name``, its ``params`` and a
``segment(image)`` giving an instance map; a SAM 2 engine also answers clicks
(``predict_points``) and carries a ``model_version``. :func:`open_engine` chooses and builds one
for ``segment``, ``eval --models``, ``tune`` and the backend: parameters are given when the
engine is opened (``overrides``), never patched onto a built engine.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Union

import numpy as np

from .classical import ClassicalEngine
from .core.errors import MosaicError
from .sam import weights

if TYPE_CHECKING:
    from .sam.engine import Sam2Engine

ENGINES = ("auto", "sam2", "classical")
FETCH_COMMAND = "mosaic-toolkit weights fetch sam2.1-large"
FETCH_HINT = f"run `{FETCH_COMMAND}` or use --engine classical"
CLASSICAL_VERSION = "classical"

Engine = Union[ClassicalEngine, "Sam2Engine"]


class EngineProtocol(Protocol):
    """What every engine offers (SAM 2 adds clicks and a model)."""

    name: str
    params: Any

    def segment(self, image: np.ndarray) -> np.ndarray: ...


def resolve_kind(kind: str | None, model: str | Path | None) -> str:
    """"auto" (or None) -> "sam2" when a model is given or one is installed, else "classical"."""
    if kind in (None, "auto"):
        return "sam2" if model or weights.default_model() else "classical"
    if kind not in ENGINES:
        raise MosaicError(f"engine {kind!r}: unknown (choose from {', '.join(ENGINES)})")
    return kind


def open_engine(
    kind: str | None,
    model: str | Path | None = None,
    device: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    cache_bytes: int | None = None,
    image_size: int | None = None,
    base: str | Path | None = None,
    version: str | None = None,
    output: str | None = None,
) -> Engine:
    """The engine to segment with, its parameters final.

    ``kind`` "auto"/None, "sam2" or "classical" (see :func:`resolve_kind`); ``model`` a model
    name, checkpoint or fine-tune file (SAM 2 only; default: the best installed model);
    ``overrides`` SAM 2 generator parameters laid over the model's own (e.g. ``{"method":
    "stock"}``; the classical engine has no generator and ignores them); ``cache_bytes`` the
    embedding cache (None: the engine's default, 512 MiB; the guided method's second round
    reads its tiles' features again from it, and encodes again what it let go); ``version``
    the model version to report instead of the one derived from the files; ``output`` the
    decoder output a SAM 2 checkpoint was trained on (``--output``; a fine-tune file records
    its own, see ``sam.models.declare_output``).
    """
    kind = resolve_kind(kind, model)
    if kind == "classical":
        if model:
            raise MosaicError(f"{model}: a model only applies to --engine sam2, not classical")
        if output:
            raise MosaicError(f"--output {output}: a decoder output only applies to --engine sam2")
        return ClassicalEngine()
    name = model or weights.default_model()
    if name is None:
        raise MosaicError(f"SAM 2 engine: no SAM 2 weights are installed; {FETCH_HINT}")
    from .sam.engine import DEFAULT_CACHE_BYTES, Sam2Engine  # imports torch: only when SAM 2 is used

    return Sam2Engine.from_spec(name, device=device, base=base, image_size=image_size, overrides=overrides,
                                version=version, output=output,
                                cache_bytes=DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes)


def engine_version(engine: Engine) -> str:
    return CLASSICAL_VERSION if isinstance(engine, ClassicalEngine) else engine.model_version


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
            "output": engine.output, "device": str(engine.device), "params": engine.params.to_dict()}


def describe_engine(engine: Engine) -> str:
    """One line saying which engine and model segment, for the user."""
    info = engine_info(engine)
    if info["engine"] == "classical":
        return "Engine: classical (colour watershed, no model weights)"
    return (f"Engine: SAM 2, model {info['model_version']} on {info['device']}, "
            f"method {info['params']['method']}, decoder output {info['output']}")
