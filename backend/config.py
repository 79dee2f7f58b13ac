"""Settings of the backend: one frozen dataclass, read from the environment.

Every setting has an environment variable (listed by ``settings_table()``, which the settings
table of docs/backend.md is made from) and a ``mosaic-backend`` option of the same name (``--predict-timeout``
sets ``MOSAIC_BACKEND_PREDICT_TIMEOUT``). The command line writes the options it is given
into the environment and every server process reads ``Settings.from_env()``, so the settings
reach all uvicorn worker processes the same way.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import platformdirs

from mosaic_toolkit.sam.params import OUTPUTS
from mosaic_toolkit.training.config import LIMITS, within

from .errors import BackendError

ENGINES = ("auto", "sam2", "classical")
PROMOTE = ("better", "always")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def default_models_dir() -> Path:
    """Where model versions live unless MOSAIC_BACKEND_MODELS says otherwise."""
    return Path(platformdirs.user_data_dir("mosaic-sam")) / "backend-models"


def _opt_str(text: str) -> str | None:
    return text.strip() or None


def _opt_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _json_dict(text: str) -> dict[str, Any]:
    value = json.loads(text) if text.strip() else {}
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _setting(
    env: str, default: Any, help: str, parse: Callable[[str], Any] | None = None,
    secret: bool = False, choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field carrying its environment variable, parser and help text."""
    meta = {"env": env, "help": help, "parse": parse, "secret": secret, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Everything the backend can be told (see the field help texts)."""

    host: str = _setting("MOSAIC_BACKEND_HOST", "127.0.0.1",
                         "Address to listen on (0.0.0.0 in a container).")
    port: int = _setting("MOSAIC_BACKEND_PORT", 9090, "Port to listen on.", int)
    workers: int = _setting(
        "MOSAIC_BACKEND_WORKERS", 1,
        "Server processes. Each loads its own model copy and embedding cache, so clicks on one "
        "image are fastest with 1.", int)
    engine: str = _setting(
        "MOSAIC_BACKEND_ENGINE", "auto",
        "auto: SAM 2 when a model is given or installed, else the classical engine (no weights).",
        choices=ENGINES)
    model: str | None = _setting(
        "MOSAIC_BACKEND_MODEL", None,
        "SAM 2 base model: a name (mosaic-toolkit weights list), a checkpoint or a fine-tune "
        "file. Default: the best installed checkpoint.", _opt_str)
    model_base: str | None = _setting(
        "MOSAIC_BACKEND_MODEL_BASE", None,
        "Base SAM 2 checkpoint (path or name) of a fine-tune file given as MOSAIC_BACKEND_MODEL, "
        "when it is neither in the model cache nor at the path the fine-tune recorded; its sha256 "
        "must match the recorded one. Default: found from the fine-tune file.", _opt_str)
    model_output: str = _setting(
        "MOSAIC_BACKEND_MODEL_OUTPUT", "auto",
        "Mask-decoder output MOSAIC_BACKEND_MODEL was fine-tuned on, the only one clicks and "
        "pre-labels then use: single, multimask-first (the thesis's checkpoints) or sam2 (SAM 2's "
        "own choice). auto: a fine-tune file's recorded output, else sam2. Trained versions "
        "always use the output they were trained on.",
        choices=("auto", *OUTPUTS))
    device: str | None = _setting(
        "MOSAIC_BACKEND_DEVICE", None, "Torch device (cuda, cuda:1, cpu). Default: CUDA if "
        "available, else MPS, else CPU.", _opt_str)
    image_size: int | None = _setting(
        "MOSAIC_BACKEND_IMAGE_SIZE", None,
        "SAM 2 input resolution override, a multiple of 32 (tests and benchmarks; default: the "
        "model's, 1024).", _opt_int)
    generator_params: dict = _setting(
        "MOSAIC_BACKEND_GENERATOR_PARAMS", {},
        'JSON object of SAM 2 full-image parameters for pre-labels, e.g. {"pred_iou_thresh": '
        "0.7} (default: the model's tuned ones).", _json_dict)
    models_dir: Path = _setting(
        "MOSAIC_BACKEND_MODELS", None,
        "Folder of trained model versions and training runs (default: the user data folder, "
        "~/.local/share/mosaic-sam/backend-models on Linux).", lambda s: Path(s).expanduser())
    model_version: str | None = _setting(
        "MOSAIC_BACKEND_MODEL_VERSION", None,
        "Serve this version (GET /versions) instead of the current one; training then still "
        "records new versions but this server keeps the pinned one.", _opt_str)
    label_studio_url: str | None = _setting(
        "LABEL_STUDIO_URL", None,
        "Label Studio's address; images and annotations are fetched only from this host, and only "
        "its /data/ files. Default: the hostname Label Studio sends to /setup.", _opt_str)
    label_studio_api_key: str | None = _setting(
        "LABEL_STUDIO_API_KEY", None,
        "API key for Label Studio: a personal access token (Account & Settings), or a legacy "
        "token where the organization enables them; only ever sent to "
        "LABEL_STUDIO_URL (without it the key is not used). Default: the token Label Studio sends "
        "to /setup, used only with the hostname of that same request.", _opt_str, secret=True)
    local_files_root: Path | None = _setting(
        "LOCAL_FILES_DOCUMENT_ROOT", None,
        "Label Studio's local-files document root, when this machine sees it too: "
        "/data/local-files/ images are then read from disk instead of over HTTP.",
        lambda s: Path(s).expanduser() if s.strip() else None)
    prelabel_scores: bool = _setting(
        "MOSAIC_BACKEND_PRELABEL_SCORES", True,
        "SAM 2 pre-labels: score every tessera with the IoU the model predicted for it, so that "
        "the least likely can be reviewed first (0: a region SAM 2 did not outline). Free with "
        "the guided method; the other methods decode every tessera once more.", lambda s: _flag(s))
    polygon_iou: float = _setting(
        "MOSAIC_BACKEND_POLYGON_IOU", 0.97,
        "Fineness of polygon regions: each tessera's outline keeps the fewest vertices whose "
        "polygon still has this IoU with the tessera's pixels (1 = exact pixel outline).", float)
    click_polygon_iou: float = _setting(
        "MOSAIC_BACKEND_CLICK_POLYGON_IOU", 1.0,
        "Fineness of the polygon a click is answered with (as MOSAIC_BACKEND_POLYGON_IOU). Finer "
        "than pre-labels: a click makes one region, and on tesserae some 30 px wide each pixel of "
        "outline is worth about 0.1 IoU (1 = the mask's exact outline, about 35 vertices; 0.99 "
        "about 20, 0.97 about 10).", float)
    click_mask_threshold: float = _setting(
        "MOSAIC_BACKEND_CLICK_MASK_THRESHOLD", 0.5,
        "SAM 2 logit above which a pixel belongs to a click's mask (0 = SAM's own threshold). "
        "The base model's outlines take a strip of grout around a tessera; 0.5 trims it (a "
        "fine-tune, which learnt the annotated outlines, scores the same at 0 and 0.5).", float)
    click_region: str = _setting(
        "MOSAIC_BACKEND_CLICK_REGION", "auto",
        "Region type a click is answered with: auto = a polygon when the labeling config has "
        "PolygonLabels (light in the editor), else a brush mask; or force polygon or brush.",
        choices=("auto", "polygon", "brush"))
    predict_timeout: float = _setting(
        "MOSAIC_BACKEND_PREDICT_TIMEOUT", 90.0,
        "Seconds one /predict request may take; a pre-label that would run longer stops with a "
        "504 error. Keep it below Label Studio's ML_TIMEOUT_PREDICT (100 s).", float)
    fetch_timeout: float = _setting(
        "MOSAIC_BACKEND_FETCH_TIMEOUT", 30.0, "Seconds to wait for Label Studio when fetching "
        "an image or task.", float)
    max_image_pixels: int = _setting(
        "MOSAIC_BACKEND_MAX_IMAGE_PIXELS", 100_000_000,
        "Largest image accepted, in pixels (larger ones get a 413 error).", int)
    max_image_bytes: int = _setting(
        "MOSAIC_BACKEND_MAX_IMAGE_BYTES", 200 * 2**20,
        "Largest image file accepted, in bytes.", int)
    max_body_mb: float = _setting(
        "MOSAIC_BACKEND_MAX_BODY_MB", 32.0,
        "Largest request body accepted, in MiB (larger ones get a 413 error before they are "
        "read; a click carries the task with all its regions, about 1 MB per 500 tesserae).",
        float)
    max_tasks: int = _setting(
        "MOSAIC_BACKEND_MAX_TASKS", 50,
        "Most tasks one /predict request may name (more get a 413 error; Label Studio sends "
        "one task per request).", int)
    max_answer_mb: float = _setting(
        "MOSAIC_BACKEND_MAX_ANSWER_MB", 256.0,
        "Largest /predict answer, in MiB of JSON: a pre-label request whose regions would be "
        "larger stops with a 413 error (ask for fewer tasks per request).", float)
    image_cache_mb: int = _setting(
        "MOSAIC_BACKEND_IMAGE_CACHE_MB", 512,
        "Memory for decoded images and classical segmentations kept between clicks (MiB).", int)
    embedding_cache_mb: int = _setting(
        "MOSAIC_BACKEND_EMBEDDING_CACHE_MB", 512,
        "Memory for SAM 2 image embeddings kept between clicks and by pre-label jobs (MiB; ~16 per "
        "1024² image; the guided method's second round reads its tiles' embeddings from it).", int)
    basic_auth_user: str | None = _setting(
        "MOSAIC_BACKEND_BASIC_AUTH_USER", None,
        "With the password: require HTTP basic auth on every endpoint except GET /health.",
        _opt_str)
    basic_auth_password: str | None = _setting(
        "MOSAIC_BACKEND_BASIC_AUTH_PASSWORD", None, "Password for HTTP basic auth.", _opt_str,
        secret=True)
    train_every: int = _setting(
        "MOSAIC_BACKEND_TRAIN_EVERY", 0,
        "Start a training run after this many new annotations (webhook events); 0: only on "
        "START_TRAINING.", int)
    train_epochs: int = _setting("MOSAIC_BACKEND_TRAIN_EPOCHS", 3, "Epochs per training run.", int)
    train_batch_size: int = _setting(
        "MOSAIC_BACKEND_TRAIN_BATCH_SIZE", 4, "Images per optimizer step.", int)
    train_lr: float = _setting(
        "MOSAIC_BACKEND_TRAIN_LR", 3e-4,
        "Learning rate (AdamW, cosine to a hundredth). A run on the annotations made so far is tens "
        "of steps: 3e-4 lifts its pre-labels where the thesis's 1e-5 (for ~2,000 steps) made them "
        "worse (docs/fine-tuning.md).", float)
    train_max_prompts: int = _setting(
        "MOSAIC_BACKEND_TRAIN_MAX_PROMPTS", 64, "Tesserae prompted per image and step; 0 = all.",
        int)
    train_image_size: int | None = _setting(
        "MOSAIC_BACKEND_TRAIN_IMAGE_SIZE", None,
        "Model input resolution while training (default: the served model's).", _opt_int)
    train_tesserae_per_crop: int = _setting(
        "MOSAIC_BACKEND_TRAIN_TESSERAE_PER_CROP", 100,
        "Augmentation: tesserae per training crop.", int)
    train_max_side: int = _setting(
        "MOSAIC_BACKEND_TRAIN_MAX_SIDE", 1024, "Augmentation: longest side of a crop (px).", int)
    train_val_params: dict = _setting(
        "MOSAIC_BACKEND_TRAIN_VAL_PARAMS", {},
        "JSON object of SAM 2 parameters for the validation segmentation that picks the best "
        "epoch and decides the switch.", _json_dict)
    train_promote: str = _setting(
        "MOSAIC_BACKEND_TRAIN_PROMOTE", "better",
        "better: switch to a new version only when its validation Dice beats the current "
        "model's on the same images; always: switch after every successful run.",
        choices=PROMOTE)
    train_device: str | None = _setting(
        "MOSAIC_BACKEND_TRAIN_DEVICE", None, "Torch device for training (default: --device).",
        _opt_str)
    train_seed: int = _setting("MOSAIC_BACKEND_TRAIN_SEED", 0, "Seed of splits and prompts.", int)
    log_level: str = _setting("MOSAIC_BACKEND_LOG_LEVEL", "info", "Logging level.",
                              choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        if self.models_dir is None:
            object.__setattr__(self, "models_dir", default_models_dir())
        checks = (
            ("port", 0 <= self.port <= 65535, "between 0 and 65535"),
            ("workers", self.workers >= 1, "at least 1"),
            ("image_size", self.image_size is None or (self.image_size > 0 and self.image_size % 32 == 0),
             "a positive multiple of 32"),
            ("polygon_iou", 0 < self.polygon_iou <= 1, "in (0, 1]"),
            ("click_polygon_iou", 0 < self.click_polygon_iou <= 1, "in (0, 1]"),
            ("click_mask_threshold", math.isfinite(self.click_mask_threshold), "a finite number"),
            ("predict_timeout", math.isfinite(self.predict_timeout) and self.predict_timeout > 0, "positive"),
            ("fetch_timeout", math.isfinite(self.fetch_timeout) and self.fetch_timeout > 0, "positive"),
            ("max_image_pixels", self.max_image_pixels > 0, "positive"),
            ("max_image_bytes", self.max_image_bytes > 0, "positive"),
            ("max_body_mb", math.isfinite(self.max_body_mb) and self.max_body_mb > 0, "positive"),
            ("max_tasks", self.max_tasks >= 1, "at least 1"),
            ("max_answer_mb", math.isfinite(self.max_answer_mb) and self.max_answer_mb > 0, "positive"),
            ("image_cache_mb", self.image_cache_mb >= 0, "non-negative"),
            ("embedding_cache_mb", self.embedding_cache_mb >= 0, "non-negative"),
            ("train_every", self.train_every >= 0, "non-negative"),
            # the training ranges are TrainConfig's (mosaic_toolkit.training.config.LIMITS)
            *((f"train_{n}", within(n, getattr(self, f"train_{n}")), LIMITS[n].what)
              for n in ("epochs", "batch_size", "lr", "max_prompts")),
            ("train_image_size", self.train_image_size is None
             or (self.train_image_size > 0 and self.train_image_size % 32 == 0), "a positive multiple of 32"),
            ("train_tesserae_per_crop", self.train_tesserae_per_crop >= 1, "at least 1"),
            ("train_max_side", self.train_max_side >= 32, "at least 32"),
            ("basic_auth", (self.basic_auth_user is None) == (self.basic_auth_password is None),
             "given as both a user and a password, or neither"),
        )
        for name, ok, what in checks:
            if not ok:
                raise BackendError(f"setting {name}: must be {what}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise BackendError(
                    f"setting {f.name} ({f.metadata['env']}): {getattr(self, f.name)!r} is not one "
                    f"of {', '.join(choices)}")
        if self.label_studio_url is not None:
            object.__setattr__(self, "label_studio_url", self.label_studio_url.rstrip("/"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Settings from environment variables (``os.environ`` by default), then ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if name not in env:
                continue
            parse = f.metadata["parse"] or (lambda s: s)
            try:
                values[f.name] = parse(env[name])
            except (ValueError, TypeError) as exc:
                raise BackendError(f"{name}={env[name]!r}: cannot read it ({exc})") from exc
        values.update(overrides)
        return cls(**values)

    @property
    def auth_enabled(self) -> bool:
        return self.basic_auth_user is not None

    def public(self) -> dict[str, Any]:
        """The settings as JSON-ready values, secrets masked (for logs and GET /)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value is not None:
                value = "***"
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def settings_table() -> list[tuple[str, str, str, str]]:
    """(option, environment variable, default, help) of every setting, for docs and --help."""
    rows = []
    for f in fields(Settings):
        default = f.default if f.default_factory is MISSING else f.default_factory()
        if f.name == "models_dir":
            default = "(user data folder)"
        shown = "-" if default is None else json.dumps(default) if isinstance(default, dict) else str(default)
        rows.append((f"--{f.name.replace('_', '-')}", f.metadata["env"], shown, f.metadata["help"]))
    return rows

