"""Benchmark the SAM 2 engine; prints one JSON object.

* Click latency: a cold click (image encoder + decoder) against warm clicks on the same image
  (embedding cache hit: prompt encoder + mask decoder only), median of several clicks.
* Full-image segmentation: the stock generator path against the fast path on the same synthetic
  mosaic (toolkit/data/synth.py), time and pixel Dice / per-tessera F against its ground truth.

Without ``--model`` a SAM 2.1 tiny with RANDOM weights is used (no weights can be downloaded
here): timings are representative of tiny, but Dice and F are meaningless, and the thresholds are
opened up (quality filters off, mask threshold at the median logit) so that random masks pass
and both paths do their full work. With ``--model`` (an installed name, a checkpoint or a
fine-tune) the model's own parameters are used.

Run: ``.venv/bin/python bench/bench_engine.py [--image-size 1024] [--points-per-side 16]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from mosaic_toolkit.core.dataset import tessera_points
from mosaic_toolkit.sam.engine import Sam2Engine
from mosaic_toolkit.sam.fast import tessera_prompts, tile_interior
from mosaic_toolkit.sam.params import GeneratorParams
from mosaic_toolkit.evaluation.metrics import pixel_metrics, tile_metrics
from mosaic_toolkit.data.synth import synth_mosaic

from random_model import RANDOM_MODEL, open_filters, random_engine



def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def make_engine(model: str | None, image_size: int, seed: int) -> Sam2Engine:
    if model:
        return Sam2Engine.from_spec(model, image_size=image_size)
    return random_engine(RANDOM_MODEL, image_size, seed)


random_weight_params = open_filters  # quality filters off (see the module docstring)


def score(instances: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    tiles = tile_metrics(gt, instances)
    return {
        "dice": round(pixel_metrics(instances > 0, gt > 0)["dice"], 4),
        "tile_f": round(tiles["f_measure"], 4),
        "instances": int(instances.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="installed model name, checkpoint or fine-tune (default: random tiny)")
    parser.add_argument("--image-size", type=int, default=1024, help="model input resolution")
    parser.add_argument("--size", type=int, default=1024, help="side of the synthetic mosaic (px)")
    parser.add_argument("--points-per-side", type=int, default=16,
                        help="stock prompt grid side; fast path prompt cap is its square (thesis: 32)")
    parser.add_argument("--crop-n-layers", type=int, default=0, help="stock crop layers (thesis: 2)")
    parser.add_argument("--clicks", type=int, default=7, help="warm clicks to time")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image and random weights")
    args = parser.parse_args()

    engine = make_engine(args.model, args.image_size, args.seed)
    image, gt = synth_mosaic(np.random.default_rng(args.seed), args.size, args.size)
    points = tessera_points(gt)
    clicks = [points[i] for i in np.linspace(0, len(points) - 1, args.clicks + 2).astype(int)]

    cold = []
    for point in clicks[:2]:
        engine.clear_cache()
        cold.append(timed(lambda: engine.predict_points(image, [point], [1]))[0])
    warm = [timed(lambda: engine.predict_points(image, [p], [1]))[0] for p in clicks[2:]]

    params = engine.params.replace(
        points_per_side=args.points_per_side, crop_n_layers=args.crop_n_layers
    )
    if not args.model:
        params = random_weight_params(engine, image, params)
    segment: dict[str, Any] = {}
    for method in ("stock", "fast"):
        engine.clear_cache()  # both paths pay for encoding the image
        seconds, instances = timed(lambda: engine.segment(image, params, method=method))
        segment[method] = {"seconds": round(seconds, 2), **score(instances, gt)}
    first_round, _ = tessera_prompts(
        tile_interior(image), params.points_per_side**2, max(1, params.points_per_side // 2)
    )
    segment["fast_prompts_first_round"] = len(first_round)
    segment["stock_prompts"] = params.points_per_side**2  # per crop, 3 masks each
    segment["speedup"] = round(segment["stock"]["seconds"] / segment["fast"]["seconds"], 2)

    print(json.dumps({
        "model": engine.model_version,
        "weights": "checkpoint" if args.model else "random",
        "note": None if args.model else "random weights: Dice and F are meaningless, timings are real",
        "device": str(engine.device),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],  # other work slows the timings
        "model_input": engine.model.image_size,
        "image": {"width": args.size, "height": args.size, "tesserae": int(gt.max()), "source": "toolkit/data/synth.py"},
        "click": {
            "cold_median_s": round(statistics.median(cold), 3),
            "warm_median_s": round(statistics.median(warm), 3),
            "warm_clicks": len(warm),
        },
        "segment": segment,
        "params": params.to_dict(),
    }, indent=1))


if __name__ == "__main__":
    main()
