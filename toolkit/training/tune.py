"""Search the mask generator's thresholds with Optuna (`mosaic-toolkit tune`).

The thesis tuned SAM 2's automatic mask generator with Optuna: objective the mean Dice over a
few annotated images, 10–20 trials, SQLite storage, about 10 minutes per trial because every
trial ran the whole generator again. Here a trial searches the four thresholds it tuned
(``pred_iou_thresh``, ``stability_score_thresh``, ``stability_score_offset``,
``mask_threshold``, ranges of its public code) and the three post-processing parameters
(``opening``, ``min_area``, ``erosion``), maximising the mean pixel Dice; the mean per-tessera F
is recorded with every trial.

Speed (``CachedSegmenter``): the model's work does not depend on the thresholds. Each image is
encoded once, its tile-interior map computed once, and every batch of prompts decoded once;
later trials find the decoded low-resolution logits and predicted IoUs in a memo and only
filter, upsample, paint and post-process. The memo is keyed by the exact batch, so a trial
computes exactly what ``Sam2Engine.segment`` computes (the fast path's second round places
prompts where the first round left gaps, which depends on the thresholds: such batches are
decoded when first seen and remembered too). The stock generator (``method="stock"``) cannot
reuse anything: its trials run it in full.

Images are segmented as ``mosaic-toolkit segment`` does (``tiling.segment_tiled``: an image
larger than one tile is cut into tiles), so the tuned values fit what ``segment`` will do.

Persistence: the study lives in an Optuna storage, by default a SQLite file beside the model
(``<model dir>/<model stem>.optuna.db``); running again continues it (each run adds its trials;
an interrupted run keeps its completed trials, and trials left running by a killed process are
marked failed by Optuna's heartbeat). Any SQLAlchemy URL works, e.g. PostgreSQL, so several
machines can work on one study at once. The study records its images, search space and fixed
parameters; resuming with different ones is refused (the trials would not be comparable).

Result: the best parameters (over the whole study) are written into the model's metadata, so
``segment`` and the backend use them without flags: a fine-tune file is updated in place; a
base checkpoint gets ``OUT/tuned.pt``, a fine-tune file holding the base's own prompt encoder
and mask decoder plus the tuned parameters. ``OUT`` also holds ``tune.json`` (summary),
``trials.csv``, ``history.png`` (optimisation history) and ``importances.png`` (parameter
importances).
"""
from __future__ import annotations

import csv
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from ..core.dataset import Dataset, mask_foreground
from ..core.io import atomic_output_dir, write_json
from ..core.cache import ByteLRU
from ..engines import open_engine
from ..sam.engine import Sam2Engine, as_rgb
from ..sam.fast import FastState
from ..sam.guided import speck_area
from ..sam.params import GeneratorParams
from ..core.errors import MosaicError
from ..evaluation.metrics import drop_specks, pixel_metrics, tile_metrics
from ..sam.models import (
    ModelSpec,
    base_record,
    load_finetune,
    UNTRAINED_NOTE,
    declare_output,
    resolve_model,
    save_finetune,
    update_finetune_metadata,
)
from ..core.tiling import resolve_tiling, segment_tiled

#: Searched float parameters and their ranges (the thesis's public code).
FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "pred_iou_thresh": (0.5, 0.9),
    "stability_score_thresh": (0.6, 0.9),
    "stability_score_offset": (0.7, 1.2),
    "mask_threshold": (0.0, 0.6),
}
#: Searched post-processing radii (px).
INT_RANGES: dict[str, tuple[int, int]] = {"opening": (0, 3), "erosion": (0, 2)}
SEARCHED = (*FLOAT_RANGES, "opening", "min_area", "erosion")

DEFAULT_TRIALS = 30
DEFAULT_SPLIT = "val"
DEFAULT_MEMO_BYTES = 2 * 2**30  # decoded batches kept across trials (1024 input: 256 KiB/prompt)
TUNED_NAME = "tuned.pt"  # the fine-tune file written for a base checkpoint
SUMMARY_NAME = "tune.json"
HEARTBEAT_S = 60  # a running trial proves it is alive this often...
GRACE_S = 180  # ...and is marked failed (a killed process) after this long without a beat
STUDY_ATTR = "mosaic_tune"  # study user attribute recording what the study is about


# --------------------------------------------------------------------------------------------
# Segmentation with a memo of decoded prompts
# --------------------------------------------------------------------------------------------
def _nbytes(value: tuple[Any, ...]) -> int:
    """Bytes of the tensors and arrays in a memo entry."""
    return sum(t.numel() * t.element_size() if isinstance(t, torch.Tensor)
               else getattr(t, "nbytes", 0) for t in value)


