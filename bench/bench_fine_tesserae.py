"""SAM 2 guided pre-labels on fine tesserae: the real photograph shrunk; prints JSON.

The butterfly's top half (``--shared``/butterfly_top, with its reference) is shrunk by each of
``--factors`` (area averaging; each reference pixel takes its block's most common tessera), so its
37-px tesserae measure 37/f px, as in a photograph of a larger area or of a finer floor. On each
shrunk copy: the classical engine, and SAM 2's guided path (``--model``, default the official
tiny) with its speck floor as it is (``scaled``: ``min_area`` or 5 % of the squared tessera size,
whichever is smaller, ``sam.guided.speck_area``) and fixed at ``min_area`` pixels (``fixed``: what
the path did before the floor followed the scale). ``--finetune DIR`` (a ``bench_finetune_real``
output folder) also scores DIR/finetune.pt and its base on DIR/val_band, the part it did not
train on. ``--small-tiles`` also runs the base on the whole top half with tiles of about 100
tesserae (``core.tiling.choose_tile_size`` without its 256-px floor, passed as ``segment --tile``),
the scale of the training crops, where the default tiles hold more tesserae below 25-px ones.
``--fast`` (with ``--finetune``) also scores the fine-tune's prompt-free fast method on the val
band, with both floors (the fast and stock paths follow the same scale-aware floor).

Run: ``.venv/bin/python bench/bench_fine_tesserae.py --model .cache/weights/sam2_hiera_tiny.pt
[--finetune DIR [--fast]] [--small-tiles]`` (9 minutes on two cores with ``--finetune``, 7
without; about 5 more with ``--small-tiles``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / ".cache" / "weights" / "sam2_hiera_tiny.pt"),
                   help="base SAM 2 checkpoint (default: the imported official tiny)")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "real",
                   help="the real photographs (with butterfly_top/)")
    p.add_argument("--factors", default="2,3,4", help="shrink factors, comma-separated")
    p.add_argument("--finetune", type=Path, default=None,
                   help="a bench_finetune_real output folder: also score its finetune.pt on its val band")
    p.add_argument("--small-tiles", action="store_true",
                   help="also run the base with tiles of about 100 tesserae (no 256-px floor) on the top half")
    p.add_argument("--fast", action="store_true",
                   help="with --finetune: also score the fine-tune's fast method on its val band")
    args = p.parse_args(argv)
    if args.fast and args.finetune is None:
        p.error("--fast needs --finetune")
    return args


def shrink(src: Path, factor: int, out: Path) -> int:
    """Write ``src`` (a one-sample dataset) shrunk ``factor`` times to ``out``; its tessera count."""
    from skimage.segmentation import relabel_sequential

    from mosaic_toolkit.core.dataset import Dataset, write_manifest, write_sample
    from mosaic_toolkit.core.io import read_mask, write_mask

    def block_mode(a: np.ndarray) -> np.ndarray:
        blocks = a[:h, :w].reshape(h // factor, factor, w // factor, factor).transpose(0, 2, 1, 3)
        blocks = blocks.reshape(h // factor, w // factor, factor * factor)
        return stats.mode(blocks, axis=2, keepdims=False).mode  # ties go to the lower id

    data = Dataset.open(src)
    sample = data.samples[0]
    image, instances = data.image(sample), data.instances(sample)
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    small = cv2.resize(image[:h, :w], (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    truth = relabel_sequential(block_mode(instances).astype(np.int32))[0].astype(np.int32)
    source = {}
    unknown = sample.source.get("unknown") if sample.source else None
    if unknown:  # tesserae the band's border cuts: not scored
        cut = block_mode((read_mask(src / unknown) > 0).astype(np.uint8)) > 0
        write_mask(out / unknown, np.where(cut, 255, 0).astype(np.uint8))
        source = {"unknown": unknown}
    written = write_sample(out, sample.stem, small, truth, source=source, split="val")
    write_manifest(out, [written])
    return int(truth.max())


def score(engine, data: Path, work: Path, tile: int | None = None) -> dict:
    from mosaic_toolkit.evaluation.evaluate import evaluate
    from mosaic_toolkit.segment import segment_paths

    started = time.perf_counter()
    records = segment_paths([data], work / "pred", engine, tile=tile, progress=False)
    seconds = time.perf_counter() - started
    mean = evaluate(work / "pred", data, work / "eval")["mean"]
    return {"tile_f": round(mean["tile"]["f_measure"], 4), "count_error": round(mean["tile"]["count_error"], 4),
            "pixel_iou": round(mean["pixel"]["iou"], 4), "regions": int(records[0]["tesserae"]),
            "tessera_size_px": records[0].get("tessera_size_px"), "tile": records[0].get("tile"),
            "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import mosaic_toolkit.sam.engine as engine_module
    from mosaic_toolkit.classical import ClassicalEngine
    from mosaic_toolkit.sam.engine import Sam2Engine

    photo = args.shared / "butterfly_top"
    if not (photo / "manifest.json").is_file() and not (photo / "images").is_dir():
        sys.exit(f"{photo}: not found (the real photographs, see --shared)")
    scaled_floor = engine_module.speck_area
    floors = {"scaled": scaled_floor, "fixed": lambda min_area, tessera_size: int(min_area)}
    models = {"base": Sam2Engine.from_spec(args.model, device="cpu")}
    sets = {"top": photo}
    if args.finetune is not None:
        models["finetuned"] = Sam2Engine.from_spec(str(args.finetune / "finetune.pt"), device="cpu",
                                                   base=args.model)
        sets["val_band"] = args.finetune / "val_band"
        if args.fast:
            models["finetuned_fast"] = Sam2Engine.from_spec(str(args.finetune / "finetune.pt"), device="cpu",
                                                            base=args.model, overrides={"method": "fast"})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor in [int(f) for f in args.factors.split(",")]:
            for name, src in sets.items():
                data = Path(tmp) / f"{name}_{factor}"
                tesserae = shrink(src, factor, data)
                runs = [("classical", ClassicalEngine(), None, None)] if name == "top" else []
                runs += [(m, e, floor, None) for m, e in models.items() if name != "top" or m == "base"
                         for floor in floors]
                if args.small_tiles and name == "top":
                    from mosaic_toolkit.core.dataset import Dataset
                    from mosaic_toolkit.core.scale import estimate_tessera_size
                    from mosaic_toolkit.core.tiling import choose_tile_size

                    shrunk = Dataset.open(data)
                    size = estimate_tessera_size(shrunk.image(shrunk.samples[0]))
                    runs.append(("base", models["base"], "scaled", choose_tile_size(size, min_tile=64)))
                for model, engine, floor, tile in runs:
                    engine_module.speck_area = floors[floor] if floor else scaled_floor
                    try:
                        work = Path(tmp) / "run"
                        shutil.rmtree(work, ignore_errors=True)
                        row = {"factor": factor, "image": name, "tesserae": tesserae, "model": model,
                               "speck_floor": floor, **score(engine, data, work, tile)}
                    finally:
                        engine_module.speck_area = scaled_floor
                    results.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"model": args.model, "finetune": str(args.finetune) if args.finetune else None,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
