"""The tessera-scale estimate on synthetic mosaics of known size and on photographs; prints JSON.

Synthetic (exact ground truth): both styles, tesserae of ``--sizes`` px, ``--seeds`` seeds each,
in three looks: clean (realism 0), photographic (realism 1) and weathered stone floors (realism 1,
``--weathering 1``: tight grout close to the stone's colour, stains, cracks). An estimate is a
hit when the tesserae are resolvable (median equivalent diameter >= 6 px) and it is within 25 %
and not called too coarse, or when they are not resolvable and it is called too coarse. Per
look: hits, misses (with their ratios), and how many figure-sized estimates (over 2x the truth)
were *not* flagged by a warning (the number that must stay 0).

Photographs (``--photos DIR``, every image in it; optional): each is also measured shrunk to
``--factors`` of its size, which imitates a photograph of a larger area (a whole panel). A
consistent estimator gives ``estimate(f) / f`` equal to the full-size estimate until the
tesserae fall under the resolvable size, and then calls the image too coarse; per image and
factor: the estimate, ``estimate / f``, confidence, method, and the too-coarse flag.

Run: ``.venv/bin/python bench/bench_scale.py [--photos ../shared/real/getty]``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from mosaic_toolkit.core.dataset import IMAGE_EXTENSIONS
from mosaic_toolkit.core.imageio import read_image
from mosaic_toolkit.core.scale import RESOLVABLE_DIAMETER, estimate_scale
from mosaic_toolkit.data.synth import STYLES, synth_mosaic

LOOKS = {"clean": (0.0, 0.0), "photographic": (1.0, 0.0), "weathered": (1.0, 1.0)}


def median_diameter(instances: np.ndarray) -> float:
    areas = np.bincount(instances.ravel())[1:]
    return float(2 * np.sqrt(np.median(areas[areas > 0]) / np.pi))


def synthetic(sizes: list[int], seeds: int) -> dict:
    out = {}
    for look, (realism, weathering) in LOOKS.items():
        hits, misses, silent_figures, seconds = 0, [], 0, []
        for style in STYLES:
            for size in sizes:
                for seed in range(1, seeds + 1):
                    side = max(600, 12 * size)
                    image, instances = synth_mosaic(
                        np.random.default_rng(seed), side, int(side * 0.8), style=style,
                        tessera_size=size, realism=realism, weathering=weathering)
                    truth = median_diameter(instances)
                    start = time.perf_counter()
                    estimate = estimate_scale(image)
                    seconds.append(time.perf_counter() - start)
                    ratio = estimate.diameter / truth
                    if truth < RESOLVABLE_DIAMETER:
                        ok = estimate.coarse
                    else:
                        ok = abs(ratio - 1) <= 0.25 and not estimate.coarse
                    if ratio > 2 and not estimate.coarse and estimate.warning() is None:
                        silent_figures += 1
                    if ok:
                        hits += 1
                    else:
                        misses.append({"style": style, "size": size, "seed": seed,
                                       "truth_px": round(truth, 1),
                                       "estimate_px": round(estimate.diameter, 1),
                                       "method": estimate.method, "coarse": estimate.coarse,
                                       "confidence": round(estimate.confidence, 2)})
        out[look] = {"images": hits + len(misses), "hits": hits,
                     "silent_figure_sized": silent_figures,
                     "seconds_median": round(float(np.median(seconds)), 3), "misses": misses}
    return out


def photographs(folder: Path, factors: list[float]) -> dict:
    out = {}
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        image = read_image(path)
        h, w = image.shape[:2]
        rows = []
        for f in factors:
            shrunk = image if f == 1 else cv2.resize(
                image, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
            e = estimate_scale(shrunk)
            rows.append({"factor": f, "estimate_px": round(e.diameter, 2),
                         "estimate_over_factor": round(e.diameter / f, 2),
                         "confidence": round(e.confidence, 2), "method": e.method,
                         "coarse": e.coarse})
        out[path.stem] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5,8,12,20,35,55",
                        help="synthetic tessera sizes in px, comma-separated (default: 5,8,12,20,35,55)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per style and size (default: 3)")
    parser.add_argument("--photos", type=Path, default=None,
                        help="folder of photographs to measure at several sizes (optional)")
    parser.add_argument("--factors", default="1,0.75,0.6,0.45,0.3",
                        help="shrink factors for the photographs (default: 1,0.75,0.6,0.45,0.3)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    result = {"synthetic": synthetic([int(s) for s in args.sizes.split(",")], args.seeds)}
    if args.photos is not None:
        result["photographs"] = photographs(args.photos,
                                            [float(f) for f in args.factors.split(",")])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
