"""Benchmark fine-tuning: an epoch with the embedding cache against one re-encoding every image.

Same run, same model, same data: synthetic mosaics (toolkit/data/synth.py), one Trainer; after the
cache is built (timed separately) training epochs alternate between reading the cached
features and running the frozen image encoder on every image at every step (what the thesis's
code did). Each variant runs ``--repeats`` times; the fastest of each is reported, with the
ratio re-encoding / cached. One more cached epoch is then profiled by phase
(``Trainer.timings``: data loading, features to the device, decoder forward, loss forward at
full resolution, backward, optimizer; seconds per step). Prints one JSON object.

Without ``--model`` a SAM 2.1 model with RANDOM weights is built (no weights can be downloaded
here; ``--arch`` picks its size): timings do not depend on the weights.

Run: ``.venv/bin/python bench/bench_train.py [--arch sam2.1-large] [--image-size 1024] [--n 6]``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mosaic_toolkit.core.dataset import write_manifest
from mosaic_toolkit.training.trainer import TrainConfig, Trainer
from mosaic_toolkit.data.synth import synth_dataset
from mosaic_toolkit.sam.weights import MODELS

import random_model


def random_checkpoint(arch: str, folder: Path, seed: int) -> Path:
    return random_model.random_checkpoint(folder, arch, seed)


def timed_epoch(trainer: Trainer, epoch: int, use_cache: bool) -> float:
    start = time.perf_counter()
    trainer.train_epoch(epoch, use_cache=use_cache)  # every step ends in loss.item(): synchronised
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="installed model name, checkpoint or fine-tune (default: random weights)")
    ap.add_argument("--arch", default="sam2.1-tiny", choices=sorted(MODELS), help="random-weight model size")
    ap.add_argument("--n", type=int, default=6, help="training images (one more is the val split)")
    ap.add_argument("--size", type=int, default=512, help="longest side of the synthetic images")
    ap.add_argument("--image-size", type=int, default=512, help="model input resolution")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="timed epochs per variant")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        samples = synth_dataset(
            tmp / "data", args.n + 1, seed=args.seed, min_size=args.size, max_size=args.size
        )
        for i, sample in enumerate(samples):
            sample.split = "val" if i == args.n else "train"
        write_manifest(tmp / "data", samples)
        base = args.model or random_checkpoint(args.arch, tmp, args.seed)
        config = TrainConfig(
            epochs=2 * args.repeats + 2, batch_size=args.batch_size, max_prompts=args.max_prompts,
            image_size=args.image_size, seed=args.seed,
        )
        trainer = Trainer(tmp / "data", base, tmp / "run", config, device=args.device, progress=False)

        start = time.perf_counter()
        trainer.prepare()  # builds the embedding cache
        cache_build = time.perf_counter() - start
        timed_epoch(trainer, 0, use_cache=True)  # warm-up (allocator, kernels, page cache)
        cached, reencoded = [], []
        for r in range(args.repeats):
            cached.append(timed_epoch(trainer, 1 + 2 * r, use_cache=True))
            reencoded.append(timed_epoch(trainer, 2 + 2 * r, use_cache=False))
        # Where a cached step spends its time (one more cached epoch, phases timed).
        trainer.timings = {}
        profiled = timed_epoch(trainer, 1 + 2 * args.repeats, use_cache=True)
        phases = {k: round(v / trainer.steps_per_epoch, 3) for k, v in trainer.timings.items()}
        trainer.timings = None
        cache_files = list(trainer.cache.folder.glob("*.pt"))
        cache_mb = sum(f.stat().st_size for f in cache_files) / 2**20 / max(len(cache_files), 1)

    device = trainer.device
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch_threads": torch.get_num_threads(),
        "model": args.model or f"{args.arch} (random weights)",
        "image_size": trainer.model.image_size,
        "image_px": args.size,
        "train_images": args.n,
        "batch_size": args.batch_size,
        "max_prompts": args.max_prompts,
        "steps_per_epoch": trainer.steps_per_epoch,
        "cache_build_s": round(cache_build, 3),
        "cache_mb_per_image": round(cache_mb, 2),
        "epoch_cached_s": round(min(cached), 3),
        "epoch_reencode_s": round(min(reencoded), 3),
        "all_cached_s": [round(t, 3) for t in cached],
        "all_reencode_s": [round(t, 3) for t in reencoded],
        "speedup_cached": round(min(reencoded) / min(cached), 2),
        "cached_step_s": round(profiled / trainer.steps_per_epoch, 3),
        "cached_step_phases_s": phases,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
