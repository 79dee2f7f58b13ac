"""Building and loading SAM 2 models, and the fine-tune file format.

A *model* is a base SAM 2 checkpoint (official format: ``{"model": state_dict}``) plus, optionally,
a *fine-tune file*: a small torch file holding only the prompt encoder and mask decoder weights
(~17 MB, the parts the thesis trains; the image encoder stays frozen) and the metadata needed to
use it::

    {"format": "mosaic-sam-finetune", "version": 1,
     "base": {"name": "sam2.1-large", "config": "configs/sam2.1/sam2.1_hiera_l.yaml",
              "checkpoint": "<absolute path of the base checkpoint trained on, optional>",
              "sha256": "<of the base checkpoint, optional>", "image_size": 1024},
     "state_dict": {"sam_prompt_encoder.*": tensor, "sam_mask_decoder.*": tensor},
     "output": "single",
     "generator": {tuned generator parameters, see engine.GeneratorParams},
     "training": {training data summary, hyper-parameters, scores}}

``"output"`` names the mask-decoder output that was trained and that every path serves
(``sam.adapter``, "Decoder outputs"): "single" (token 0, what ``train`` trains by default),
"multimask-first" (token 1, the thesis's way) or "sam2" (the base model's decoder untouched,
e.g. ``tune``'s tuned.pt of a base checkpoint: SAM 2's own choice). A file without the key was
written before it existed, by our ``train`` (token 0): it reads as "single" (or "sam2" for a
tuned base, whose training note says so). A whole-model checkpoint that was fine-tuned
elsewhere is declared with ``resolve_model(..., output=...)`` (``--output`` on the command line).

A fine-tune finds its base checkpoint again (``resolve_model``): the registry name in the model
cache, then the recorded ``"checkpoint"`` path, each accepted only when its sha256 matches the
recorded one; an explicit base (``--base``) overrides both and must match too. Files without
``"checkpoint"`` or ``"sha256"`` (older ones) are found by name alone.

``resolve_model`` turns what the user typed (a model name, a base checkpoint path or a fine-tune
path) into a ``ModelSpec``; ``load_model`` builds the ready ``torch.nn.Module`` from it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..core.io import atomic_file
from ..core.errors import MosaicError
from .params import OUTPUT_SAM2, OUTPUT_SINGLE, GeneratorParams, check_output

FINETUNE_FORMAT = "mosaic-sam-finetune"
FINETUNE_VERSION = 1
#: Parameter-name prefixes a fine-tune file stores (everything else comes from the base).
FINETUNE_PREFIXES = ("sam_prompt_encoder.", "sam_mask_decoder.")


# --------------------------------------------------------------------------------------------
# Device and model construction
# --------------------------------------------------------------------------------------------
def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device to run on: ``device`` when given, else CUDA, else MPS, else CPU."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise MosaicError(f"device {device!r}: not a valid torch device ({exc})") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise MosaicError(f"device {device!r}: CUDA is not available on this machine")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise MosaicError(f"device {device!r}: MPS is not available on this machine")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _read_torch_file(path: Path, what: str, mmap: bool = False) -> Any:
    """``torch.load`` (tensors and plain data only) with a MosaicError naming the file."""
    if not path.is_file():
        raise MosaicError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile, AttributeError, KeyError) as exc:
        if mmap:  # files in torch's legacy (non-zip) format cannot be memory-mapped
            return _read_torch_file(path, what, mmap=False)
        raise MosaicError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from exc


#: sam2 modules that only video tracking uses: the image predictor never runs them, and exports
#: of the image model (such as the ONNX one that ``weights import`` reads) leave them out.
#: A base checkpoint without them loads; they keep their initial values.
VIDEO_ONLY_PREFIXES = (
    "memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr",
    "mask_downsample.", "obj_ptr_proj.", "obj_ptr_tpos_proj.", "sam_mask_decoder.pred_obj_score_head.",
)
_WRAPPER_PREFIXES = ("model.", "module.")


def read_checkpoint_state_dict(path: str | os.PathLike, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a SAM 2 checkpoint.

    The official format is ``{"model": state_dict}``. A bare state dict (``torch.save(
    model.state_dict(), path)``) is read too, and so are keys that all carry a wrapper's
    ``model.`` or ``module.`` prefix; anything without SAM 2's image-encoder tensors is an error.
    ``mmap=True`` maps the tensors instead of reading them: cheap when only names and shapes
    are needed.
    """
    path = Path(path)
    data = _read_torch_file(path, "SAM 2 checkpoint", mmap=mmap)
    if isinstance(data, dict) and data.get("format") == FINETUNE_FORMAT:
        raise MosaicError(f"{path}: is a fine-tune file, not a base SAM 2 checkpoint")
    state = data.get("model") if isinstance(data, dict) and isinstance(data.get("model"), dict) else data
    if isinstance(state, dict) and state and all(isinstance(k, str) for k in state):
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
        if any(k.startswith("image_encoder.") for k in state) and all(
                isinstance(v, torch.Tensor) for v in state.values()):
            return state
    raise MosaicError(
        f'{path}: not a SAM 2 checkpoint (expected {{"model": state_dict}} or a state dict '
        "with SAM 2's image_encoder.* tensors)"
    )


