"""Run the GPU paths once and print their figures as JSON (at most ~8 minutes on one GPU).

    python bench/device_check.py                 # SAM 2.1 large, 1024², CUDA (bf16 autocast)
    python bench/device_check.py --smoke         # SAM 2.1 tiny, 128², CPU, CPU bf16 autocast

SAM 2.1 large with RANDOM weights in the official checkpoint format (no weights can be
downloaded; timings and memory are real, masks are meaningless), on a synthetic mosaic:

* ``load``: reading the checkpoint and building the engine (``open_engine``);
* ``encode``: image encoder, cold (first call) and warm (a second image);
* ``click``: one click on the encoded image (embedding cache hit), median of 5;
* ``prelabel``: full-image segmentation of the image, fast and stock paths;
* ``train``: the embedding cache built for the training images, then ``--steps`` optimizer
  steps under the trainer's autocast (bfloat16 on CUDA) with peak GPU memory, the loss finite
  and the weights changed;
* ``tune``: one Optuna trial of ``mosaic-toolkit tune`` on the val image.

Each section runs even when an earlier one failed; its error is reported in the JSON (and the
exit status is 1), so one run on a GPU shows everything that breaks.
``--smoke`` proves the script runs on a CPU-only machine: tiny model, small images, two
steps, and the CPU bfloat16 autocast around the training steps and decoding.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mosaic_toolkit.core.dataset import write_manifest
from mosaic_toolkit.data.synth import synth_dataset, synth_mosaic
from mosaic_toolkit.engines import open_engine
from mosaic_toolkit.sam.models import resolve_model
from mosaic_toolkit.training.config import TrainConfig
from mosaic_toolkit.training.trainer import Trainer
from mosaic_toolkit.training.tune import tune

from random_model import open_filters, random_checkpoint


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return round(time.perf_counter() - start, 4), value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, small images, CPU: prove the script runs")
    ap.add_argument("--device", default=None, help="torch device (default: cuda, or cpu with --smoke)")
    ap.add_argument("--arch", default=None, help="model size (default: sam2.1-large, sam2.1-tiny with --smoke)")
    ap.add_argument("--size", type=int, default=None, help="image and model input side (default 1024, 128 with --smoke)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 10, 2 with --smoke)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and mosaics")
    args = ap.parse_args()
    smoke = args.smoke
    arch = args.arch or ("sam2.1-tiny" if smoke else "sam2.1-large")
    size = args.size or (128 if smoke else 1024)
    steps = args.steps or (2 if smoke else 10)
    device = torch.device(args.device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("device_check: CUDA is not available (use --smoke on a CPU-only machine)", file=sys.stderr)
        return 2
    # On CPU the bf16 path is exercised by the caller's autocast (as the tests do).
    cpu_bf16 = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if device.type == "cpu" else contextlib.nullcontext

    report: dict[str, Any] = {
        "model": f"{arch} (random weights, official checkpoint format)", "image_size": size,
        "device": str(device), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "autocast": "bfloat16 (cuda)" if device.type == "cuda" else "bfloat16 (cpu, caller's autocast)",
        "errors": {},
    }
    began = time.perf_counter()

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        print(f"device_check: {name}...", file=sys.stderr, flush=True)
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the rest still runs
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()

    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp_name:
        tmp = Path(tmp_name)
        ckpt = random_checkpoint(tmp, arch, args.seed)
        rng = np.random.default_rng(args.seed)
        image, _ = synth_mosaic(rng, size, size)
        other, _ = synth_mosaic(rng, size, size)
        state: dict[str, Any] = {}

        def load() -> dict[str, Any]:
            seconds, engine = timed(device, lambda: open_engine(
                "sam2", str(ckpt), str(device), cache_bytes=2**30, image_size=size))
            state["engine"] = engine
            return {"seconds": seconds}

        def encode() -> dict[str, Any]:
            engine = state["engine"]
            with cpu_bf16():
                cold, _ = timed(device, lambda: engine.encode(image))
                warm, _ = timed(device, lambda: engine.encode(other))
            return {"cold_s": cold, "warm_s": warm}

        def click() -> dict[str, Any]:
            engine = state["engine"]
            with cpu_bf16():
                engine.encode(image)
                times = [timed(device, lambda: engine.predict_points(image, [[size / 2, size / 2]], [1]))[0]
                         for _ in range(5)]
            return {"warm_click_s": round(statistics.median(times), 4)}

        def prelabel() -> dict[str, Any]:
            engine = state["engine"]
            params = open_filters(engine, image, engine.params)
            out = {}
            for method in ("fast", "stock"):
                chosen = params.replace(method=method, **({"points_per_side": 8, "crop_n_layers": 0} if smoke else {}))
                seconds, instances = timed(device, lambda: engine.segment(image, chosen))
                out[method] = {"seconds": seconds, "instances": int(instances.max())}
            return out

        data = tmp / "data"

        def train() -> dict[str, Any]:
            samples = synth_dataset(data, 4, seed=args.seed, min_size=size // 2, max_size=size,
                                    tessera_size=max(12, size // 24))
            for sample, split in zip(samples, ("train", "train", "train", "val")):
                sample.split = split
            write_manifest(data, samples)
            config = TrainConfig(epochs=1, batch_size=2, lr=1e-4, max_prompts=64, image_size=size)
            trainer = Trainer(data, ckpt, tmp / "run", config, device=device, progress=False)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            cache_s, _ = timed(device, trainer.prepare)
            before = [p.detach().clone() for p in trainer.trainable]
            losses, times = [], []
            while len(times) < steps:
                for items in trainer._loader(len(times)):
                    with cpu_bf16():
                        seconds, stats = timed(device, lambda: trainer.train_step(items, use_cache=True))
                    losses.append(stats["loss"])
                    times.append(seconds)
                    if len(times) == steps:
                        break
            changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, trainer.trainable))
            out = {
                "cache_build_s": cache_s, "steps": steps, "step_s_median": round(statistics.median(times), 4),
                "first_step_s": times[0], "loss_first": round(losses[0], 5), "loss_last": round(losses[-1], 5),
                "loss_finite": bool(np.isfinite(losses).all()), "trainable_tensors_changed": changed,
                "trainable_tensors": len(before),
            }
            if device.type == "cuda":
                out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            if not out["loss_finite"] or changed == 0:
                raise RuntimeError(f"training did not run properly: {out}")
            return out

        def tune_trial() -> dict[str, Any]:
            spec = dataclasses.replace(resolve_model(ckpt), image_size=size)
            seconds, result = timed(device, lambda: tune(
                data, spec, trials=1, storage=f"sqlite:///{tmp / 'study.db'}", split="val",
                device=str(device), out=tmp / "tune", progress=False))
            return {"seconds": seconds, "setup_s": round(result.seconds_setup, 3),
                    "trial_s": [round(s, 3) for s in result.seconds_per_trial],
                    "best_dice": round(result.best_dice, 4)}

        for name, fn in (("load", load), ("encode", encode), ("click", click), ("prelabel", prelabel),
                         ("train", train), ("tune", tune_trial)):
            if name in ("encode", "click", "prelabel") and "engine" not in state:
                report["errors"][name] = "skipped: the model did not load"
                continue
            section(name, fn)
    report["total_s"] = round(time.perf_counter() - began, 2)
    print(json.dumps(report, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
