"""Accuracy and speed of the classical engine on seeded synthetic mosaics; prints one JSON object.

The images are exactly those of ``mosaic-toolkit synth --n N --seed SEED --min-size MIN
--max-size MAX [--realism R]`` (both styles mixed, every degradation the generator draws;
``--realism 0`` gives the clean renderings of earlier versions), written to a
temporary folder and read back. ``--data DIR`` scores a dataset folder instead (e.g. an export
of real annotations). Per image: segmentation time on one core, pixel Dice / IoU and the
per-tessera metrics of the mosaic literature; then their means. ``seconds`` is wall time,
``cpu_seconds`` the process's CPU time (the honest figure on a busy machine).

Run: ``.venv/bin/python bench/bench_classical.py [--n 8] [--seed 2024] [--data DIR]``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2

from mosaic_toolkit.classical import ClassicalEngine
from mosaic_toolkit.core.dataset import Dataset
from mosaic_toolkit.evaluation.metrics import mean_metrics, pixel_metrics, tile_metrics
from mosaic_toolkit.data.synth import synth_dataset


def score_dataset(root: Path, engine: ClassicalEngine) -> list[dict]:
    """Segment every sample of a dataset folder and score it against its ground truth."""
    dataset = Dataset.open(root)
    rows = []
    for sample in dataset.samples:
        image = dataset.image(sample)
        gt = dataset.instances(sample)
        start, cpu_start = time.perf_counter(), time.process_time()
        pred = engine.segment(image)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        pixel = pixel_metrics(pred > 0, gt > 0)
        tile = tile_metrics(gt, pred)
        rows.append({
            "stem": sample.stem,
            "size": f"{image.shape[1]}x{image.shape[0]}",
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu, 3),
            "pixel": {k: round(v, 4) for k, v in pixel.items()},
            "tile": {k: round(v, 4) if isinstance(v, float) else v for k, v in tile.items()},
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="synthetic mosaics to generate")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the synthetic mosaics")
    parser.add_argument("--min-size", type=int, default=400, help="shortest longest side (px)")
    parser.add_argument("--max-size", type=int, default=1024, help="longest longest side (px)")
    parser.add_argument("--realism", type=float, default=None,
                        help="synth realism 0..1 (0: clean tiles; default: the default mix)")
    parser.add_argument("--data", type=Path, help="score this dataset folder instead")
    args = parser.parse_args()

    cv2.setNumThreads(1)  # "one core": the figure a user of a laptop or a CI runner sees
    engine = ClassicalEngine()
    if args.data is not None:
        rows = score_dataset(args.data, engine)
        source = {"data": str(args.data)}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "synthetic"
            synth_dataset(root, args.n, seed=args.seed, min_size=args.min_size,
                          max_size=args.max_size, realism=args.realism)
            rows = score_dataset(root, engine)
        source = {"synthetic": {"n": args.n, "seed": args.seed, "min_size": args.min_size,
                                "max_size": args.max_size,
                                "realism": "mixed" if args.realism is None else args.realism}}
    means = mean_metrics(rows)
    result = {
        "engine": engine.name,
        "params": engine.params.to_dict(),
        **source,
        "images": rows,
        "mean": {
            "seconds": round(sum(r["seconds"] for r in rows) / len(rows), 3),
            "cpu_seconds": round(sum(r["cpu_seconds"] for r in rows) / len(rows), 3),
            "pixel": {k: round(v, 4) for k, v in means["pixel"].items()},
            "tile": {k: None if v is None else round(v, 4) for k, v in means["tile"].items()},
        },
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
