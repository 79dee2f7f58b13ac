"""Peak memory and time of segmenting one very large mosaic; prints one JSON object.

Two modes:

* ``--tiff`` (the default): a ``--size`` x ``--size`` (default 20,000) **16-bit RGB BigTIFF**,
  tiled and Deflate-compressed, is segmented with the classical engine through the real
  command path (``segment.segment_paths``: reader, tile-by-tile segmentation, mask, 16-bit
  instance map and overlay written). The TIFF is never decoded whole: ``imageio.open_image``
  reads only the TIFF tiles under each segmentation tile. The claim checked: under 4 GB RSS
  (``limit_mb``) for 20,000 x 20,000.
* ``--array``: the earlier measurement (default 8000 x 8000): the image is decoded fully into
  memory, as for a JPEG, and only ``tiling.segment_tiled`` is measured.

The mosaic is written piece by piece in a separate process, so writing it costs little memory
and none of it counts here: in TIFF mode tifffile writes the file tile by tile from a generator
(``--piece``-pixel tiles, each one of a small pool of synthetic mosaics from toolkit/data/synth.py,
scaled to 16 bits by x257); in array mode into a memory-mapped .npy file. Piece borders are
straight cuts through tesserae, harmless here: this measures memory and time, not quality.

Reported: ``seconds`` and ``cpu_seconds``, ``peak_rss_mb`` (the process's peak resident memory,
imports included), ``baseline_rss_mb`` (before segmenting), ``tesserae``, the file's and the
output map's sizes.

Run: ``.venv/bin/python bench/bench_memory.py [--size 20000] [--tessera-size 96]`` (about 18
CPU-minutes at 20,000; measured peak 3,245 MB), or ``--array --size 8000 --tessera-size 48``.
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
from mosaic_toolkit.core.predictions import RESULT_FILE
from mosaic_toolkit.core.tiling import plan_tiles, resolve_tiling, segment_tiled
from mosaic_toolkit.data.synth import synth_mosaic
from mosaic_toolkit.segment import CLASSICAL_TILE, segment_paths

LIMIT_MB = 4096
POOL = 6  # distinct synthetic pieces the TIFF's tiles are drawn from


def generate_npy(path: str, size: int, piece: int, tessera_size: float, seed: int) -> None:
    """Write a ``size`` x ``size`` RGB mosaic to the .npy file ``path``, one piece at a time."""
    image = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(size, size, 3))
    rng = np.random.default_rng(seed)
    for y in range(0, size, piece):
        for x in range(0, size, piece):
            h, w = min(piece, size - y), min(piece, size - x)
            image[y:y + h, x:x + w], _ = synth_mosaic(rng, w, h, tessera_size=tessera_size)
    image.flush()


def generate_tiff(path: str, size: int, piece: int, tessera_size: float, seed: int) -> None:
    """Write a ``size`` x ``size`` 16-bit RGB tiled BigTIFF, tile by tile (memory: one pool)."""
    import tifffile

    rng = np.random.default_rng(seed)
    pool = [synth_mosaic(rng, piece, piece, tessera_size=tessera_size)[0].astype(np.uint16) * 257
            for _ in range(POOL)]
    across = -(-size // piece)

    def tiles():
        for i in range(across * across):
            yield pool[(i * 7 + i // across) % POOL]

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint16, tile=(piece, piece),
                     photometric="rgb", bigtiff=True, compression="zlib", compressionargs={"level": 1})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def spawn(target, *args) -> float:
    start = time.perf_counter()
    worker = multiprocessing.get_context("spawn").Process(target=target, args=args)
    worker.start()
    worker.join()
    if worker.exitcode != 0:
        raise SystemExit(f"generating the mosaic failed (exit code {worker.exitcode})")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiff", dest="tiff", action="store_true", default=True,
                      help="segment a 16-bit tiled BigTIFF through `segment` (default)")
    mode.add_argument("--array", dest="tiff", action="store_false",
                      help="segment an image decoded into memory with segment_tiled only")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (default 20000 with --tiff, 8000 with --array)")
    parser.add_argument("--piece", type=int, default=None,
                        help="side of each synthesised piece (TIFF tile: default 1024; array: 2000)")
    parser.add_argument("--tessera-size", type=float, default=None,
                        help="synthetic tessera pitch (default 96 with --tiff, 48 with --array)")
    parser.add_argument("--tile", type=int, default=CLASSICAL_TILE, help="segmentation tile side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic pieces")
    args = parser.parse_args()
    if args.tiff:
        size, piece, tessera = args.size or 20000, args.piece or 1024, args.tessera_size or 96.0
    else:
        size, piece, tessera = args.size or 8000, args.piece or 2000, args.tessera_size or 48.0

    engine = ClassicalEngine()
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiff:
            path = str(Path(tmp) / "mosaic.tif")
            generate_seconds = spawn(generate_tiff, path, size, piece, tessera, args.seed)
            file_mb = Path(path).stat().st_size / 2**20
            baseline = peak_rss_mb()
            start, cpu_start = time.perf_counter(), time.process_time()
            [record] = segment_paths([path], Path(tmp) / "out", engine, tile=args.tile, progress=False)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            peak = peak_rss_mb()
            result = json.loads((Path(tmp) / "out" / RESULT_FILE).read_text())
            tesserae = record["tesserae"]
            report = {"mode": "tiff", "bits": 16, "file_mb": round(file_mb, 1),
                      "outputs": sorted(p.name for p in (Path(tmp) / "out").iterdir()),
                      "orientation": result["images"][0]["orientation"]}
            overlap = None
        else:
            path = str(Path(tmp) / "mosaic.npy")
            generate_seconds = spawn(generate_npy, path, size, piece, tessera, args.seed)
            image = np.load(path)  # fully in memory, like a decoded photograph
            baseline = peak_rss_mb()
            start, cpu_start = time.perf_counter(), time.process_time()
            tile, overlap = resolve_tiling(image, tile=args.tile)  # estimates the tessera size
            instances = segment_tiled(image, engine.segment, tile=tile, overlap=overlap, progress=False)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            peak = peak_rss_mb()
            tesserae = int(instances.max())
            report = {"mode": "array", "image_mb": round(image.nbytes / 2**20, 1),
                      "tiles": len(plan_tiles(size, size, tile, overlap))}
    print(json.dumps({
        **report,
        "size": size,
        "tessera_size": tessera,
        "tile": args.tile,
        "overlap": overlap,
        "tesserae": tesserae,
        "generate_seconds": round(generate_seconds, 1),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "output_map_mb": round(size * size * 4 / 2**20, 1),
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(peak, 1),
        "limit_mb": LIMIT_MB,
        "under_limit": peak < LIMIT_MB,
    }, indent=1))


if __name__ == "__main__":
    main()
