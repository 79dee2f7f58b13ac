"""Pre-label scores: the guided path's own predictions against a second decoding pass; prints JSON.

The backend gives every SAM 2 pre-label region a score, the IoU SAM 2 predicts for it, so that
a reviewer can look at the least likely tesserae first. The guided method keeps the prediction
of the outline it painted (0 for a classical region SAM 2 did not outline; ``sam.guided``); the
alternative decodes a click on each region's point once more (``Predictor._tessera_scores``,
what the other methods do). On the real photograph's top half, per model:

- ``prelabel_s``: the backend's pre-label (``Predictor.prelabel``: classical proposals, guided
  outlines, their scores), and ``second_pass_s``: the second decoding of the same regions;
- how well each score tells right regions from wrong ones: a region is right when its IoU with
  the reference tessera it overlaps most is at least 0.5. ``auc``: the chance that a right
  region scores above a wrong one (0.5: no better than chance); ``wrong_in_lowest_5pct``: the
  share of wrong regions among the lowest-scored 5 % (``wrong_share`` over all regions);
- ``spearman``: the rank correlation of the two scores.

Run: ``.venv/bin/python bench/bench_prelabel_scores.py [--photo ../shared/real/butterfly_top]
[--models sam2-tiny,FINETUNE.pt] [--base sam2_hiera_tiny.pt]`` (a fine-tune needs its base).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from mosaic_toolkit.core.dataset import Dataset
from mosaic_toolkit.evaluation.metrics import tile_matches
from mosaic_toolkit.sam.engine import Sam2Engine
from mosaic_backend.predict import Deadline, Predictor

REPO = Path(__file__).resolve().parents[1]
RIGHT_IOU = 0.5


def region_iou(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Every predicted region's IoU with the reference tessera it overlaps most (index id - 1);
    a region with IoU 0.5 or more with some tessera overlaps that one most."""
    match = tile_matches(pred, truth)  # the regions as "tiles", matched to reference tesserae
    return match.intersection / (match.tile_area + match.region_area - match.intersection)


def score_quality(scores: np.ndarray, right: np.ndarray) -> dict:
    lowest = np.argsort(scores, kind="stable")[: max(1, round(0.05 * len(scores)))]
    out = {"wrong_in_lowest_5pct": round(float(np.mean(~right[lowest])), 3)}
    if right.all() or not right.any():
        out["auc"] = None
    else:
        u = stats.mannwhitneyu(scores[right], scores[~right]).statistic
        out["auc"] = round(float(u / (right.sum() * (~right).sum())), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=Path, default=REPO.parent / "shared" / "real" / "butterfly_top",
                        help="a dataset folder with one image and its reference mask")
    parser.add_argument("--models", default="sam2-tiny",
                        help="comma-separated SAM 2 models (registry names, checkpoints or fine-tunes)")
    parser.add_argument("--base", default=None, help="the base checkpoint of fine-tunes")
    args = parser.parse_args()

    ds = Dataset.open(args.photo)
    sample = ds.samples[0]
    image, truth = ds.image(sample), ds.instances(sample)
    unknown = ds.unknown(sample)  # where nobody annotated (None: everywhere annotated)
    report = {"photo": args.photo.name, "size": f"{image.shape[1]}x{image.shape[0]}",
              "tesserae": int(len(np.unique(truth)) - 1), "models": {}}
    for spec in [m for m in args.models.split(",") if m]:
        engine = Sam2Engine.from_spec(spec, device="cpu", base=args.base if spec.endswith(".pt") and args.base
                                      and Path(spec).resolve() != Path(args.base).resolve() else None)
        predictor = Predictor(2**30, prelabel_scores=True)
        started = time.perf_counter()
        instances, kept = predictor.prelabel(engine, image, "photo", Deadline.after(3600, "bench"))
        prelabel_s = time.perf_counter() - started
        tile, overlap = predictor.tiling(image, "photo")
        started = time.perf_counter()
        second = predictor._tessera_scores(engine, image, instances, tile, overlap)
        second_s = time.perf_counter() - started
        kept, second = np.asarray(kept), np.asarray(second)
        right = region_iou(truth, instances) >= RIGHT_IOU
        if unknown is not None:  # regions mostly where the reference does not know: not scored
            n = int(instances.max())
            inside = np.bincount(instances[unknown], minlength=n + 1)[1:]
            known = inside < 0.5 * np.bincount(instances.ravel(), minlength=n + 1)[1:]
            kept, second, right = kept[known], second[known], right[known]
        report["models"][engine.model_version] = {
            "regions": int(instances.max()), "scored": int(len(right)), "wrong_share": round(float(np.mean(~right)), 3),
            "prelabel_s": round(prelabel_s, 1), "second_pass_s": round(second_s, 1),
            "guided_scores": score_quality(kept, right), "second_pass_scores": score_quality(second, right),
            "spearman": round(float(stats.spearmanr(kept, second).statistic), 3),
        }
        print(json.dumps(report["models"][engine.model_version]), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
