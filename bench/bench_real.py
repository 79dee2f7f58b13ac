"""Engines on real mosaic photographs (and the synthetic-vs-real gap); prints one JSON object.

Reads every dataset folder (``images/`` + ``masks/``, tesserae black on white) under ``--root``
(default ``../shared/real/`` next to the repository; when it is missing the benchmark says so
and prints ``{"skipped": ...}``). Each dataset is segmented exactly as ``mosaic-toolkit segment
DATASET --engine ENGINE --out OUT`` does (classical always; SAM 2 too when a SAM 2 model is
installed) and scored as ``mosaic-toolkit eval --pred OUT --gt DATASET`` does. Per image: the
metrics, the tessera scale that ``segment`` estimated (``tessera_size_px``) against the
reference's median equivalent diameter, and seconds.

``--synth N`` (default 8) also scores the classical engine on the default ``synth`` mix (``N``
mosaics, seed 2024, as ``bench/bench_classical.py``) and prints ``gap``: synthetic minus real
tile F, count error and pixel IoU. A synthetic mosaic on which the engine scores much better
than on a photograph is a test that lies; the target is a tile-F gap of at most 0.03.

With SAM 2 it also reports the method, the seconds spent encoding tiles and the whole time over
that (SAM 2's floor is encoding each tile once). ``--columns X0:X1`` scores only those columns of
each image: a held-out split when the parameters were chosen on the rest.

Run: ``.venv/bin/python bench/bench_real.py [--root ../shared/real] [--synth 8] [--columns X0:X1]
[--engines classical,sam2] [--tile PX]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from mosaic_toolkit.sam import weights
from mosaic_toolkit.core.dataset import Dataset, mask_to_instances
from mosaic_toolkit.core.io import read_mask
from mosaic_toolkit.evaluation.evaluate import evaluate
from mosaic_toolkit.engines import open_engine
from mosaic_toolkit.segment import segment_paths
from mosaic_toolkit.data.synth import synth_dataset

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "real"


def find_datasets(root: Path) -> list[Path]:
    """Dataset folders under ``root`` (itself or its subfolders) with images/ and masks/."""
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    return [p for p in candidates if (p / "images").is_dir() and (p / "masks").is_dir()]


def reference_diameter(mask_path: Path) -> float:
    """Median equivalent diameter (px) of the reference's tesserae (4-connected components)."""
    areas = np.bincount(mask_to_instances(read_mask(mask_path)).ravel())[1:]
    areas = areas[areas > 0]
    return float(2 * np.sqrt(np.median(areas) / np.pi))


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def run_engine(dataset: Path, engine_name: str, work: Path, tile: int | None = None) -> dict:
    """Segment and score one dataset with one engine: per-image rows and their means."""
    engine = open_engine(engine_name)
    pred = work / f"{dataset.name}_{engine_name}"
    encode = {"seconds": 0.0, "images": 0}
    if engine_name == "sam2":  # time the image encoder: SAM 2's floor is encoding each tile once
        encoded = engine._sam.encode  # the encoder runs (cache hits are not counted)

        def timed(image):
            begin = time.perf_counter()
            try:
                return encoded(image)
            finally:
                encode["seconds"] += time.perf_counter() - begin
                encode["images"] += 1

        engine._sam.encode = timed
    start = time.perf_counter()
    records = segment_paths([dataset], pred, engine, tile=tile, progress=False)
    seconds = time.perf_counter() - start
    report = evaluate(pred, dataset, work / f"{dataset.name}_{engine_name}_eval")
    data = Dataset.open(dataset)
    rows = []
    for record in records:
        stem = record["stem"]
        sample = next(s for s in data.samples if s.stem == stem)
        reference = reference_diameter(data.root / "masks" / f"{sample.stem}.png")
        metrics = report["images"][stem]
        rows.append({
            "stem": stem,
            "size": f"{record['width']}x{record['height']}",
            "seconds": record["seconds"],
            "tessera_size_px": record["tessera_size_px"],
            "reference_diameter_px": round(reference, 2),
            "scale_error": round(record["tessera_size_px"] / reference - 1, 4),
            "tile_px": record["tile"],
            "overlap_px": record["overlap"],
            "pixel": _round(metrics["pixel"]),
            "tile": _round(metrics["tile"]),
        })
    mean = report["mean"]
    extra = {}
    if engine_name == "sam2":
        extra = {"method": engine.params.method, "model": engine.model_version,
                 "encode_seconds": round(encode["seconds"], 2), "tiles_encoded": encode["images"],
                 "time_over_encoding": round(seconds / max(encode["seconds"], 1e-9), 2)}
    return {
        "engine": engine_name,
        **extra,
        "seconds": round(seconds, 3),
        "images": rows,
        "mean": {"pixel": _round(mean["pixel"]), "tile": _round(mean["tile"])},
    }