def _load_base_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], checkpoint: Path,
                       config: str) -> None:
    """Load ``state`` into ``model``: every tensor of the image model must be there and fit;
    video-only modules may be absent (they keep their initial values)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(VIDEO_ONLY_PREFIXES)]
    unknown = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unknown or wrong:
        parts = [f"{label} {len(items)} (first: {', '.join(items[:3])})"
                 for label, items in (("missing", missing), ("unknown", unknown), ("shape mismatch", wrong))
                 if items]
        raise MosaicError(f"{checkpoint}: weights do not match config {config} ({'; '.join(parts)})"[:600])
    model.load_state_dict(state, strict=False)


def build_sam2_model(
    config: str,
    checkpoint: Path | None,
    device: str | torch.device | None,
    image_size: int | None = None,
    overrides: Iterable[str] = (),
) -> torch.nn.Module:
    """Build a SAM 2 model from its Hydra ``config`` and load ``checkpoint`` (``_load_base_weights``).

    ``checkpoint=None`` keeps the random initialisation (tests). ``image_size`` overrides the
    config's input resolution (1024); the weights do not depend on it (Hiera interpolates its
    position embeddings), so a reduced size gives a cheaper model for tests and benchmarks.
    ``overrides`` are extra Hydra overrides such as ``"++model.foo=1"``. Returns the model in
    eval mode on ``device``.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from sam2.build_sam import build_sam2

    extra = list(overrides)
    if image_size is not None:
        if image_size <= 0 or image_size % 32:
            raise MosaicError(f"{config}: image_size must be a positive multiple of 32, got {image_size}")
        extra.append(f"++model.image_size={int(image_size)}")
    state = read_checkpoint_state_dict(checkpoint) if checkpoint is not None else None
    try:
        model = build_sam2(config, None, device="cpu", mode="eval", hydra_overrides_extra=extra)
    except (HydraException, OmegaConfBaseException) as exc:
        raise MosaicError(f"{config}: cannot build SAM 2 model ({exc})") from exc
    if state is not None:
        _load_base_weights(model, state, checkpoint, config)
    return model.to(pick_device(device)).eval()


# --------------------------------------------------------------------------------------------
# Fine-tune files
# --------------------------------------------------------------------------------------------
def finetune_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The prompt-encoder and mask-decoder weights of ``model`` (CPU copies)."""
    return {
        k: v.detach().to("cpu").clone()
        for k, v in model.state_dict().items()
        if k.startswith(FINETUNE_PREFIXES)
    }


def _check_generator(path: Path, generator: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate generator parameters against params.GeneratorParams (unknown keys are errors)."""
    if not generator:
        return {}
    try:
        GeneratorParams.from_dict(generator)
    except MosaicError as exc:
        raise MosaicError(f"{path}: {exc}") from exc
    return dict(generator)


