"""Time the metrics on a synthetic 4000-tessera image; prints one JSON object.

Ground truth: a 50 x 80 grid of 28-pixel squares with 4-pixel grout (1600 x 2560 pixels). The
prediction is shifted by one pixel, merges every 7th tile with its right-hand neighbour, splits
every 11th tile in two and misses every 13th, so every code path of the matching runs.

Run: ``.venv/bin/python bench/bench_metrics.py [--repeat 5]``.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import numpy as np

from mosaic_toolkit.core.dataset import label_components
from mosaic_toolkit.evaluation.metrics import pixel_metrics, tile_metrics

ROWS, COLS, TILE, GROUT = 50, 80, 28, 4


def synthetic_pair() -> tuple[np.ndarray, np.ndarray]:
    """(ground-truth instances, predicted foreground) for the benchmark image."""
    pitch = TILE + GROUT
    gt = np.zeros((ROWS * pitch, COLS * pitch), dtype=np.int32)
    pred = np.zeros(gt.shape, dtype=bool)
    for i in range(ROWS):
        for j in range(COLS):
            k = i * COLS + j
            r, c = i * pitch + GROUT // 2, j * pitch + GROUT // 2
            gt[r:r + TILE, c:c + TILE] = k + 1
            if k % 13 == 0:
                continue  # missed tile
            pred[r + 1:r + TILE + 1, c + 1:c + TILE + 1] = True
            if k % 7 == 0 and j + 1 < COLS:
                pred[r + 1:r + TILE + 1, c + TILE:c + pitch + 1] = True  # merge with neighbour
            if k % 11 == 0:
                pred[r + 1:r + TILE + 1, c + TILE // 2] = False  # split in two
    return gt, pred


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """The fastest of ``repeat`` runs, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing (best is kept)")
    args = parser.parse_args()

    gt, pred_fg = synthetic_pair()
    pred_instances, _ = label_components(pred_fg)
    gt_fg = gt > 0
    tiles = tile_metrics(gt, pred_instances)
    result = {
        "n_tesserae": tiles["n_gt"],
        "n_regions": tiles["n_pred"],
        "image": f"{gt.shape[1]}x{gt.shape[0]}",
        "repeat": args.repeat,
        "tile_metrics_s": round(best_of(args.repeat, lambda: tile_metrics(gt, pred_instances)), 4),
        "pixel_metrics_s": round(best_of(args.repeat, lambda: pixel_metrics(pred_fg, gt_fg)), 4),
        "label_components_s": round(best_of(args.repeat, lambda: label_components(pred_fg)), 4),
        "tile": tiles,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
