"""Fine-tuning SAM 2's prompt encoder and mask decoder on a dataset (the thesis's recipe).

The recipe (docs/training.md describes it for users):

* the image encoder is frozen; only the prompt encoder and the mask decoder are trained, so a run
  produces a small fine-tune file (``models.save_finetune``);
* every tessera of a training image is a prompt: one positive point, its point from
  ``points/``. An image with thousands of tesserae is capped at ``max_prompts`` prompts per step,
  drawn without replacement by a generator seeded with ``(seed, epoch, image index)``;
* each prompt is decoded to one mask, through the decoder output ``output`` (default "single":
  SAM 2's single-mask token 0; "multimask-first": token 1, the thesis's
  ``multimask_output=True`` + ``prd_masks[:, 0]``). Only that output's heads learn; the file
  records it and every path serves it and no other (``sam.adapter``, "Decoder outputs"):
  clicks, the fast and stock paths, tuning, and this trainer's validation. The other three
  outputs are not trained (SAM's own recipe would train all three multimask outputs and back-
  propagate the lowest loss; we serve one mask per prompt, so we train that one). Its
  low-resolution logits are upsampled bilinearly to the *original image size*, as at inference
  and as in the thesis, and compared there with that tessera's mask from ``instances/``:
  ``loss = Dice(sigmoid(logits), tessera) + score_weight * |predicted IoU - IoU(logits > 0, tessera)|``
  (the IoU target is detached). The loss is averaged over the prompts of an image, then over the
  images of the batch;
* AdamW over the trainable parameters; the learning rate follows a cosine from ``lr`` down to
  ``min_lr`` over all optimizer steps of the run;
* after each epoch (every ``val_every`` epochs, and always after the last) validation measures
  the prompted score (mean IoU of the mask decoded at each validation tessera's point: the
  training objective on held-out images) and the prompt-free segmentation Dice (every
  validation image segmented by ``Sam2Engine.segment``, as at inference). The kept epoch
  (``finetune.pt``) follows ``selection.compare``: segmentation Dice first when it
  discriminates (differs by more than ``selection.DICE_TOLERANCE``), the prompted score
  otherwise, ties to the later epoch.

Speed: the encoder is frozen, so each training image's features are computed once and stored
in ``RUN_DIR/cache`` (fp16; the file name carries a key made of the base checkpoint's sha256,
the model config, the input resolution and the image file's sha256, so a stale entry is never
read). ``cache_embeddings=False`` re-encodes every image at every step instead (the baseline
that bench/bench_train.py compares against). A cached step is then the decoder's work, whose
cost is per prompt (sam2 runs the two-way transformer and the upscaling on a copy of the image
tokens per prompt); the part of it that does not depend on the prompt (the image side of the
first transformer layer) runs once per image (``sam.adapter.predict_masks_shared_image``:
the same values, ~23 % fewer FLOPs per prompt).

A run folder holds::

    finetune.pt     the best epoch's fine-tune file (loadable by segment and the backend)
    last.pt         the state to resume from: completed epochs, trainable weights, optimizer and
                    scheduler state, history, best so far, the run's configuration
    metrics.csv     one row per completed epoch
    training.png    training loss, validation Dice and prompted IoU per epoch
    tb/             TensorBoard logs (loss terms and learning rate per step, epoch summaries)
    cache/          the embedding cache

Every file is written atomically (a temporary sibling renamed into place), so killing the run
at any moment leaves each file either complete or absent/old. ``resume=True`` continues from
the last completed epoch; the data order and the prompts drawn are pure functions of
``(seed, epoch)``, so a resumed run repeats exactly what an uninterrupted one does.

Under ``torchrun --nproc-per-node N`` the same call trains with DistributedDataParallel:
``batch_size`` images per process and step (the effective batch is N x batch_size), the
training images are split between processes by a DistributedSampler, validation images too
(their Dice is summed across processes), and only rank 0 writes files and shows progress.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..core.dataset import Dataset, mask_foreground
from ..core.io import atomic_file
from ..sam.adapter import PromptDecoder, Sam2Adapter, autocast
from ..sam.engine import Sam2Engine
from ..sam.params import GeneratorParams
from ..core.errors import InternalError, MosaicError
from ..evaluation.metrics import pixel_metrics
from ..sam.models import (
    FINETUNE_PREFIXES,
    ModelSpec,
    base_record,
    checkpoint_sha256,
    file_sha256,
    finetune_state_dict,
    load_model,
    model_version,
    pick_device,
    resolve_model,
    save_finetune,
    update_finetune_metadata,
)
from .config import DEFAULTS, TrainConfig
from .data import EmbeddingCache, TrainImages, _as_list
from .distributed import dist_info_from_env, distributed, steps_per_epoch
from .losses import prompt_losses
from .selection import DICE_KEY, DICE_TOLERANCE, PROMPT_KEY, compare, describe
from .outputs import (
    CACHE_DIR,
    FINETUNE_NAME,
    METRICS_NAME,
    PLOT_NAME,
    RUN_FILES,
    STATE_FORMAT,
    STATE_NAME,
    STATE_VERSION,
    TB_DIR,
    plot_history,
    write_metrics_csv,
    _lookup,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a (possibly partial) run achieved."""

    run_dir: Path
    finetune: Path | None  # the best epoch's fine-tune file (None before any validation)
    best_epoch: int | None
    best_dice: float | None
    epochs_completed: int
    finished: bool  # all configured epochs are done
    history: list[dict[str, Any]]
    best_scores: dict[str, float] | None = None  # the kept epoch's val_dice and val_prompt_iou