class CachedSegmenter:
    """``Sam2Engine.segment`` for many parameter sets on the same images, model run once.

    ``segment(image, params)`` returns exactly what ``engine.segment(image, params)`` returns:
    on the fast path it is ``engine.prepare_fast(image).generate(params)`` (the very code the
    engine runs), with the prepared state kept per image (about 16 MB of features per image at
    1024 input, kept for the segmenter's lifetime) and every decoded prompt batch kept in a memo
    keyed by image and the batch's exact points (least recently used batches beyond
    ``memo_bytes`` are dropped and decoded again when needed). The stock path has nothing to
    reuse and runs the generator.
    """

    def __init__(self, engine: Sam2Engine, memo_bytes: int = DEFAULT_MEMO_BYTES) -> None:
        self.engine = engine
        self.memo_bytes = int(memo_bytes)
        self.hits = 0  # prompt batches served from the memo
        self.misses = 0  # prompt batches decoded by the model
        self._states: dict[str, FastState] = {}
        self._proposals: dict[str, np.ndarray] = {}  # guided: the classical proposals per image
        self._guided_decoders: dict[str, Any] = {}  # guided: a window decoder per encoded crop
        # (image key, batch points as bytes) -> (low-res logits, predicted IoUs)
        self._memo: ByteLRU[tuple[Any, ...]] = ByteLRU(self.memo_bytes, _nbytes)

    @property
    def memo_used(self) -> int:
        return self._memo.used_bytes

    def segment(self, image: np.ndarray, params: GeneratorParams) -> np.ndarray:
        """Instance map of ``image`` under ``params``, equal to ``engine.segment(image, params)``."""
        if params.method == "guided":
            return self._segment_guided(as_rgb(image), params)
        if params.method != "fast":
            return self.engine.segment(image, params)
        image = as_rgb(image)
        key = self.engine.image_key(image)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = self.engine.prepare_fast(image)

        def decode(points: np.ndarray):
            memo_key = (key, points.tobytes())
            found = self._memo.get(memo_key)
            if found is not None:
                self.hits += 1
                return found
            self.misses += 1
            found = state.decode(points)
            self._memo.put(memo_key, found)
            return found

        return state.with_decoder(decode).generate(params)


    def _segment_guided(self, image: np.ndarray, params: GeneratorParams) -> np.ndarray:
        """The guided path with the proposals and every decoded window batch remembered."""
        key = self.engine.image_key(image)
        if key not in self._proposals:
            from ..classical import ClassicalEngine

            self._proposals[key] = ClassicalEngine().segment(image)
        decoders: dict[str, Any] = self._guided_decoders

        def decoder_for(crop: np.ndarray):
            crop_key = self.engine.image_key(crop)
            if crop_key not in decoders:
                decoders[crop_key] = self.engine.candidate_decoder(crop)
            decode = decoders[crop_key]

            def remembered(points: np.ndarray, centers: np.ndarray, extent: float):
                memo_key = (crop_key, points.tobytes(), centers.tobytes(), float(extent))
                found = self._memo.get(memo_key)
                if found is not None:
                    self.hits += 1
                    return found
                self.misses += 1
                found = decode(points, centers, extent)
                self._memo.put(memo_key, found)
                return found

            return remembered

        return self.engine.segment_guided(image, params, proposals=self._proposals[key], decoder_for=decoder_for)


# --------------------------------------------------------------------------------------------
# Images and scoring
# --------------------------------------------------------------------------------------------
@dataclass
class TuningImage:
    """One annotated image of the objective, with the tiling ``segment`` would use."""

    stem: str
    image: np.ndarray
    gt_fg: np.ndarray
    gt_instances: np.ndarray
    tile: int
    overlap: int


def load_images(
    dataset: str | os.PathLike, split: str | None, max_images: int | None, tile: int | None = None
) -> tuple[Dataset, list[TuningImage]]:
    """The first ``max_images`` samples of ``split`` (None: all samples), ready to score."""
    data = Dataset.open(dataset)
    samples = data.split(split)
    if not samples:
        splits = sorted({s.split for s in data.samples if s.split})
        raise MosaicError(
            f"{data.root}: no samples in split {split!r} "
            f"(splits present: {', '.join(splits) or 'none'}; choose one with --split)"
        )
    if max_images is not None:
        if max_images < 1:
            raise MosaicError(f"tune: --max-images must be at least 1 (got {max_images})")
        samples = samples[:max_images]
    images = []
    for sample in samples:
        image = data.image(sample)
        tile_side, overlap = resolve_tiling(image, tile)
        images.append(TuningImage(
            sample.stem, image, mask_foreground(data.mask(sample)), drop_specks(data.instances(sample))[0],
            tile_side, overlap,
        ))
    return data, images


