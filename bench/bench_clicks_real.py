"""Clicks on a real photograph with a real SAM 2, as the backend answers them; prints one JSON object.

For every tessera of the reference mask that does not touch the image border (and is not a
reference speck, ``evaluation.metrics.drop_specks``: a pixel or two left by thresholding), one positive click
at its point (the dataset contract's point) goes through the backend's own click path
(``mosaic_backend.predict.Predictor.click``: the click window of ``resolve_tiling``, the model's
candidates, the pieces under the click). Reported, per way of choosing among the base model's
three candidates (``best-scored``: SAM 2's own choice; ``scale-aware``: candidates over
``guided_max_area`` tessera areas lose, as the backend answers):

* ``mask_iou``: the answered mask against the tessera (mean, p5);
* ``polygon_iou``: the polygon the backend would send at its default click fineness
  (``MOSAIC_BACKEND_CLICK_POLYGON_IOU``), rasterised by pixel centre, against the tessera, and
  ``vertices`` (median);
* ``warm_ms``: p50 / p95 of clicks that ran no image encoder (model time in process; HTTP adds a
  few ms, ``bench/bench_backend.py``);
* ``ceiling``: the best of the three candidates for each click (what a perfect chooser gets).

The mask threshold and the polygon fineness are the backend's defaults
(``MOSAIC_BACKEND_CLICK_MASK_THRESHOLD``, ``MOSAIC_BACKEND_CLICK_POLYGON_IOU``; set them in the
environment to compare).

Run: ``.venv/bin/python bench/bench_clicks_real.py [--root ../shared/real/butterfly_top]
[--columns 775:1575] [--model sam2-tiny] [--max-clicks 400]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mosaic_backend.predict import Predictor
from mosaic_backend.regions import Prompt
from mosaic_toolkit.core.dataset import mask_to_instances, relabel_sequential, tessera_points
from mosaic_toolkit.core.imageio import read_image
from mosaic_toolkit.core.io import read_mask
from mosaic_backend.config import Settings
from mosaic_toolkit.core.polygons import rasterise, simplify
from mosaic_toolkit.engines import open_engine
from mosaic_toolkit.evaluation.metrics import drop_specks

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "real" / "butterfly_top"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="dataset with images/ and masks/")
    parser.add_argument("--columns", default=None, help="x0:x1, score only this column range")
    parser.add_argument("--model", default="sam2-tiny", help="SAM 2 model name or checkpoint")
    parser.add_argument("--max-clicks", type=int, default=400, help="at most this many clicks")
    parser.add_argument("--click-tile", type=int, default=None,
                        help="click window side (px) instead of the backend's (about 100 tesserae)")
    args = parser.parse_args()
    images = sorted((args.root / "images").glob("*"))
    if not images:
        print(json.dumps({"skipped": f"{args.root}: no images/"}))
        return
    image = np.ascontiguousarray(read_image(images[0]))
    gt = mask_to_instances(read_mask(args.root / "masks" / (images[0].stem + ".png")))
    if args.columns:
        x0, x1 = (int(v) for v in args.columns.split(":"))
        image, gt = np.ascontiguousarray(image[:, x0:x1]), relabel_sequential(gt[:, x0:x1])
    h, w = gt.shape
    border = np.zeros_like(gt, bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    touching = set(np.unique(gt[border]).tolist())
    points = tessera_points(gt)
    specks = set(np.unique(gt[drop_specks(gt)[0] != gt]).tolist())
    labels = [k for k in range(1, len(points) + 1) if k not in touching | specks][: args.max_clicks]

    engine = open_engine("sam2", args.model, cache_bytes=2 << 30)
    settings = Settings.from_env()
    predictor = Predictor(cache_bytes=1 << 30, tile=args.click_tile, click_threshold=settings.click_mask_threshold)
    key = "bench"
    rows: dict[str, dict[str, list[float]]] = {
        name: {"mask": [], "polygon": [], "ms": [], "vertices": []} for name in ("best-scored", "scale-aware")}
    fineness = settings.click_polygon_iou
    ceiling = []
    for label in labels:
        truth = gt == label
        x, y = points[label - 1]
        prompt = Prompt(np.array([[x, y]], float), np.array([1]), None, None)
        for name in rows:
            scale = engine.params.guided_max_area
            if name == "best-scored":
                engine.params = engine.params.replace(guided_max_area=1e9)
            cached = len(engine.cached_keys())
            start = time.perf_counter()
            mask, _ = predictor.click(engine, image, key, prompt)
            elapsed = time.perf_counter() - start
            engine.params = engine.params.replace(guided_max_area=scale)
            if len(engine.cached_keys()) == cached:
                rows[name]["ms"].append(1000 * elapsed)
            rows[name]["mask"].append(iou(mask, truth))
            xy = simplify(mask, fineness)
            rows[name]["polygon"].append(iou(rasterise(xy, mask.shape), truth) if xy is not None else 0.0)
            rows[name]["vertices"].append(0 if xy is None else len(xy))
        # the ceiling: the best of the three candidates in the same window
        from mosaic_backend.predict import click_window, writable

        wy0, wx0, wy1, wx1 = click_window((h, w), prompt, *predictor.tiling(image, key))
        feats = engine._cache.get(engine.image_key(writable(image[wy0:wy1, wx0:wx1])))
        if feats is not None:
            import torch

            with torch.inference_mode():
                logits, _, _ = engine._sam.click(feats.features, feats.hw, np.array([[x - wx0, y - wy0]], np.float32),
                                                 np.ones(1, np.int64), None)
            ceiling.append(max(iou(np.pad(m > predictor.click_threshold, ((wy0, h - wy1), (wx0, w - wx1))), truth)
                               for m in logits))

    def summary(values: list[float]) -> dict:
        return {"mean": round(statistics.fmean(values), 4), "p5": round(float(np.percentile(values, 5)), 4)}

    result = {
        "image": str(images[0].name), "columns": args.columns, "click_tile": predictor.tiling(image, key)[0], "clicks": len(labels), "model": args.model,
        "polygon_fineness": fineness, "mask_threshold": predictor.click_threshold, "reference_specks_skipped": len(specks - touching),
        "ceiling_best_of_three": summary(ceiling) if ceiling else None,
    }
    for name, r in rows.items():
        result[name] = {"mask_iou": summary(r["mask"]), "polygon_iou": summary(r["polygon"]),
                        "vertices": statistics.median(r["vertices"]),
                        "warm_ms": {"p50": round(statistics.median(r["ms"]), 1),
                                    "p95": round(float(np.percentile(r["ms"], 95)), 1)} if r["ms"] else None}
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