def crop_columns(dataset: Path, columns: str, work: Path) -> Path:
    """A copy of ``dataset`` with every image and mask cut to columns ``X0:X1``."""
    from PIL import Image

    x0, x1 = (int(v) for v in columns.split(":"))
    out = work / dataset.name
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for path in sorted((dataset / sub).iterdir()):
            with Image.open(path) as im:
                im.crop((x0, 0, min(x1, im.width), im.height)).save(out / sub / (path.stem + ".png"))
    return out


def synthetic_means(n: int, work: Path) -> dict:
    """Classical engine on the default synth mix, scored like the real datasets."""
    root = work / "synthetic"
    synth_dataset(root, n, seed=2024, min_size=400, max_size=1024)
    result = run_engine(root, "classical", work)
    return {"n": n, "seed": 2024, "min_size": 400, "max_size": 1024, "mean": result["mean"],
            "scale_error": [r["scale_error"] for r in result["images"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help="folder of real datasets (default: ../shared/real)")
    parser.add_argument("--synth", type=int, default=8,
                        help="synthetic mosaics for the synthetic-vs-real gap (0: skip)")
    parser.add_argument("--columns", default=None,
                        help="X0:X1: score only these columns of each image (a held-out split)")
    parser.add_argument("--engines", default=None,
                        help="comma-separated engines (default: classical, and sam2 when installed)")
    parser.add_argument("--tile", type=int, default=None,
                        help="SAM 2 tile side in px (default: segment's, about 100 tesserae)")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    if not args.root.is_dir() or not find_datasets(args.root):
        print(f"bench_real: no real datasets under {args.root}; skipped", file=sys.stderr)
        print(json.dumps({"skipped": f"no real datasets under {args.root}"}))
        return
    engines = ["classical"] + (["sam2"] if weights.default_model() else [])
    if args.engines:
        engines = args.engines.split(",")
    if len(engines) == 1:
        print("bench_real: no SAM 2 weights installed; classical engine only", file=sys.stderr)
    result: dict = {"root": str(args.root), "engines": engines, "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for dataset in find_datasets(args.root):
            if args.columns:
                dataset = crop_columns(dataset, args.columns, work / "columns")
            result["datasets"][dataset.name] = {
                name: run_engine(dataset, name, work, args.tile) for name in engines
            }
        if args.synth > 0:
            synthetic = synthetic_means(args.synth, work)
            real = [d["classical"]["mean"] for d in result["datasets"].values()]
            real_mean = {
                "f_measure": float(np.mean([m["tile"]["f_measure"] for m in real])),
                "count_error": float(np.mean([m["tile"]["count_error"] for m in real])),
                "iou": float(np.mean([m["pixel"]["iou"] for m in real])),
            }
            syn = synthetic["mean"]
            result["synthetic"] = synthetic
            result["gap"] = {  # synthetic minus real, classical engine
                "f_measure": round(syn["tile"]["f_measure"] - real_mean["f_measure"], 4),
                "count_error": round(syn["tile"]["count_error"] - real_mean["count_error"], 4),
                "iou": round(syn["pixel"]["iou"] - real_mean["iou"], 4),
            }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