#: Segments one image (or tile) under parameters: ``CachedSegmenter.segment`` or
#: ``Sam2Engine.segment``.
SegmentWith = Callable[[np.ndarray, GeneratorParams], np.ndarray]


def segment_for_tuning(segment: SegmentWith, item: TuningImage, params: GeneratorParams) -> np.ndarray:
    """The instance map ``mosaic-toolkit segment`` would produce for the image (same tiling)."""
    if params.method == "guided":  # the guided path tiles the image itself
        return segment(item.image, params)
    return segment_tiled(
        item.image, lambda crop: segment(crop, params),
        tile=item.tile, overlap=item.overlap, progress=False,
    )


def score_images(segment: SegmentWith, images: list[TuningImage], params: GeneratorParams) -> dict[str, float]:
    """Mean pixel Dice, IoU and per-tessera F of ``params`` over ``images``."""
    dice, iou, tile_f = [], [], []
    for item in images:
        instances = segment_for_tuning(segment, item, params)
        pixel = pixel_metrics(instances > 0, item.gt_fg)
        dice.append(pixel["dice"])
        iou.append(pixel["iou"])
        tile_f.append(tile_metrics(item.gt_instances, instances)["f_measure"])
    return {"dice": float(np.mean(dice)), "iou": float(np.mean(iou)), "tile_f": float(np.mean(tile_f))}


# --------------------------------------------------------------------------------------------
# Search space and study
# --------------------------------------------------------------------------------------------
def search_space(images: list[TuningImage]) -> dict[str, list]:
    """``{name: [low, high]}`` of every searched parameter (``min_area`` from the images).

    Segmentation caps ``min_area`` at the speck floor of the image's tessera size
    (``sam.guided.speck_area``, on every method), so the search stops there: the diameter of a
    disc of the median ground-truth area stands for the tessera size."""
    areas = np.concatenate([np.bincount(item.gt_instances.ravel())[1:] for item in images])
    areas = areas[areas > 0]
    median_area = float(np.median(areas)) if areas.size else 0.0
    space: dict[str, list] = {name: list(bounds) for name, bounds in FLOAT_RANGES.items()}
    space.update({name: list(bounds) for name, bounds in INT_RANGES.items()})
    high = speck_area(int(median_area), 2 * math.sqrt(median_area / math.pi))  # the floor itself
    space["min_area"] = [0, max(1, high)]
    return space


def suggest(trial, space: dict[str, list]) -> dict[str, Any]:
    """One trial's values of the searched parameters."""
    values: dict[str, Any] = {}
    for name in SEARCHED:
        low, high = space[name]
        if name in FLOAT_RANGES:
            values[name] = trial.suggest_float(name, low, high)
        else:
            values[name] = trial.suggest_int(name, low, high)
    return values


def _clipped(params: GeneratorParams, space: dict[str, list]) -> dict[str, Any]:
    """The searched values of ``params``, clipped into the search space."""
    out = {}
    for name in SEARCHED:
        low, high = space[name]
        out[name] = type(low)(min(max(getattr(params, name), low), high))
    return out


def storage_url(storage: str | None, spec: ModelSpec) -> str:
    """A SQLAlchemy URL: ``storage`` as given (a plain path means a SQLite file), or the default
    SQLite file beside the model."""
    if storage is None:
        model_file = spec.finetune or spec.base_checkpoint
        return f"sqlite:///{model_file.resolve().parent / (model_file.stem + '.optuna.db')}"
    if "://" in storage:
        return storage
    return f"sqlite:///{Path(storage).expanduser().resolve()}"


def public_url(url: str) -> str:
    """``url`` with any password hidden (for messages and metadata)."""
    from sqlalchemy.engine import make_url

    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not parseable: opening the storage will say why
        return url


