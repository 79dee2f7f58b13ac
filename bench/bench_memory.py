"""Peak memory and time of segmenting one large mosaic tile by tile; prints one JSON object.

The mosaic (default 8000 x 8000) is generated piece by piece in a separate process: a grid of
independent synthetic mosaics (toolkit/synth.py, ``--piece`` pixels square) written into a
memory-mapped .npy file, because synthesising it whole would take far more memory than
segmenting it (synth needs ~1.5 GB at 4000 x 4000). The piece borders are straight cuts through
tesserae, which is harmless here: this measures memory and time, not quality.

This process then loads the image (as the CLI would) and segments it with the classical engine
through ``tiling.segment_tiled`` with the tile size ``segment`` uses. Reported: ``seconds`` and
``cpu_seconds`` (the tessera-size estimate included; CPU time is less sensitive to a busy
machine), ``peak_rss_mb`` (the process's peak resident memory, imports and image included),
``baseline_rss_mb`` (the peak before segmenting) and their difference ``segment_rss_mb``
(output map, one tile's working memory, bookkeeping), plus the image's and output's sizes.

Run: ``.venv/bin/python bench/bench_memory.py [--size 8000] [--tessera-size 48]``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from mosaic_toolkit.classical import ClassicalEngine
from mosaic_toolkit.segment import CLASSICAL_TILE
from mosaic_toolkit.data.synth import synth_mosaic
from mosaic_toolkit.core.tiling import plan_tiles, resolve_tiling, segment_tiled


def generate(path: str, size: int, piece: int, tessera_size: float, seed: int) -> None:
    """Write a ``size`` x ``size`` RGB mosaic to the .npy file ``path``, one piece at a time."""
    image = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(size, size, 3))
    rng = np.random.default_rng(seed)
    for y in range(0, size, piece):
        for x in range(0, size, piece):
            h, w = min(piece, size - y), min(piece, size - x)
            image[y:y + h, x:x + w], _ = synth_mosaic(rng, w, h, tessera_size=tessera_size)
    image.flush()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8000, help="image side in pixels")
    parser.add_argument("--piece", type=int, default=2000, help="side of each synthesised piece")
    parser.add_argument("--tessera-size", type=float, default=48.0, help="synthetic tessera pitch")
    parser.add_argument("--tile", type=int, default=CLASSICAL_TILE, help="tile side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "mosaic.npy")
        start = time.perf_counter()
        worker = multiprocessing.get_context("spawn").Process(
            target=generate, args=(path, args.size, args.piece, args.tessera_size, args.seed)
        )
        worker.start()
        worker.join()
        if worker.exitcode != 0:
            raise SystemExit(f"generating the mosaic failed (exit code {worker.exitcode})")
        generate_seconds = time.perf_counter() - start
        image = np.load(path)  # fully in memory, like a decoded photograph

    engine = ClassicalEngine()
    baseline = peak_rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    tile, overlap = resolve_tiling(image, tile=args.tile)  # estimates the tessera size
    instances = segment_tiled(image, engine.segment, tile=tile, overlap=overlap, progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = peak_rss_mb()
    print(json.dumps({
        "size": args.size,
        "tessera_size": args.tessera_size,
        "tile": tile,
        "overlap": overlap,
        "tiles": len(plan_tiles(args.size, args.size, tile, overlap)),
        "tesserae": int(instances.max()),
        "generate_seconds": round(generate_seconds, 1),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "image_mb": round(image.nbytes / 2**20, 1),
        "output_mb": round(instances.nbytes / 2**20, 1),
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(peak, 1),
        "segment_rss_mb": round(peak - baseline, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
