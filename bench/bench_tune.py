"""Benchmark one tuning trial: the memo of decoded prompts against re-running the model.

A trial of `mosaic-toolkit tune` segments every tuning image under one parameter set and scores
it (``tune.score_images``). With the memo (``tune.CachedSegmenter``) the image encoder and the
mask decoder run in the first trial only; later trials filter, upsample, paint and post-process.
The baseline re-runs ``Sam2Engine.segment`` (encoder, decoder, everything) in every trial, as
the thesis's tuning did. Both run the same parameter sets on the same synthetic mosaics
(toolkit/data/synth.py), and the instance maps are checked to be identical.

Without ``--model`` a SAM 2.1 tiny with RANDOM weights is used (no weights can be downloaded
here): the timings are real, the scores meaningless. Its quality filters are opened
(``pred_iou_thresh`` and ``stability_score_thresh`` 0) and the mask threshold is drawn around
the median logit, so random masks pass and every trial does its full work; the post-processing
parameters are drawn from tune's search space. With ``--model`` (an installed name, a checkpoint
or a fine-tune) all parameters are drawn from tune's search space.

Run: ``.venv/bin/python bench/bench_tune.py [--n 2] [--size 384] [--image-size 512]`` (the
defaults take about 10 minutes on two CPU cores: a trial re-running the model costs minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from mosaic_toolkit.sam.engine import Sam2Engine
from mosaic_toolkit.sam.fast import tessera_prompts, tile_interior
from mosaic_toolkit.sam.params import GeneratorParams
from mosaic_toolkit.data.synth import synth_mosaic
from mosaic_toolkit.core.tiling import resolve_tiling
from mosaic_toolkit.training.tune import (
    FLOAT_RANGES,
    SEARCHED,
    CachedSegmenter,
    TuningImage,
    score_images,
    search_space,
    segment_for_tuning,
)
from random_model import RANDOM_MODEL, random_engine



def make_engine(model: str | None, image_size: int, seed: int) -> Sam2Engine:
    if model:
        return Sam2Engine.from_spec(model, image_size=image_size, cache_bytes=0)
    return random_engine(RANDOM_MODEL, image_size, seed, cache_bytes=0)


def make_images(n: int, size: int, seed: int) -> list[TuningImage]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        image, gt = synth_mosaic(rng, size, size)
        tile, overlap = resolve_tiling(image)
        images.append(TuningImage(f"synth_{i}", image, gt > 0, gt, tile, overlap))
    return images


def parameter_sets(
    engine: Sam2Engine, images: list[TuningImage], base: GeneratorParams, count: int, seed: int,
    random_weights: bool,
) -> list[GeneratorParams]:
    """``count`` parameter sets drawn from tune's search space (module docstring)."""
    rng = np.random.default_rng(seed)
    space = search_space(images)
    logits = None
    if random_weights:
        image = images[0].image
        points, _ = tessera_prompts(tile_interior(image), 64, 8)
        logits = engine.decode_points(image, points)[0].numpy()
    sets = []
    for _ in range(count):
        values = {}
        for name in SEARCHED:
            low, high = space[name]
            values[name] = float(rng.uniform(low, high)) if name in FLOAT_RANGES else int(rng.integers(low, high + 1))
        if logits is not None:
            values.update(pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.05,
                          mask_threshold=float(np.quantile(logits, rng.uniform(0.4, 0.6))))
        sets.append(base.replace(**values))
    return sets


def timed_trial(fn):
    """(seconds, result) of ``fn()``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="installed model name, checkpoint or fine-tune (default: random tiny)")
    parser.add_argument("--image-size", type=int, default=512, help="model input resolution (SAM 2: 1024)")
    parser.add_argument("--n", type=int, default=2, help="tuning images")
    parser.add_argument("--size", type=int, default=384, help="side of each synthetic mosaic (px)")
    parser.add_argument("--points-per-side", type=int, default=16,
                        help="fast path prompt cap is its square (thesis: 32)")
    parser.add_argument("--trials", type=int, default=5, help="trials with the memo (the first one fills it)")
    parser.add_argument("--baseline-trials", type=int, default=2, help="trials re-running the model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images, weights and parameters")
    args = parser.parse_args()

    engine = make_engine(args.model, args.image_size, args.seed)
    images = make_images(args.n, args.size, args.seed)
    base = engine.params.replace(points_per_side=args.points_per_side, method="fast")
    sets = parameter_sets(engine, images, base, max(args.trials, args.baseline_trials), args.seed,
                          random_weights=not args.model)

    segmenter = CachedSegmenter(engine)
    cached = [timed_trial(lambda p=p: score_images(segmenter.segment, images, p)) for p in sets[: args.trials]]
    baseline = [timed_trial(lambda p=p: score_images(engine.segment, images, p))
                for p in sets[: args.baseline_trials]]
    check = sets[min(1, len(sets) - 1)]  # a set the memo served from cache
    identical = all(
        np.array_equal(segment_for_tuning(segmenter.segment, item, check),
                       segment_for_tuning(engine.segment, item, check))
        for item in images
    )
    same_scores = [a[1] == b[1] for a, b in zip(cached, baseline)]

    later = [s for s, _ in cached[1:]]
    per_trial_cached = statistics.median(later) if later else cached[0][0]
    per_trial_baseline = statistics.median(s for s, _ in baseline)
    print(json.dumps({
        "model": engine.model_version,
        "weights": "checkpoint" if args.model else "random",
        "note": None if args.model else "random weights: scores are meaningless, timings are real",
        "device": str(engine.device),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],  # other work slows the timings
        "model_input": engine.model.image_size,
        "images": {"n": args.n, "width": args.size, "height": args.size,
                   "tesserae": [int(item.gt_instances.max()) for item in images], "source": "toolkit/data/synth.py"},
        "points_per_side": args.points_per_side,
        "seconds_per_trial": {
            "memo_first_trial": round(cached[0][0], 3),  # encodes and decodes: fills the memo
            "memo_later_trials_median": round(per_trial_cached, 3),
            "rerun_engine_median": round(per_trial_baseline, 3),
            "speedup": round(per_trial_baseline / per_trial_cached, 1),
        },
        "trials": {"memo": len(cached), "rerun": len(baseline)},
        "identical_instance_maps": identical,  # memo vs re-run, for one parameter set
        "identical_scores": all(same_scores),  # every trial run both ways
        "memo": {"batches_decoded": segmenter.misses, "batches_reused": segmenter.hits,
                 "bytes": segmenter.memo_used},
        "mean_dice_per_trial": [round(r["dice"], 4) for _, r in cached],
    }, indent=1))


if __name__ == "__main__":
    main()