def open_study(url: str, name: str, record: dict[str, Any], seed: int):
    """Create or load the study; refuse one recorded for other images or parameters.

    The sampler (TPE) is seeded with ``seed`` plus the number of trials already in the study,
    so a resumed run does not repeat the random start-up trials of the first run.
    """
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            )
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", load_if_exists=True,
        )
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise MosaicError(f"storage {public_url(url)}: cannot open ({type(exc).__name__}: {exc})") from exc
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise MosaicError(f"study {name!r} in {public_url(url)}: is not a maximisation study")
    recorded = study.user_attrs.get(STUDY_ATTR)
    if recorded is None:
        study.set_user_attr(STUDY_ATTR, record)
    else:
        words = {"images": "images", "space": "search space", "fixed": "fixed parameters"}
        differ = [words[k] for k in words if recorded.get(k) != record[k]]
        if differ:
            raise MosaicError(
                f"study {name!r} in {public_url(url)}: was run with other {' and '.join(differ)} "
                f"(images {recorded.get('images')}, fixed parameters {recorded.get('fixed')}); "
                "use the same dataset, --split, --max-images, --tile and --method, or a new --study"
            )
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def write_trials_csv(path: Path, trials: list) -> None:
    """trials.csv: one row per trial (number, state, Dice, per-tessera F, seconds, parameters)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", "state", "dice", "tile_f", "iou", "seconds", *SEARCHED])
        for t in trials:
            attrs = t.user_attrs
            writer.writerow([
                t.number, t.state.name, "" if t.value is None else t.value,
                attrs.get("tile_f", ""), attrs.get("iou", ""), attrs.get("seconds", ""),
                *(t.params.get(name, "") for name in SEARCHED),
            ])


def write_plots(study, folder: Path) -> dict[str, str]:
    """history.png and importances.png; returns {file: note} for plots that were skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    skipped: dict[str, str] = {}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots = [("history.png", ovm.plot_optimization_history, 1),
             ("importances.png", ovm.plot_param_importances, 2)]
    for name, plot, needed in plots:
        if len(complete) < needed:
            skipped[name] = f"needs at least {needed} completed trials, the study has {len(complete)}"
            continue
        # Optuna switches matplotlib to its own style: keep that inside this plot.
        with warnings.catch_warnings(), plt.rc_context():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                skipped[name] = f"{type(exc).__name__}: {exc}"
                continue
            if name == "history.png":
                ax.set_ylabel("mean Dice (objective)")
            fig = ax.figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(folder / name, format="png", dpi=100)
            plt.close(fig)
    return skipped


