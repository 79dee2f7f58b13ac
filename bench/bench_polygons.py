"""Light polygons: vertices, fit and time per fineness, against the old exact outlines.

For a synthetic mosaic (ground truth tesserae, 33-px pitch) every tessera becomes a Label
Studio polygon (``mosaic_toolkit.data.tasks.polygon_results``) at several fineness settings
(``MOSAIC_BACKEND_POLYGON_IOU``); each stored polygon is read back with the exporter's
rasteriser and compared with its tessera. ``outline`` is the previous behaviour: the exact
marching-squares outline simplified by 0.35 px (``cv2.approxPolyDP``).

Prints one JSON object. Usage::

    python bench/bench_polygons.py [--tesserae 1000] [--fineness 0.9,0.97,0.99,1]
"""
from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np
from scipy import ndimage as ndi

from mosaic_toolkit.data.export import rasterise_region
from mosaic_toolkit.core.polygons import outline, pixel_iou
from mosaic_toolkit.data.synth import synth_mosaic
from mosaic_toolkit.data.tasks import polygon_results


def score(instances: np.ndarray, regions: list[dict]) -> dict:
    h, w = instances.shape
    ious, foreign = [], 0
    for region in regions:
        k = int(region["id"][1:])
        pixels = rasterise_region(1, region, w, h)
        ious.append(pixel_iou(pixels, instances == k))
        foreign += int(np.count_nonzero(pixels & (instances > 0) & (instances != k)))
    vertices = [len(r["value"]["points"]) for r in regions]
    return {"regions": len(regions), "vertices_median": float(np.median(vertices)),
            "vertices_p95": float(np.percentile(vertices, 95)), "iou_min": round(float(min(ious)), 4),
            "iou_median": round(float(np.median(ious)), 4), "neighbour_pixels_taken": foreign,
            "json_kb": round(len(json.dumps(regions)) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tesserae", type=int, default=1000, help="about this many tesserae")
    parser.add_argument("--fineness", default="0.9,0.97,0.99,1", help="comma-separated IoU settings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    side = int(33 * np.sqrt(args.tesserae))
    _, instances = synth_mosaic(np.random.default_rng(args.seed), side, side, tessera_size=33)
    h, w = instances.shape
    out: dict = {"mosaic": {"width": w, "height": h, "tesserae": int(instances.max())}, "fineness": {}}
    for fineness in [float(v) for v in args.fineness.split(",")]:
        started = time.perf_counter()
        regions = polygon_results(instances, fineness)
        seconds = time.perf_counter() - started
        out["fineness"][str(fineness)] = {**score(instances, regions),
                                          "ms_per_tessera": round(seconds / len(regions) * 1000, 2)}
    old = []
    for k, sl in enumerate(ndi.find_objects(instances), start=1):
        xy = outline(instances[sl] == k)
        simple = cv2.approxPolyDP(xy.astype(np.float32)[:, None, :], 0.35, True)[:, 0, :] + [sl[1].start, sl[0].start]
        old.append({"id": f"t{k}", "type": "polygonlabels",
                    "value": {"points": [[float(x) / w * 100, float(y) / h * 100] for x, y in simple]}})
    out["outline"] = score(instances, old)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