def save_finetune(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    base: dict[str, Any],
    generator: dict[str, Any] | None,
    training: dict[str, Any] | None,
    output: str = OUTPUT_SINGLE,
) -> None:
    """Write a fine-tune file (prompt encoder + mask decoder and metadata), atomically.

    ``base`` needs "name" and "config"; "checkpoint" (its path), "sha256" (of the base
    checkpoint) and "image_size" are optional (``base_record`` makes all of them). ``output`` is the decoder output the weights were trained on (module docstring).
    """
    path = Path(path)
    check_output(output, f"{path}")
    if not base.get("config"):
        raise MosaicError(f'{path}: fine-tune metadata needs base["config"]')
    base_meta = {
        "name": base.get("name"),
        "config": base["config"],
        "checkpoint": os.fspath(base["checkpoint"]) if base.get("checkpoint") else None,
        "sha256": base.get("sha256"),
        "image_size": base.get("image_size"),
    }
    data = {
        "format": FINETUNE_FORMAT,
        "version": FINETUNE_VERSION,
        "base": base_meta,
        "output": output,
        "state_dict": finetune_state_dict(model),
        "generator": _check_generator(path, generator),
        "training": dict(training or {}),
    }
    _write_finetune(path, data)


def _write_finetune(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        torch.save(data, tmp)


def load_finetune(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a fine-tune file; a MosaicError naming the file when it is not one."""
    path = Path(path)
    data = _read_torch_file(path, "fine-tune file")
    if not isinstance(data, dict) or data.get("format") != FINETUNE_FORMAT:
        raise MosaicError(f'{path}: not a fine-tune file (no "format": "{FINETUNE_FORMAT}")')
    if data.get("version") != FINETUNE_VERSION:
        raise MosaicError(
            f"{path}: fine-tune format version {data.get('version')!r} is not supported "
            f"(this version reads {FINETUNE_VERSION})"
        )
    base = data.get("base")
    if not isinstance(base, dict) or not base.get("config"):
        raise MosaicError(f'{path}: fine-tune file has no base["config"]')
    state = data.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise MosaicError(f"{path}: fine-tune file has no weights")
    stray = sorted(k for k in state if not k.startswith(FINETUNE_PREFIXES))
    if stray:
        raise MosaicError(f"{path}: fine-tune file holds weights outside the decoder: {stray[:3]}")
    data.setdefault("generator", {})
    data.setdefault("training", {})
    if "output" not in data:  # written before the key existed
        data["output"] = _legacy_output(data["training"])
    check_output(data["output"], f"{path}")
    return data


#: The note tune writes into the tuned.pt of a base checkpoint (its decoder is SAM 2's own).
UNTRAINED_NOTE = "the base model's own decoder weights, not fine-tuned"


def _legacy_output(training: Any) -> str:
    """The output of a file without "output": our train trained token 0; a tuned base kept SAM 2's."""
    if isinstance(training, dict) and training.get("note") == UNTRAINED_NOTE:
        return OUTPUT_SAM2
    return OUTPUT_SINGLE


def update_finetune_metadata(
    path: str | os.PathLike,
    generator: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> None:
    """Replace the "generator" and/or "training" sections of a fine-tune file (atomically).

    A section given as ``None`` is left as it is.
    """
    path = Path(path)
    data = load_finetune(path)
    if generator is not None:
        data["generator"] = _check_generator(path, generator)
    if training is not None:
        data["training"] = dict(training)
    _write_finetune(path, data)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: (resolved path, size, mtime, inode) -> sha256: each checkpoint is hashed once per process.
_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file: the hash ``weights`` recorded beside a cached checkpoint
    when it is current, else hashed (once per process and file version: ~0.3 s per 150 MB)."""
    from . import weights

    path = Path(path)
    stat = path.stat()
    key = (os.fspath(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _DIGESTS:
        _DIGESTS[key] = weights.recorded_sha256(path) or file_sha256(path)
    return _DIGESTS[key]


# --------------------------------------------------------------------------------------------
# Resolving what the user named
# --------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """Everything needed to build a model: base weights, config, optional fine-tune."""

    base_checkpoint: Path
    config: str
    base_name: str | None
    finetune: Path | None = None
    generator: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The decoder output served (and trained): see ``sam.adapter``, "Decoder outputs".
    output: str = OUTPUT_SAM2

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON (paths as strings; ``metadata`` is re-read from the files)."""
        return {
            "base_checkpoint": os.fspath(self.base_checkpoint), "config": self.config,
            "base_name": self.base_name, "finetune": os.fspath(self.finetune) if self.finetune else None,
            "generator": dict(self.generator), "image_size": self.image_size, "output": self.output,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModelSpec":
        return cls(
            base_checkpoint=Path(data["base_checkpoint"]), config=data["config"], base_name=data["base_name"],
            finetune=Path(data["finetune"]) if data.get("finetune") else None,
            generator=dict(data.get("generator") or {}), image_size=data.get("image_size"),
            output=data.get("output") or OUTPUT_SAM2,
        )


def _config_signature(config: str) -> tuple[int, int, bool] | None:
    """(Hiera embed dim, number of blocks, SAM 2.1?) of a packaged config, for matching."""
    import sam2
    from omegaconf import OmegaConf

    file = Path(sam2.__path__[0]) / config
    if not file.is_file():
        return None
    model = OmegaConf.load(file).model
    trunk = model.image_encoder.trunk
    embed = int(trunk.get("embed_dim", 96))
    blocks = int(sum(trunk.get("stages", (2, 3, 16, 3))))
    return embed, blocks, bool(model.get("no_obj_embed_spatial", False))


def _checkpoint_signature(state: Mapping[str, torch.Tensor]) -> tuple[int, int, bool] | None:
    weight = state.get("image_encoder.trunk.patch_embed.proj.weight")
    if weight is None:
        return None
    blocks = {k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")}
    return int(weight.shape[0]), len(blocks), "no_obj_embed_spatial" in state


def infer_config(checkpoint: Path) -> str:
    """The packaged config whose architecture matches a base checkpoint's weights."""
    from . import weights

    signature = _checkpoint_signature(read_checkpoint_state_dict(checkpoint, mmap=True))
    configs = sorted({info.config for info in weights.MODELS.values()})
    for config in configs:
        if signature is not None and _config_signature(config) == signature:
            return config
    raise MosaicError(f"{checkpoint}: weights match none of the SAM 2 configs {configs}")


def _resolve_base(name_or_path: str | os.PathLike) -> tuple[Path, str, str | None]:
    """(checkpoint, config, model name) of a base model name or path (its hash is checked
    where a fine-tune needs it: ``checkpoint_sha256``)."""
    from . import weights

    path, info = weights.resolve_checkpoint(str(name_or_path))
    path = Path(path)
    if info is None:
        return path, infer_config(path), None
    return path, info.config, info.name


def is_finetune_file(path: Path) -> bool:
    """Whether ``path`` is a fine-tune file (read lazily: tensors are memory-mapped)."""
    data = _read_torch_file(path, "model file", mmap=True)
    return isinstance(data, dict) and data.get("format") == FINETUNE_FORMAT


def declare_output(spec: ModelSpec, output: str | None) -> ModelSpec:
    """``spec`` served with decoder ``output`` (None: as it is).

    A base checkpoint can be declared with any output (a whole model fine-tuned elsewhere:
    "multimask-first" for the thesis's, "single" for token 0); a fine-tune file records the
    output it was trained on, and declaring another is a MosaicError naming the file.
    """
    if output is None or output == spec.output:
        return spec
    check_output(output, "--output")
    if spec.finetune is not None:
        raise MosaicError(
            f"{spec.finetune}: fine-tune was trained on decoder output {spec.output!r}; "
            f"it cannot be served as {output!r}"
        )
    return dataclasses.replace(spec, output=output)


def resolve_model(
    spec: str | os.PathLike, base: str | os.PathLike | None = None, output: str | None = None
) -> ModelSpec:
    """Resolve a model NAME, a base checkpoint PATH, or a fine-tune file PATH.

    A fine-tune file records its base model (name, path, sha256) and is found again from the
    model cache or the recorded path (module docstring); ``base`` (a name or a checkpoint path)
    overrides where the base weights come from. A different config, differently shaped decoder
    weights, or a different base sha256 (when the fine-tune recorded one) is a MosaicError
    naming both files.
    ``output`` declares the decoder output a checkpoint is served with (:func:`declare_output`).
    """
    path = Path(spec)
    if not path.is_file() or not is_finetune_file(path):
        if base is not None:
            raise MosaicError(f"{spec}: a separate base model only applies to a fine-tune file")
        checkpoint, config, name = _resolve_base(spec)
        return declare_output(ModelSpec(
            base_checkpoint=checkpoint,
            config=config,
            base_name=name,
            metadata={"base": {"name": name, "config": config, "checkpoint": str(checkpoint)}},
        ), output)

    meta = load_finetune(path)
    made_for = meta["base"]
    if base is not None:
        checkpoint, config, name = _resolve_base(base)
        _check_base_config(path, made_for, checkpoint, config, name)
        _check_base_sha256(path, made_for, checkpoint)
    else:
        checkpoint, config, name = _find_base(path, made_for)
    _check_shapes(path, meta["state_dict"], checkpoint, read_checkpoint_state_dict(checkpoint, mmap=True))
    resolved = ModelSpec(
        base_checkpoint=checkpoint,
        config=config,
        base_name=name or made_for.get("name"),
        finetune=path,
        generator=dict(meta.get("generator") or {}),
        image_size=made_for.get("image_size"),
        metadata={k: v for k, v in meta.items() if k != "state_dict"},
        output=meta["output"],
    )
    return declare_output(resolved, output)


def base_record(spec: ModelSpec, sha256: str | None = None) -> dict[str, Any]:
    """The "base" section of a fine-tune made on ``spec``'s base checkpoint: name, config,
    absolute path, sha256 (hashed when not given) and input resolution."""
    checkpoint = spec.base_checkpoint.resolve()
    return {
        # A base without a registry name is recorded by path, so older readers still resolve it.
        "name": spec.base_name or os.fspath(checkpoint),
        "config": spec.config,
        "checkpoint": os.fspath(checkpoint),
        "sha256": sha256 or checkpoint_sha256(checkpoint),
        "image_size": spec.image_size,
    }


def _check_base_config(finetune: Path, made_for: Mapping[str, Any], checkpoint: Path, config: str,
                       name: str | None) -> None:
    if config != made_for["config"]:
        raise MosaicError(
            f"{finetune}: fine-tune was made for {made_for.get('name') or '?'} ({made_for['config']}), "
            f"but the base {checkpoint} is {name or '?'} ({config})"
        )


def _sha256_mismatch(finetune: Path, made_for: Mapping[str, Any], checkpoint: Path) -> str | None:
    """Why ``checkpoint`` is not the base ``finetune`` was trained on, or None when it is
    (or when the fine-tune recorded no sha256)."""
    wanted = (made_for.get("sha256") or "").lower()
    if not wanted:
        return None
    have = checkpoint_sha256(checkpoint).lower()
    if have == wanted:
        return None
    trained_on = made_for.get("checkpoint") or made_for.get("name") or "?"
    return (f"{finetune}: fine-tune was trained on base {trained_on} (sha256 {wanted[:12]}...), "
            f"but {checkpoint} has sha256 {have[:12]}...")


def _check_base_sha256(finetune: Path, made_for: Mapping[str, Any], checkpoint: Path) -> None:
    problem = _sha256_mismatch(finetune, made_for, checkpoint)
    if problem:
        raise MosaicError(f"{problem}; give the base it was trained on with --base")


def _find_base(finetune: Path, made_for: Mapping[str, Any]) -> tuple[Path, str, str | None]:
    """(checkpoint, config, name) of a fine-tune's own base: the registry name in the model
    cache, then the recorded checkpoint path (and a path recorded as the name, by older
    files), the first whose sha256 matches the recorded one."""
    from . import weights

    name, recorded = made_for.get("name"), made_for.get("checkpoint")
    if not name and not recorded:
        raise MosaicError(f"{finetune}: fine-tune file does not name its base model; give it with --base")
    candidates: list[Path] = []
    if name in weights.MODELS and weights.checkpoint_path(name).is_file():
        candidates.append(weights.checkpoint_path(name))
    for text in (recorded, name):
        if text and text not in weights.MODELS and Path(text).expanduser().is_file():
            candidates.append(Path(text).expanduser())
    seen, mismatched = set(), []
    for candidate in candidates:
        if candidate.resolve() in seen:
            continue
        seen.add(candidate.resolve())
        problem = _sha256_mismatch(finetune, made_for, candidate)
        if problem:
            mismatched.append(problem)
            continue
        checkpoint, config, found = _resolve_base(candidate)
        _check_base_config(finetune, made_for, checkpoint, config, found)
        return checkpoint, config, found or (name if name in weights.MODELS else None)
    if mismatched:
        raise MosaicError(f"{'; '.join(mismatched)}; give the base it was trained on with --base")
    where = [f"not in the model cache {weights.home()}" if name in weights.MODELS else None,
             f"not at {recorded}" if recorded else None,
             f"not at {name}" if name and name not in weights.MODELS and name != recorded else None]
    fetch = f"`mosaic-toolkit weights fetch {name}` or " if name in weights.MODELS else ""
    raise MosaicError(
        f"{finetune}: base model {name or recorded} not found ({', '.join(w for w in where if w)}); "
        f"run {fetch}give the base checkpoint with --base PATH"
    )


def _check_shapes(
    finetune: Path,
    tuned: Mapping[str, torch.Tensor],
    base: Path,
    reference: Mapping[str, torch.Tensor],
) -> None:
    """Every fine-tuned tensor must exist in the base with the same shape (video-only tensors,
    which a base checkpoint may leave out, are checked only where both have them)."""
    expected = {k for k in reference if k.startswith(FINETUNE_PREFIXES)}
    missing = sorted(k for k in expected - set(tuned) if not k.startswith(VIDEO_ONLY_PREFIXES))
    unknown = sorted(k for k in set(tuned) - expected if not k.startswith(VIDEO_ONLY_PREFIXES))
    wrong = sorted(
        f"{k} {tuple(tuned[k].shape)} vs {tuple(reference[k].shape)}"
        for k in set(tuned) & expected
        if tuned[k].shape != reference[k].shape
    )
    if missing or unknown or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(items[:3])}"
            for label, items in (("shape mismatch", wrong), ("missing", missing), ("unknown", unknown))
            if items
        )
        raise MosaicError(f"{finetune}: does not fit base {base} ({detail})")


def load_model(spec: ModelSpec, device: str | torch.device | None) -> torch.nn.Module:
    """Build the model of ``spec``: base weights, then the fine-tuned decoder on top."""
    model = build_sam2_model(spec.config, spec.base_checkpoint, "cpu", image_size=spec.image_size)
    if spec.finetune is not None:
        tuned = load_finetune(spec.finetune)["state_dict"]
        _check_shapes(spec.finetune, tuned, spec.base_checkpoint, model.state_dict())
        model.load_state_dict(tuned, strict=False)
    return model.to(pick_device(device)).eval()


def model_version(spec: ModelSpec) -> str:
    """A short stable id of the weights in use: base name (or file) plus fine-tune hash.

    A checkpoint declared with a trained output serves other masks than SAM 2's own choice:
    its id says so (``+out-multimask-first``).
    """
    base = spec.base_name or spec.base_checkpoint.name
    if spec.finetune is None:
        return base if spec.output == OUTPUT_SAM2 else f"{base}+out-{spec.output}"
    return f"{base}+ft-{file_sha256(spec.finetune)[:12]}"