def _check_out(out: Path, protected: list[Path]) -> None:
    """OUT is created or replaced whole: it must be new or an earlier tune output, and must not
    hold the model or the study's SQLite file."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SUMMARY_NAME).is_file())):
        raise MosaicError(f"{out}: exists and is not an earlier tune output ({SUMMARY_NAME} missing)")
    resolved = out.resolve()
    for path in protected:
        if resolved in path.resolve().parents:
            raise MosaicError(f"{out}: the output folder must not contain {path}")


# --------------------------------------------------------------------------------------------
# The command's library function
# --------------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    """What a tune run did (also written as tune.json)."""

    study: str
    storage: str  # password hidden
    trials_run: int  # trials this run added (completed or not)
    trials_complete: int  # completed trials in the whole study
    best_trial: int
    best_dice: float
    best_tile_f: float
    best_params: GeneratorParams
    written_to: Path  # the fine-tune file now carrying the best parameters
    out: Path
    seconds_setup: float  # loading the model and images, choosing the tiling
    seconds_per_trial: list[float] = field(default_factory=list)  # this run's trials
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        later = self.seconds_per_trial[1:]
        return {
            "version": 1,
            "study": self.study,
            "storage": self.storage,
            "trials_run": self.trials_run,
            "trials_complete": self.trials_complete,
            "best": {"trial": self.best_trial, "dice": self.best_dice, "tile_f": self.best_tile_f,
                     "params": self.best_params.to_dict()},
            "written_to": str(self.written_to),
            "seconds": {
                "setup": round(self.seconds_setup, 3),
                "first_trial": round(self.seconds_per_trial[0], 3) if self.seconds_per_trial else None,
                "median_later_trial": round(statistics.median(later), 3) if later else None,
            },
            "notes": self.notes,
        }


def tune(
    dataset: str | os.PathLike,
    model: str | os.PathLike | ModelSpec,
    *,
    trials: int = DEFAULT_TRIALS,
    storage: str | None = None,
    study_name: str | None = None,
    split: str | None = DEFAULT_SPLIT,
    max_images: int | None = None,
    method: str | None = None,
    tile: int | None = None,
    seed: int = 0,
    device: str | None = None,
    out: str | os.PathLike | None = None,
    memo_bytes: int = DEFAULT_MEMO_BYTES,
    progress: bool = True,
    output: str | None = None,
    base: str | os.PathLike | None = None,
) -> TuneResult:
    """Run ``trials`` more trials of the study, then write the study's best parameters.

    ``model`` is a model name, a base checkpoint, a fine-tune file or a ModelSpec;
    ``storage`` a SQLAlchemy URL or a SQLite file path (default: beside the model);
    ``study_name`` defaults to ``<model stem>-generator``; ``out`` (default
    ``<model dir>/<model stem>-tune``) receives tune.json, trials.csv, the plots and, for a base
    checkpoint, tuned.pt (served with the checkpoint's decoder ``output``, declared or SAM 2's
    own). ``base`` is the base checkpoint of a fine-tune file that cannot find its own
    (``models.resolve_model``). Every trial decodes with the model's output, as serving does. The first trial of a
    new study evaluates the model's current parameters (clipped into the search space), so the
    result is never worse than the start on these images.
    """
    import optuna

    if trials < 1:
        raise MosaicError(f"tune: --trials must be at least 1 (got {trials})")
    started = time.perf_counter()
    spec = declare_output(model if isinstance(model, ModelSpec) else resolve_model(model, base=base), output)
    model_file = spec.finetune or spec.base_checkpoint
    out = Path(out) if out is not None else model_file.resolve().parent / f"{model_file.stem}-tune"
    study_name = study_name or f"{model_file.stem}-generator"
    url = storage_url(storage, spec)
    protected = [model_file] + ([Path(url[len("sqlite:///"):])] if url.startswith("sqlite:///") else [])
    _check_out(out, protected)

    data, images = load_images(dataset, split, max_images, tile)
    fixed = GeneratorParams.from_dict(spec.generator)
    fixed = fixed if method is None else fixed.replace(method=method)
    space = search_space(images)
    record = {
        "dataset": str(data.root.resolve()), "split": split, "model": str(model_file),
        "images": [item.stem for item in images], "space": space,
        "fixed": {k: v for k, v in fixed.to_dict().items() if k not in SEARCHED},
    }
    study = open_study(url, study_name, record, seed)
    if not study.trials:
        study.enqueue_trial(_clipped(fixed, space))

    engine = open_engine("sam2", spec, device)
    segmenter = CachedSegmenter(engine, memo_bytes)
    seconds_setup = time.perf_counter() - started

    seconds: list[float] = []

    def objective(trial) -> float:
        start = time.perf_counter()
        params = fixed.replace(**suggest(trial, space))
        scores = score_images(segmenter.segment, images, params)
        seconds.append(time.perf_counter() - start)
        trial.set_user_attr("tile_f", scores["tile_f"])
        trial.set_user_attr("iou", scores["iou"])
        trial.set_user_attr("seconds", round(seconds[-1], 3))
        return scores["dice"]

    bar = tqdm(total=trials, desc="tune", unit="trial", disable=None if progress else True)

    def after_trial(study, trial) -> None:
        bar.update()
        try:
            bar.set_postfix_str(f"best Dice {study.best_value:.4f}")
        except ValueError:  # no completed trial yet
            pass

    with bar:
        study.optimize(objective, n_trials=trials, callbacks=[after_trial])

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise MosaicError(f"study {study_name!r}: no trial completed")
    best = study.best_trial
    best_params = fixed.replace(**{k: best.params[k] for k in SEARCHED})
    tuning = {
        "study": study_name, "storage": public_url(url), "dataset": record["dataset"],
        "split": split, "images": len(images), "trials_complete": len(complete),
        "best_trial": best.number, "dice": best.value, "tile_f": best.user_attrs.get("tile_f"),
    }
    written_to = spec.finetune or out / TUNED_NAME
    with atomic_output_dir(out, overwrite=True) as tmp:
        if spec.finetune is None:
            # The decoder output the engine was tuned with is the one tuned.pt is served with.
            save_finetune(tmp / TUNED_NAME, engine.model, base=base_record(spec), generator=best_params.to_dict(),
                          training={"note": UNTRAINED_NOTE, "tuning": tuning}, output=engine.output)
        write_trials_csv(tmp / "trials.csv", study.get_trials(deepcopy=False))
        skipped = write_plots(study, tmp)
        result = TuneResult(
            study=study_name, storage=public_url(url), trials_run=trials,
            trials_complete=len(complete), best_trial=best.number, best_dice=float(best.value),
            best_tile_f=float(best.user_attrs.get("tile_f", math.nan)), best_params=best_params,
            written_to=written_to, out=out, seconds_setup=seconds_setup, seconds_per_trial=seconds,
            notes=[f"{name} skipped: {why}" for name, why in skipped.items()],
        )
        write_json(tmp / SUMMARY_NAME, result.to_json())
    if spec.finetune is not None:  # last: the outputs above are complete
        training = load_finetune(spec.finetune)["training"]
        update_finetune_metadata(spec.finetune, generator=best_params.to_dict(),
                                 training={**training, "tuning": tuning})
    return result
