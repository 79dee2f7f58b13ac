"""Benchmark issue 16: does a click get what fine-tuning learnt? (decoder output trained vs served)

A random-weight SAM 2.1 tiny (no weights can be downloaded here) is fine-tuned on synthetic
mosaics (``train --output``, default single). Then every tessera of the val images (and of the
train images) is clicked once at its point, and the IoU of the returned mask with the tessera is
averaged, for:

- ``served``: the fine-tune as every path serves it now (its trained output, ``sam.adapter``);
- ``sam2_choice``: the same weights decoded with SAM 2's own choice, what a click did before
  issue 16 (best of the three untrained multimask outputs for a single click);
- ``base``: the base model (SAM 2's own choice, unchanged);
- ``fast_served`` / ``fast_sam2_choice``: the one-mask decoding of the fast path at the same
  points (low-res logits upsampled, > 0), with the trained output vs SAM 2's stability fallback.

Prints one JSON object. Run: ``.venv/bin/python bench/bench_output.py [--epochs 10]``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mosaic_toolkit.core.dataset import Dataset, write_manifest
from mosaic_toolkit.data.synth import synth_dataset
from mosaic_toolkit.sam.engine import Sam2Engine
from mosaic_toolkit.sam.models import load_model, resolve_model
from mosaic_toolkit.training.trainer import TrainConfig, Trainer

import random_model


def click_ious(engine: Sam2Engine, data: Dataset, samples) -> dict[str, float]:
    """Mean IoU of a click (and of the fast path's one-mask decoding) at each tessera's point."""
    clicks, fast = [], []
    for sample in samples:
        image, instances = data.image(sample), data.instances(sample)
        points = np.asarray(data.points(sample), np.float32)
        ids = instances[points[:, 1].astype(int), points[:, 0].astype(int)]
        logits, _ = engine.decode_points(image, points)
        up = F.interpolate(logits[:, None], image.shape[:2], mode="bilinear", align_corners=False)[:, 0] > 0
        for point, tid, low in zip(points, ids, up.numpy()):
            if tid == 0:
                continue
            truth = instances == tid
            mask, _ = engine.predict_points(image, point[None], [1])
            clicks.append((mask & truth).sum() / max(1, (mask | truth).sum()))
            fast.append((low & truth).sum() / max(1, (low | truth).sum()))
    return {"click": float(np.mean(clicks)), "fast": float(np.mean(fast)), "prompts": len(clicks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n", type=int, default=8, help="synthetic images (the last --n-val are the val split)")
    ap.add_argument("--n-val", type=int, default=2)
    ap.add_argument("--size", type=int, default=192, help="longest side of the synthetic images")
    ap.add_argument("--image-size", type=int, default=256, help="model input resolution")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-prompts", type=int, default=32)
    ap.add_argument("--output", default="single", choices=("single", "multimask-first"))
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--splits", default="val,train", help="splits whose tesserae are clicked")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        samples = synth_dataset(tmp / "data", args.n, seed=args.seed, min_size=args.size // 2,
                                max_size=args.size, tessera_size=20)
        for i, s in enumerate(samples):
            s.split = "val" if i >= args.n - args.n_val else "train"
        write_manifest(tmp / "data", samples)
        checkpoint = random_model.random_checkpoint(tmp, seed=args.seed)
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_prompts=args.max_prompts,
                             image_size=args.image_size, val_every=args.epochs, output=args.output,
                             val_params={"points_per_side": 8})
        trainer = Trainer(tmp / "data", checkpoint, tmp / "run", config, progress=False)
        result = trainer.run()
        seconds_train = time.perf_counter() - started
        data = Dataset.open(tmp / "data")
        # The last epoch's weights (the run's model), served three ways.
        model = trainer.model.eval()
        base_spec = resolve_model(checkpoint)
        base_spec.image_size = args.image_size
        base = Sam2Engine(load_model(base_spec, "cpu"), version="base")
        engines = {
            "served": Sam2Engine(model, version="ft", output=args.output),
            "sam2_choice": Sam2Engine(model, version="ft-old", output="sam2"),
            "base": base,
        }
        report = {"output": args.output, "epochs": args.epochs, "image_size": args.image_size,
                  "train_loss_first_last": [result.history[0]["train_loss"], result.history[-1]["train_loss"]],
                  "seconds_train": round(seconds_train, 1)}
        for split in args.splits.split(","):
            for name, engine in engines.items():
                scores = click_ious(engine, data, data.split(split))
                report[f"{split}_click_iou_{name}"] = round(scores["click"], 4)
                report[f"{split}_fast_iou_{name}"] = round(scores["fast"], 4)
                report[f"{split}_prompts"] = scores["prompts"]
            report[f"{split}_tokens_served"] = {str(k): v for k, v in engines["served"].decoded_tokens().items()}
            report[f"{split}_tokens_sam2_choice"] = {
                str(k): v for k, v in engines["sam2_choice"].decoded_tokens().items()}
        report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