# --------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------
def decode_items(
    decoder: nn.Module, sam: Sam2Adapter, items: Sequence[Mapping[str, Any]],
    feats: Sequence[Sequence[torch.Tensor]], device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode each item's prompt points on its features: (low-res logits K x h x w, IoU K) each.

    Points are mapped to model-input coordinates by the adapter, as the engine maps clicks, so
    training decodes exactly what serving decodes.
    """
    batch = []
    for item, f in zip(items, feats):
        coords = sam.model_coords(item["points"].to(device, torch.float32), tuple(item["hw"]))
        batch.append((f[0], f[1:], coords))
    return decoder(batch)


def batch_loss(
    items: Sequence[Mapping[str, Any]], outputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    score_weight: float, device: torch.device, dice_mode: str = "prompt",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, Dice loss, score loss) of a batch: per-prompt terms (``prompt_losses``, against
    each prompt's tessera of the item's instance map) averaged over the prompts of an image,
    then over the images. ``dice_mode`` "image" takes one Dice over an image's prompts instead
    (``prompt_losses(pooled=True)``)."""
    dice_terms, score_terms = [], []
    for item, (logits, iou) in zip(items, outputs):
        instances = item["instances"].to(device)
        targets = instances[None] == item["ids"].to(device)[:, None, None]
        dice, score = prompt_losses(logits, iou, targets, pooled=dice_mode == "image")
        dice_terms.append(dice.mean())
        score_terms.append(score.mean())
    dice_loss = torch.stack(dice_terms).mean()
    score_loss = torch.stack(score_terms).mean()
    return dice_loss + score_weight * score_loss, dice_loss, score_loss


def freeze_all_but_decoder(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every parameter outside the prompt encoder and mask decoder; return the others."""
    trainable = []
    for name, param in model.named_parameters():
        keep = name.startswith(FINETUNE_PREFIXES)
        param.requires_grad_(keep)
        if keep:
            trainable.append(param)
    return trainable


class FeatureEncoder:
    """Runs the frozen image encoder (``Sam2Adapter.encode_batch``) without gradients.

    Features are ``[image_embed 1xCxhxw, high_res_0, high_res_1]`` per image, as the predictor
    keeps them after ``set_image`` (no-memory embedding added).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sam = Sam2Adapter(model)

    def __call__(self, images: Sequence[np.ndarray]) -> list[list[torch.Tensor]]:
        with torch.no_grad(), autocast(self.model.device):
            return self.sam.encode_batch(images)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """One training run in ``run_dir``; ``run()`` trains, validates and writes the outputs.

    The pieces (``prepare``, ``train_epoch``, ``validate``) are public so the benchmark can time
    an epoch with and without the embedding cache on the same model and data.
    """

    def __init__(
        self,
        dataset: str | os.PathLike | Dataset,
        base: str | os.PathLike | ModelSpec,
        run_dir: str | os.PathLike,
        config: TrainConfig | None = None,
        *,
        device: str | torch.device | None = None,
        resume: bool = False,
        overwrite: bool = False,
        cache_embeddings: bool = True,
        cache_dir: str | os.PathLike | None = None,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        self.config = config or TrainConfig()
        self.data = dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.cache_embeddings = cache_embeddings
        self.num_workers = int(num_workers)
        self.progress = progress
        self.dist = dist_info_from_env()

        # Images without tesserae give no prompts (-1: count unknown, no manifest).
        self.train_samples = [
            s for s in self.data.split("train")
            if (s.tesserae if s.tesserae >= 0 else len(self.data.points(s))) > 0
        ]
        self.val_samples = self.data.split("val")
        if not self.train_samples:
            raise MosaicError(f"{self.data.root}: no training images with tesserae (split \"train\")")
        if not self.val_samples:
            raise MosaicError(
                f"{self.data.root}: no validation images (split \"val\"); they choose the best epoch"
            )
        self.state_path = self._check_run_dir()  # before the slow set-up: fail fast

        self.spec = base if isinstance(base, ModelSpec) else resolve_model(base)
        if self.config.image_size is not None:
            self.spec = dataclasses.replace(self.spec, image_size=self.config.image_size)
        self.device = self._pick_device(device)
        self.base_sha256 = checkpoint_sha256(self.spec.base_checkpoint)
        self.model = load_model(self.spec, "cpu").to(self.device)
        self.trainable = freeze_all_but_decoder(self.model)
        self.decoder = PromptDecoder(self.model, self.config.output)
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=self.config.lr, weight_decay=self.config.weight_decay,
            fused=self.device.type in ("cuda", "cpu"),  # one kernel for all tensors: ~5x faster
        )
        self.steps_per_epoch = steps_per_epoch(
            len(self.train_samples), self.config.batch_size, self.dist.world_size
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=self.config.epochs * self.steps_per_epoch, eta_min=self.config.final_lr
        )
        self.encoder = FeatureEncoder(self.model)
        self.cache = EmbeddingCache(
            Path(cache_dir) if cache_dir is not None else self.run_dir / CACHE_DIR,
            f"{self.base_sha256}|{self.spec.config}|{self.model.image_size}",
        )
        self.hashes = (
            [file_sha256(self.data.image_path(s)) for s in self.train_samples] if cache_embeddings else None
        )
        self.images = TrainImages(
            self.data, self.train_samples, self.hashes, self.cache if cache_embeddings else None,
            self.config.max_prompts, self.config.seed,
        )
        self.val_params = GeneratorParams.from_dict({**self.spec.generator, **self.config.val_params})
        # Validation decodes with the output being trained, as the fine-tune will be served.
        self.val_engine = Sam2Engine(self.model, version=model_version(self.spec), params=self.val_params,
                                     output=self.config.output)
        self.ddp: nn.Module = self.decoder
        #: Seconds per phase of the training steps (data, decoder, loss, backward, optimizer),
        #: accumulated when set to a dict (bench/bench_train.py profiles a cached step with it).
        self.timings: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []
        self.best_epoch: int | None = None
        self.best_dice: float | None = None
        self.best_scores: dict[str, float] | None = None
        self.start_epoch = 0

    # ---------------------------------------------------------------- set-up
    def _pick_device(self, device: str | torch.device | None) -> torch.device:
        """The requested device; under torchrun, CUDA means this process's local GPU."""
        dev = pick_device(device)
        if self.dist.enabled and dev.type == "cuda":
            dev = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(dev)
        return dev

    def run_metadata(self) -> dict[str, Any]:
        """What must match for a resume: data, base weights, hyper-parameters, process count."""
        return {
            "dataset": str(self.data.root.resolve()),
            "base_checkpoint": str(self.spec.base_checkpoint.resolve()),
            "base_sha256": self.base_sha256,
            "base_finetune": str(self.spec.finetune.resolve()) if self.spec.finetune else None,
            "config": self.config.to_dict(),
            "world_size": self.dist.world_size,
        }

    def _check_run_dir(self) -> Path | None:
        """Validate RUN_DIR against resume/overwrite; return last.pt when resuming from one."""
        out = self.run_dir
        if out.exists() and not out.is_dir():
            raise MosaicError(f"{out}: exists and is not a folder")
        state = out / STATE_NAME
        if self.resume:
            if state.is_file():
                return state
            log.info("%s: no %s yet, starting from the first epoch", out, STATE_NAME)
            return None
        present = [p.name for p in out.iterdir()] if out.is_dir() else []
        if present and not self.overwrite:
            raise MosaicError(
                f"{out}: folder exists and is not empty (use --resume to continue the run "
                f"or --overwrite to start afresh)"
            )
        return None

    def _clear_run_files(self) -> None:
        for name in RUN_FILES:
            path = self.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def _load_state(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            raise MosaicError(f"{path}: cannot read the training state ({exc})") from exc
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise MosaicError(f"{path}: not a training state file")
        if state.get("version") != STATE_VERSION:
            raise MosaicError(f"{path}: training state version {state.get('version')!r} is not supported")
        recorded, current = state["run"], self.run_metadata()
        recorded["config"].setdefault("output", "single")  # runs from before train --output: token 0
        recorded["config"].setdefault("dice", "prompt")  # runs from before train --dice
        differ = sorted(k for k in current if k != "config" and recorded.get(k) != current[k])
        differ += sorted(
            f"config.{k}" for k in current["config"] if recorded["config"].get(k) != current["config"][k]
        )
        if differ:
            detail = "; ".join(
                f"{k}: was {_lookup(recorded, k)!r}, now {_lookup(current, k)!r}" for k in differ[:4]
            )
            raise MosaicError(f"{path}: cannot resume with different settings ({detail})")
        self.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = list(state["history"])
        self.best_epoch, self.best_dice = state["best_epoch"], state["best_dice"]
        self.best_scores = state.get("best_scores")
        self.start_epoch = int(state["epochs_completed"])

    def _save_state(self) -> None:
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "epochs_completed": len(self.history),
            "run": self.run_metadata(),
            "trainable": finetune_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_dice": self.best_dice,
            "best_scores": self.best_scores,
        }
        with atomic_file(self.run_dir / STATE_NAME) as tmp:
            torch.save(state, tmp)

    def prepare(self) -> None:
        """Check RUN_DIR, load a resume state, start DDP wrapping, fill the embedding cache."""
        self._barrier()  # every rank has looked at RUN_DIR before rank 0 changes it
        if self.state_path is not None:
            self._load_state(self.state_path)
            if self.progress and self.dist.is_main:
                print(f"resuming {self.run_dir} after epoch {self.start_epoch}", file=sys.stderr)
        elif self.dist.is_main and self.overwrite and self.run_dir.is_dir():
            self._clear_run_files()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # Unused on purpose: the object-score head, box and mask-prompt embeddings.
            self.ddp = DistributedDataParallel(
                self.decoder, device_ids=ids, find_unused_parameters=True
            )
        if self.cache_embeddings and self.start_epoch < self.config.epochs:
            self.build_cache()
        self._barrier()

    def build_cache(self) -> None:
        """Encode every training image not yet in the cache (each process its share)."""
        todo = [
            i for i in range(self.dist.rank, len(self.train_samples), self.dist.world_size)
            if not self.cache.has(self.train_samples[i].stem, self.hashes[i])
        ]
        if not todo:
            return
        bar = tqdm(total=len(todo), desc="encoding", unit="image", disable=self._bar_disabled())
        for start in range(0, len(todo), self.config.batch_size):
            chunk = todo[start : start + self.config.batch_size]
            images = [self.data.image(self.train_samples[i]) for i in chunk]
            for i, feats in zip(chunk, self.encoder(images)):
                self.cache.save(self.train_samples[i].stem, self.hashes[i], feats)
            bar.update(len(chunk))
        bar.close()

    # ---------------------------------------------------------------- training
    def _bar_disabled(self) -> bool | None:
        return None if (self.progress and self.dist.is_main) else True

    def _loader(self, epoch: int) -> torch.utils.data.DataLoader:
        sampler = torch.utils.data.DistributedSampler(
            self.images, num_replicas=self.dist.world_size, rank=self.dist.rank,
            shuffle=True, seed=self.config.seed, drop_last=False,
        )
        sampler.set_epoch(epoch)
        self.images.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            self.images, batch_size=self.config.batch_size, sampler=sampler,
            num_workers=self.num_workers, collate_fn=_as_list,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device)

    def _tick(self, phase: str, since: float) -> float:
        """Add the time since ``since`` to ``phase`` (when profiling); return the time now."""
        if self.timings is None:
            return since
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - since
        return now

    def train_step(self, items: list[dict[str, Any]], use_cache: bool) -> dict[str, float]:
        """One optimizer step on a batch of images; returns its mean loss terms."""
        t = time.perf_counter()
        if use_cache:
            feats = [[t.to(self.device, torch.float32) for t in item["features"]] for item in items]
            t = self._tick("features to device", t)
        else:
            feats = self.encoder([item["image"] for item in items])
            t = self._tick("encoder", t)
        self.decoder.train()
        with self._autocast():
            outputs = decode_items(self.ddp, self.encoder.sam, items, feats, self.device)
        t = self._tick("decoder forward", t)
        loss, dice_loss, score_loss = batch_loss(items, outputs, self.config.score_weight, self.device,
                                                 self.config.dice)
        t = self._tick("loss forward (full resolution)", t)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t = self._tick("backward", t)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self._tick("optimizer", t)
        return {"loss": loss.item(), "dice_loss": dice_loss.item(), "score_loss": score_loss.item(), "lr": lr}

    def train_epoch(
        self, epoch: int, use_cache: bool | None = None, bar: tqdm | None = None, writer: Any = None
    ) -> dict[str, float]:
        """One pass over the training images (``epoch`` counts from 0); mean loss terms.

        ``use_cache`` defaults to the run's setting; False re-encodes every image at every step.
        """
        use_cache = self.cache_embeddings if use_cache is None else use_cache
        if use_cache and not self.cache_embeddings:
            raise InternalError("train: this run has no embedding cache")
        self.images.use_cache = use_cache
        sums = {"loss": 0.0, "dice_loss": 0.0, "score_loss": 0.0}
        steps, lr = 0, self.optimizer.param_groups[0]["lr"]
        waited = time.perf_counter()
        for items in self._loader(epoch):
            self._tick("data loading", waited)
            stats = self.train_step(items, use_cache)
            steps += 1
            lr = stats["lr"]
            for k in sums:
                sums[k] += stats[k]
            if writer is not None:
                step = epoch * self.steps_per_epoch + steps
                for k, v in stats.items():
                    writer.add_scalar(f"train/{k}", v, step)
            if bar is not None:
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
            waited = time.perf_counter()
        means = self._all_mean({k: v / max(steps, 1) for k, v in sums.items()})
        return {**means, "lr": lr}

    def validate(self) -> dict[str, float]:
        """Validation scores of the current weights (see ``selection``):

        ``val_dice``: mean pixel Dice of prompt-free segmentation over the validation images;
        ``val_prompt_iou``: mean IoU, over every validation tessera, of the mask decoded at its
        point (upsampled to the image size, logits > 0) against that tessera.
        """
        self.model.eval()
        total, count, iou_sum, iou_count = 0.0, 0, 0.0, 0
        mine = self.val_samples[self.dist.rank :: self.dist.world_size]
        for sample in tqdm(mine, desc="validation", unit="image", leave=False, disable=self._bar_disabled()):
            image = self.data.image(sample)
            pred = self.val_engine.segment(image) > 0
            total += pixel_metrics(pred, mask_foreground(self.data.mask(sample)))["dice"]
            count += 1
            s, n = self.prompted_iou(image, self.data.instances(sample), self.data.points(sample))
            iou_sum, iou_count = iou_sum + s, iou_count + n
        if self.dist.enabled:
            sums = torch.tensor([total, float(count), iou_sum, float(iou_count)], dtype=torch.float64,
                                device=self.device)
            dist.all_reduce(sums)
            total, count, iou_sum, iou_count = float(sums[0]), int(sums[1]), float(sums[2]), int(sums[3])
        return {DICE_KEY: total / count, PROMPT_KEY: iou_sum / max(iou_count, 1)}

    def prompted_iou(self, image: np.ndarray, instances: np.ndarray, points: Sequence[Sequence[int]],
                     chunk: int = 32) -> tuple[float, int]:
        """(sum of IoUs, count) of the masks decoded at each tessera's point (tessera k+1 at
        ``points[k]``), by the engine's decoder on the engine's cached features."""
        points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        if len(points) == 0:
            return 0.0, 0
        logits, _ = self.val_engine.decode_points(image, points)
        truth = torch.from_numpy(np.ascontiguousarray(instances))
        total = 0.0
        for start in range(0, len(points), chunk):
            low = logits[start : start + chunk].float()
            pred = F.interpolate(low[:, None], size=truth.shape, mode="bilinear", align_corners=False)[:, 0] > 0
            ids = torch.arange(start + 1, start + len(low) + 1, dtype=truth.dtype)
            target = truth[None] == ids[:, None, None]
            both = (pred & target).flatten(1).sum(1).double()
            either = (pred | target).flatten(1).sum(1).double()
            total += float((both / either.clamp(min=1)).sum())
        return total, len(points)

    def _all_mean(self, values: dict[str, float]) -> dict[str, float]:
        if not self.dist.enabled:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.dist.world_size for k, v in zip(keys, t)}

    def _barrier(self) -> None:
        if self.dist.enabled:
            dist.barrier()

    # ---------------------------------------------------------------- run
    def training_summary(self) -> dict[str, Any]:
        """The "training" metadata of the fine-tune file."""
        return {
            "dataset": str(self.data.root.resolve()),
            "n_train": len(self.train_samples),
            "n_val": len(self.val_samples),
            "epochs": self.config.epochs,
            "epochs_completed": len(self.history),
            "best_epoch": self.best_epoch,
            "best_val_dice": self.best_dice,
            "best_val_prompt_iou": (self.best_scores or {}).get(PROMPT_KEY),
            "selection": "segmentation Dice when it differs by more than "
                         f"{DICE_TOLERANCE}, else the prompted IoU; ties to the later epoch",
            "hyperparameters": self.config.to_dict(),
            "processes": self.dist.world_size,
            "effective_batch_size": self.config.batch_size * self.dist.world_size,
            "validation_generator": self.val_params.to_dict(),
            "history": self.history,
        }

    def _save_finetune(self) -> None:
        base = base_record(self.spec, self.base_sha256)
        save_finetune(self.run_dir / FINETUNE_NAME, self.model, base=base, generator=None,
                      training=self.training_summary(), output=self.config.output)

    def _write_reports(self) -> None:
        write_metrics_csv(self.run_dir / METRICS_NAME, self.history)
        plot_history(self.run_dir / PLOT_NAME, self.history)

    def run(self, stop_after_epoch: int | None = None) -> RunResult:
        """Train from the start (or the resume point) to the last epoch.

        ``stop_after_epoch`` ends the run after that epoch (counted from 1) as if it had been
        killed there; ``resume`` continues it.
        """
        self.prepare()
        cfg = self.config
        writer = None
        if self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its last saved epoch.
            writer = SummaryWriter(
                str(self.run_dir / TB_DIR), purge_step=self.start_epoch * self.steps_per_epoch + 1
            )
            if self.history:
                self._write_reports()
        last = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
        bar = tqdm(
            total=max(0, last - self.start_epoch) * self.steps_per_epoch, unit="step",
            disable=self._bar_disabled(), dynamic_ncols=True,
        )
        try:
            for epoch in range(self.start_epoch, last):
                bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
                started = time.perf_counter()
                stats = self.train_epoch(epoch, bar=bar, writer=writer)
                number = epoch + 1
                scores = None
                if number % cfg.val_every == 0 or number == cfg.epochs:
                    scores = self.validate()
                val_dice = None if scores is None else scores[DICE_KEY]
                row = {
                    "epoch": number,
                    "train_loss": stats["loss"],
                    "dice_loss": stats["dice_loss"],
                    "score_loss": stats["score_loss"],
                    "val_dice": val_dice,
                    "val_prompt_iou": None if scores is None else scores[PROMPT_KEY],
                    "lr": stats["lr"],
                    "seconds": round(time.perf_counter() - started, 3),
                }
                self.history.append(row)
                # Ties go to the later epoch (see selection.py).
                improved = scores is not None and compare(scores, self.best_scores) >= 0
                if improved:
                    self.best_epoch, self.best_dice, self.best_scores = number, val_dice, dict(scores)
                if self.dist.is_main:
                    if improved:
                        self._save_finetune()
                    self._save_state()
                    self._write_reports()
                    step = number * self.steps_per_epoch
                    writer.add_scalar("epoch/train_loss", row["train_loss"], step)
                    writer.add_scalar("epoch/lr", row["lr"], step)
                    if val_dice is not None:
                        writer.add_scalar("epoch/val_dice", val_dice, step)
                        writer.add_scalar("epoch/val_prompt_iou", scores[PROMPT_KEY], step)
                    writer.flush()
                    if self.progress:
                        bar.write(
                            f"epoch {number}/{cfg.epochs}: loss {row['train_loss']:.4f}"
                            + (f", val {describe(scores)}" if scores is not None else "")
                            + (" (best)" if improved else ""),
                            file=sys.stderr,
                        )
                self._barrier()
            finished = len(self.history) >= cfg.epochs
            if finished and self.dist.is_main and self.best_epoch is not None:
                update_finetune_metadata(self.run_dir / FINETUNE_NAME, training=self.training_summary())
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        self._barrier()
        ft = self.run_dir / FINETUNE_NAME
        return RunResult(
            run_dir=self.run_dir,
            finetune=ft if self.best_epoch is not None else None,
            best_epoch=self.best_epoch,
            best_dice=self.best_dice,
            epochs_completed=len(self.history),
            finished=finished,
            history=list(self.history),
            best_scores=self.best_scores,
        )


