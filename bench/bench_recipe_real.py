"""The fine-tuning recipe checked on the real photograph: one short run per variant; prints JSON.

Builds the same data as ``bench_finetune_real.py`` (train band crops, val crops of the val band,
from ``--shared``), then for each variant of the recipe trains the real base from scratch with
the same seed, data order and prompts, and measures after every epoch the mean IoU of a click at
every val tessera's point through the trained single output (the served click). Variants (each
changes one thing from the reference):

- ``reference``: lr ``--lr``, weight decay 1e-5, Dice per prompt;
- ``wd_1e-4``: weight decay 1e-4 (the trainer's earlier default);
- ``dice_image``: one Dice over all prompts of an image (the thesis's);
- ``lr_half`` / ``lr_double``: half / twice the learning rate;
- ``prompts_double``: twice the prompts per image and step (twice the cost per epoch).

Validation by whole-image segmentation is left out (it does not change with these variants'
training and costs more than the training here), so this measures the click only. Runs at a
reduced input resolution (``--image-size``, default 512) to fit; the ranking is what counts.

Run: ``.venv/bin/python bench/bench_recipe_real.py --base sam2_hiera_tiny.pt --out DIR``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_finetune_real as real  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shared", type=Path, default=real.DEFAULT_SHARED)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--transforms", default="identity,hflip")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", type=Path, default=None, help="embedding cache to reuse (default OUT/cache)")
    ap.add_argument("--variants", default="reference,wd_1e-4,dice_image,lr_half,lr_double")
    args = ap.parse_args()
    if not (args.shared / real.PHOTO / "images").is_dir():
        real.fail(f"{args.shared / real.PHOTO}: the real photograph is not there (give --shared PATH)")
    import torch

    from mosaic_toolkit.training.config import TrainConfig
    from mosaic_toolkit.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    data_args = real.parse_args(["--base", args.base, "--out", str(args.out), "--shared", str(args.shared),
                                 "--transforms", args.transforms])
    args.out.mkdir(parents=True, exist_ok=True)
    data = real.build_data(data_args, args.out)
    variants = {
        "reference": {}, "wd_1e-4": {"weight_decay": 1e-4}, "dice_image": {"dice": "image"},
        "lr_half": {"lr": args.lr / 2}, "lr_double": {"lr": args.lr * 2},
        "prompts_double": {"max_prompts": args.max_prompts * 2},
    }
    result = {"data": data, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "variants": {}}
    for name in args.variants.split(","):
        config = TrainConfig(**{"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                                "weight_decay": 1e-5, "max_prompts": args.max_prompts,
                                "image_size": args.image_size, **variants[name]})
        torch.manual_seed(0)
        started = time.perf_counter()
        trainer = Trainer(args.out / "data", args.base, args.out / f"run_{name}", config,
                          cache_dir=args.cache_dir or args.out / "cache", progress=False, overwrite=True)
        trainer.prepare()
        val = trainer.val_samples

        def click() -> float:
            trainer.model.eval()
            trainer.val_engine.clear_cache()
            total = count = 0
            for s in val:
                t, n = trainer.prompted_iou(trainer.data.image(s), trainer.data.instances(s), trainer.data.points(s))
                total, count = total + t, count + n
            return round(total / count, 4)

        curve = [{"epoch": 0, "click": click()}]
        print(name, curve[-1], file=sys.stderr, flush=True)
        for epoch in range(args.epochs):
            stats = trainer.train_epoch(epoch)
            curve.append({"epoch": epoch + 1, "loss": round(stats["loss"], 4), "click": click()})
            print(name, curve[-1], file=sys.stderr, flush=True)
        result["variants"][name] = {"changes": variants[name], "curve": curve,
                                    "best_click": max(c["click"] for c in curve),
                                    "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
