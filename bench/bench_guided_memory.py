"""Peak memory, encodings and time of SAM 2's guided pre-labels by cache and batch; prints JSON.

The guided path (``sam.guided``) decodes each proposal in its tile and later prompts a second
round in the gaps, tile by tile again. The tiles' features live in the engine's byte-bounded
embedding cache (``--cache-mbs``; the backend's ``MOSAIC_BACKEND_EMBEDDING_CACHE_MB``); a tile
the second round needs after the cache let it go is encoded again. So memory is bounded by the
cache, and a cache smaller than the image's tiles costs encodings, not a different map.

One image (``--image``, default the butterfly's top half from ``--shared``) is segmented once per
budget of ``--cache-mbs`` and value of ``--points-per-batch`` (prompts decoded at once: each
carries its own copy of the image tokens through the decoder), each in its own process (a clean
peak): ``tiles``, ``encodings`` (image encoder runs), ``seconds``, ``peak_rss_mb`` (the
process's peak resident memory, imports and model included), ``regions`` and the map's
``sha256``; ``same_map`` says whether every run gave the same map. A budget of 100000 MiB holds
every tile, as the path did before it let the cache bound it.

Run: ``.venv/bin/python bench/bench_guided_memory.py [--image PATH] [--tile PX] [--cache-mbs
100000,512,64] [--points-per-batch 64,16]``: on the top half (15 tiles) about 2 minutes a run;
on the getty cat3 detail with ``--tile 128`` (56 tiles) 10-12 minutes a run, on two cores.
Figures in docs/performance.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(image_path: str, model: str, cache_mb: int, batch: int, tile: int | None, queue) -> None:
    import cv2
    import numpy as np

    from mosaic_toolkit.core.scale import estimate_tessera_size
    from mosaic_toolkit.core.tiling import plan_tiles, resolve_tiling
    from mosaic_toolkit.sam.engine import Sam2Engine
    from mosaic_toolkit.sam.params import GeneratorParams

    engine = Sam2Engine.from_spec(model, device="cpu", cache_bytes=cache_mb * 2**20)
    image = cv2.cvtColor(cv2.imread(image_path), cv2.COLOR_BGR2RGB)
    size = estimate_tessera_size(image)
    side, overlap = resolve_tiling(image, tile, None, size)
    encodings = 0
    encode = engine._sam.encode

    def counted(crop):
        nonlocal encodings
        encodings += 1
        return encode(crop)

    engine._sam.encode = counted
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    params = GeneratorParams.from_dict({**engine.params.to_dict(), "points_per_batch": batch})
    instances = engine.segment_guided(image, params, tessera_size=size, tile=side, overlap=overlap)
    queue.put({
        "cache_mb": cache_mb, "points_per_batch": batch, "tile": side, "overlap": overlap,
        "tiles": len(plan_tiles(*image.shape[:2], side, overlap)), "encodings": encodings,
        "seconds": round(time.perf_counter() - started, 1),
        "rss_before_mb": round(before), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "regions": int(instances.max()), "sha256": hashlib.sha256(np.ascontiguousarray(instances).tobytes()).hexdigest(),
    })


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", type=Path, default=None,
                   help="the image to segment (default: butterfly_top from --shared)")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "real", help="the real photographs")
    p.add_argument("--model", default=str(ROOT / ".cache" / "weights" / "sam2_hiera_tiny.pt"),
                   help="SAM 2 checkpoint or fine-tune (default: the imported official tiny)")
    p.add_argument("--tile", type=int, default=None, help="tile side in pixels (default: about 100 tesserae)")
    p.add_argument("--cache-mbs", default="100000,512,64", help="embedding-cache budgets (MiB), comma-separated")
    p.add_argument("--points-per-batch", default="16",
                   help="prompts decoded at once, comma-separated (each is run with every budget)")
    args = p.parse_args(argv)
    image = args.image or args.shared / "butterfly_top" / "images" / "butterfly_top.jpg"
    if not image.is_file():
        raise SystemExit(f"bench_guided_memory: {image}: no such image")
    context = multiprocessing.get_context("spawn")
    runs = []
    budgets = [int(v) for v in args.cache_mbs.split(",")]
    for cache_mb, batch in ((c, int(b)) for b in args.points_per_batch.split(",") for c in budgets):
        queue = context.Queue()
        worker = context.Process(target=run_one, args=(str(image), args.model, cache_mb, batch, args.tile, queue))
        worker.start()
        worker.join()
        if worker.exitcode != 0:
            raise SystemExit(f"bench_guided_memory: the run with a {cache_mb}-MiB cache failed (exit {worker.exitcode})")
        result = queue.get(timeout=60)
        runs.append(result)
        print(json.dumps(result), flush=True)
    print(json.dumps({"image": str(image), "model": args.model, "runs": runs,
                      "same_map": len({r["sha256"] for r in runs}) == 1}, indent=1))


if __name__ == "__main__":
    main()