def train(
    dataset: str | os.PathLike | Dataset,
    base: str | os.PathLike | ModelSpec,
    out: str | os.PathLike,
    *,
    epochs: int = DEFAULTS.epochs,
    batch_size: int = DEFAULTS.batch_size,
    lr: float = DEFAULTS.lr,
    min_lr: float | None = DEFAULTS.min_lr,
    weight_decay: float = DEFAULTS.weight_decay,
    score_weight: float = DEFAULTS.score_weight,
    max_prompts: int = DEFAULTS.max_prompts,
    device: str | torch.device | None = None,
    resume: bool = False,
    overwrite: bool = False,
    seed: int = DEFAULTS.seed,
    image_size: int | None = DEFAULTS.image_size,
    val_every: int = DEFAULTS.val_every,
    val_params: Mapping[str, Any] | None = None,
    num_workers: int = 0,
    cache_embeddings: bool = True,
    cache_dir: str | os.PathLike | None = None,
    stop_after_epoch: int | None = None,
    progress: bool = True,
    output: str = DEFAULTS.output,
    dice: str = DEFAULTS.dice,
) -> RunResult:
    """Fine-tune the prompt encoder and mask decoder of ``base`` on ``dataset`` into ``out``.

    See the module docstring for the recipe and the run folder. Works alone or under torchrun
    (DistributedDataParallel; the process group is joined and left here).
    """
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
        score_weight=score_weight, max_prompts=max_prompts, seed=seed, image_size=image_size,
        val_every=val_every, val_params=dict(val_params or {}), output=output, dice=dice,
    )
    torch.manual_seed(seed)
    with distributed(device):
        trainer = Trainer(
            dataset, base, out, config, device=device, resume=resume, overwrite=overwrite,
            cache_embeddings=cache_embeddings, cache_dir=cache_dir, num_workers=num_workers,
            progress=progress,
        )
        return trainer.run(stop_after_epoch=stop_after_epoch)
