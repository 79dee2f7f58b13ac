"""Fine-tune the real SAM 2 on a real photograph on CPU, and compare it with its base; prints JSON.

Reads the real photograph ``butterfly_top`` (the top half of a mosaic and its tessera mask, in
the dataset layout) from ``--shared`` (default ``../shared/real`` next to the repository) and:

1. cuts it into crops of about ``--tesserae-per-crop`` tesserae with ``mosaic-toolkit
   augment``: one mosaic, so it is split spatially into a train band and a val band (the val
   band on the right, ``--val-fraction`` of the width), a largest-tessera gap apart, so that no
   tessera is in both; every crop is rotated and flipped (train) and the val crops are used as
   they are. ``--synth N`` adds N synthetic mosaics (``synth``, cropped the same way) to train;
2. fine-tunes the prompt encoder and mask decoder of ``--base`` with ``mosaic-toolkit train``
   (a separate process, the real command) into ``OUT/run`` and copies the kept epoch to
   ``OUT/finetune.pt``;
3. compares base and fine-tuned on the val band:
   - clicks: one click at every val tessera's point (its interior point farthest from the
     border) of the val crops, the mask against the tessera. Fine-tuned: its served output
     (the trained single token, as the backend answers a click). Base: the best of SAM 2's
     three candidates by IoU with the tessera (``best_of_three``, an oracle: the base's
     ceiling) and the one SAM 2 scores best (``served``, what an annotator gets). The same
     again (``off_centre``) for a click at a random pixel halfway to the tessera's outline and
     one at a quarter of its depth, as annotators who do not aim at the centre click;
   - pre-labels: ``segment`` (each model's default method) of the whole val band, scored as
     ``mosaic-toolkit eval`` does: tile F, count error, pixel IoU. Tesserae that the band's
     border cuts are marked unknown (not scored, neither right nor wrong), as a partial export;
4. writes ``OUT/report.json`` (also printed) and ``OUT/learning_curve.png`` (training loss,
   validation prompted IoU and segmentation Dice per epoch, with the base's click IoU).

Every stage's seconds are in the report (``seconds``), with the per-step cost of training
(``cost``), so a run on a loaded machine can be extrapolated to idle cores.

Run: ``.venv/bin/python bench/bench_finetune_real.py --base sam2_hiera_tiny.pt --out DIR``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "real"
PHOTO = "butterfly_top"

# The recipe (see docs/fine-tuning.md for what each choice costs and why).
DEFAULTS = dict(image_size=1024, epochs=8, batch_size=4, lr=3e-4, weight_decay=1e-5, max_prompts=16,
                tesserae_per_crop=100, val_fraction=0.2, val_every=1)


def fail(message: str) -> None:
    print(f"bench_finetune_real: {message}", file=sys.stderr)
    sys.exit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="base SAM 2 checkpoint (path or installed name)")
    ap.add_argument("--out", required=True, type=Path, help="folder to create (must not exist or be empty)")
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                    help=f"folder holding {PHOTO}/ (default: ../shared/real beside the repository)")
    ap.add_argument("--synth", type=int, default=0, help="synthetic mosaics added to the training data")
    ap.add_argument("--image-size", type=int, default=DEFAULTS["image_size"], help="model input resolution")
    ap.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    ap.add_argument("--max-prompts", type=int, default=DEFAULTS["max_prompts"],
                    help="tesserae prompted per image and step")
    ap.add_argument("--val-every", type=int, default=DEFAULTS["val_every"],
                    help="validate every N epochs (and after the last)")
    ap.add_argument("--tesserae-per-crop", type=int, default=DEFAULTS["tesserae_per_crop"])
    ap.add_argument("--val-fraction", type=float, default=DEFAULTS["val_fraction"],
                    help="share of the photograph's width in the val band")
    ap.add_argument("--transforms", default="identity,rot90,rot180,hflip",
                    help="augment's transforms of the training crops")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the budget is 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="stages to run, in order (data, train, base, finetuned, report); each writes "
                    "OUT/stages/<stage>.json, which later stages read: a stopped run continues")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="embedding cache of an earlier run to reuse (entries are keyed by image and model)")
    ap.add_argument("--skip-base-prelabels", action="store_true",
                    help="do not segment the val band with the base model (its slowest stage)")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def build_data(args: argparse.Namespace, out: Path) -> dict:
    """OUT/data (augmented train crops + val crops), OUT/val_band (the val band, one sample)."""
    from mosaic_toolkit.core.dataset import Dataset, write_manifest, write_sample
    from mosaic_toolkit.data.augment import augment_dataset, crop_instances, spatial_parts

    photo = args.shared / PHOTO
    data = out / "data"
    split = (1 - args.val_fraction, args.val_fraction, 0.0)
    summary = augment_dataset(photo, data, tesserae_per_crop=args.tesserae_per_crop, split=split,
                              transforms=[t for t in args.transforms.split(",") if t], seed=args.seed)
    ds = Dataset.open(data)
    samples = list(ds.samples)
    # Validation runs every val crop through the whole-image method: the crops as they are
    # suffice (their rotations would multiply that cost, not the information).
    for s in samples:
        if s.split == "val" and s.source.get("transform") != "identity":
            s.split = "test"
    n_synth = 0
    if args.synth > 0:
        from mosaic_toolkit.data.synth import synth_dataset

        synth_dataset(out / "synth", args.synth, seed=args.seed + 1, min_size=400, max_size=1024)
        synth_aug = augment_dataset(out / "synth", out / "synth_aug", tesserae_per_crop=args.tesserae_per_crop,
                                    split=(1.0, 0.0, 0.0), transforms=["identity", "rot90", "hflip"],
                                    seed=args.seed)
        extra = Dataset.open(out / "synth_aug")
        for s in extra.samples:
            for folder in ("images", "masks", "instances", "points"):
                for f in (out / "synth_aug" / folder).glob(f"{s.stem}.*"):
                    (data / folder).mkdir(exist_ok=True)
                    shutil.copyfile(f, data / folder / f"synth_{f.name}")
            s.stem, s.image, s.split = f"synth_{s.stem}", f"images/synth_{Path(s.image).name}", "train"
            samples.append(s)
        n_synth = synth_aug.outputs
    manifest = json.loads((data / "manifest.json").read_text())
    write_manifest(data, samples, **{k: v for k, v in manifest.items() if k not in ("version", "samples")})

    # The val band as one sample; tesserae its border cuts are unknown (not scored).
    parent_ds = Dataset.open(photo)
    parent = parent_ds.samples[0]
    image, instances = parent_ds.image(parent), parent_ds.instances(parent)
    cut = spatial_parts(instances, split, parent.stem)
    x0, y0, x1, y1 = cut.parts["val"]
    band_ids = crop_instances(instances, (x0, y0, x1, y1), 1.0)  # wholly inside only
    raw = instances[y0:y1, x0:x1]
    unknown = (raw > 0) & (band_ids == 0)
    from mosaic_toolkit.core.io import write_mask

    band = out / "val_band"
    write_mask(band / "unknown" / "val_band.png", np.where(unknown, 255, 0).astype(np.uint8))
    sample = write_sample(band, "val_band", image[y0:y1, x0:x1], band_ids,
                          source={"parent": parent.stem, "crop": [x0, y0, x1, y1],
                                  "unknown": "unknown/val_band.png"}, split="val")
    write_manifest(band, [sample])
    return {
        "photo": PHOTO, "cut": cut.to_json(),
        "train_images": sum(s.split == "train" for s in samples), "synthetic_train_images": n_synth,
        "val_crops": sum(s.split == "val" for s in samples),
        "train_tesserae": int(sum(s.tesserae for s in samples if s.split == "train")),
        "val_band": {"size": f"{x1 - x0}x{y1 - y0}", "tesserae_scored": int(len(np.unique(band_ids)) - 1),
                     "tesserae_cut_by_border_unknown": int(len(np.unique(raw[unknown])))},
        "augment_note": summary.spatial_note(),
    }


# --------------------------------------------------------------------------------------------
# Training (the real command, in its own process)
# --------------------------------------------------------------------------------------------
def run_train(args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mosaic_toolkit.cli.train", str(out / "data"), "--base", str(args.base),
           "--out", str(out / "run"), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--weight-decay", str(args.weight_decay), "--max-prompts", str(args.max_prompts),
           "--image-size", str(args.image_size), "--val-every", str(args.val_every), "--seed", str(args.seed),
           "--device", "cpu"] + (["--cache-dir", str(args.cache_dir)] if args.cache_dir else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print("+ mosaic-toolkit train " + " ".join(cmd[4:]), file=sys.stderr, flush=True)
    started = time.perf_counter()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, env=env)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if done.returncode != 0:
        fail(f"mosaic-toolkit train failed (exit {done.returncode})")
    seconds = time.perf_counter() - started
    with open(out / "run" / "metrics.csv", newline="") as fh:
        history = [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                   for row in csv.DictReader(fh)]
    shutil.copyfile(out / "run" / "finetune.pt", out / "finetune.pt")
    return {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "history": history, "command": "mosaic-toolkit train " + " ".join(cmd[4:])}


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
#: Off-centre clicks: a pixel at this part of the tessera's greatest depth (its distance from the
#: outline at its most interior point), as an annotator who does not aim at the centre clicks.
OFF_CENTRE_DEPTHS = {"half_depth": 0.5, "quarter_depth": 0.25}


def click_points(truth: np.ndarray, point: tuple[int, int], rng: np.random.Generator) -> dict[str, tuple[int, int]]:
    """The clicks scored on one tessera: its point (``centre``) and one random pixel at each of
    :data:`OFF_CENTRE_DEPTHS` (within 0.75 px of that depth)."""
    import cv2

    depth = cv2.distanceTransform(np.pad(truth, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    clicks = {"centre": (int(point[0]), int(point[1]))}
    for name, share in OFF_CENTRE_DEPTHS.items():
        ys, xs = np.nonzero(truth & (np.abs(depth - share * depth.max()) <= 0.75))
        if len(ys) == 0:
            ys, xs = np.nonzero(truth)
        j = rng.integers(len(ys))
        clicks[name] = (int(xs[j]), int(ys[j]))
    return clicks


def click_scores(engine, data, samples, best_of_three: bool) -> dict:
    """Mean IoU of one click on every tessera of ``samples`` (reference specks left out), at its
    point and off its centre (:func:`click_points`, the same pixels for every model): the served
    mask, and (for a base model) the best of SAM 2's three candidates by IoU with the tessera."""
    import torch

    from mosaic_toolkit.evaluation.metrics import drop_specks

    served: dict[str, list[float]] = {}
    oracle: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)

    def iou(mask: np.ndarray, truth: np.ndarray) -> float:
        return float((mask & truth).sum() / max(1, (mask | truth).sum()))

    for sample in samples:
        image, instances = data.image(sample), data.instances(sample)
        kept = drop_specks(instances)[0]  # reference specks are not tesserae (as eval scores)
        entry = engine._encoded(image)[1] if best_of_three else None  # the sample's features, once
        for k, point in enumerate(data.points(sample), start=1):
            truth = instances == k
            if not kept[truth].any():
                continue
            for name, (x, y) in click_points(truth, point, rng).items():
                mask, _ = engine.predict_points(image, [[x, y]], [1])
                served.setdefault(name, []).append(iou(mask, truth))
                if best_of_three:
                    with torch.inference_mode():
                        logits, _, _ = engine._sam.click(entry.features, entry.hw, np.array([[x, y]], np.float32),
                                                         np.array([1]), None)
                    oracle.setdefault(name, []).append(max(iou(c, truth) for c in logits > 0))

    def scores(name: str) -> dict:
        values = np.array(served[name])
        result = {"served": round(float(values.mean()), 4), "tesserae": len(values),
                  "share_under_0.75": round(float(np.mean(values < 0.75)), 4)}
        if best_of_three:
            result["best_of_three"] = round(float(np.mean(oracle[name])), 4)
        return result

    return {**scores("centre"), "off_centre": {name: scores(name) for name in OFF_CENTRE_DEPTHS}}


def prelabel_scores(engine, band: Path, work: Path) -> dict:
    from mosaic_toolkit.evaluation.evaluate import evaluate
    from mosaic_toolkit.segment import segment_paths

    shutil.rmtree(work, ignore_errors=True)  # a stage run again replaces its own earlier output
    started = time.perf_counter()
    records = segment_paths([band], work / "pred", engine, progress=False)
    seconds = time.perf_counter() - started
    report = evaluate(work / "pred", band, work / "eval")
    mean = report["mean"]
    return {"tile_f": round(mean["tile"]["f_measure"], 4), "count_error": round(mean["tile"]["count_error"], 4),
            "pixel_iou": round(mean["pixel"]["iou"], 4), "regions": int(records[0]["tesserae"]),
            "method": engine.params.method, "seconds": round(seconds, 1)}


def evaluate_model(model: str, base: str | None, args, out: Path, name: str, prelabels: bool) -> dict:
    from mosaic_toolkit.core.dataset import Dataset
    from mosaic_toolkit.sam.engine import Sam2Engine

    engine = Sam2Engine.from_spec(model, device="cpu", base=base,
                                  image_size=args.image_size if base is None else None)
    data = Dataset.open(out / "data")
    val = [s for s in data.split("val")]
    started = time.perf_counter()
    clicks = click_scores(engine, data, val, best_of_three=base is None)
    result = {"model_version": engine.model_version, "output": engine.output,
              "image_size": engine.model.image_size, "clicks": clicks,
              "click_seconds": round(time.perf_counter() - started, 1)}
    if prelabels:
        result["prelabels"] = prelabel_scores(engine, out / "val_band", out / f"eval_{name}")
    return result


def plot_curve(path: Path, history: list[dict], base: dict) -> None:
    import matplotlib.pyplot as plt

    from mosaic_toolkit.training.outputs import history_figure

    fig, ax, ax2 = history_figure(history, (
        ("val_prompt_iou", "^-", "tab:green", "click IoU, fine-tuned (val)"),
        ("val_dice", "s-", "tab:orange", "segmentation Dice (val)")))
    clicks = base["clicks"]
    ax2.axhline(clicks["best_of_three"], color="tab:red", ls="--", label="click IoU, base best of three")
    ax2.axhline(clicks["served"], color="tab:gray", ls=":", label="click IoU, base as served")
    low = min([clicks["served"]] + [r["val_prompt_iou"] for r in history if r.get("val_prompt_iou")]
              + [r["val_dice"] for r in history if r.get("val_dice")])
    ax2.set_ylim(max(0.0, low - 0.05), 1.0)
    lines = ax.get_lines() + ax2.get_lines()
    ax2.legend(lines, [line.get_label() for line in lines], loc="lower left", fontsize="small")
    ax.set_title("Fine-tuning the real SAM 2 tiny on a real mosaic (CPU)")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


STAGES = ("data", "train", "base", "finetuned", "report")


def _stage_file(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.json"


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        fail(f"--stages: unknown {', '.join(unknown)} (choose from {', '.join(STAGES)})")
    if not (args.shared / PHOTO / "images").is_dir():
        fail(f"{args.shared / PHOTO}: the real photograph is not there (give --shared PATH)")
    out = args.out
    if "data" in stages and out.exists() and any(out.iterdir()):
        fail(f"{out}: exists and is not empty")
    needs = {"train": ["data"], "base": ["data"], "finetuned": ["data", "train"],
             "report": ["data", "train", "base", "finetuned"]}
    for stage in stages:
        for earlier in needs.get(stage, []):
            if earlier not in stages and not _stage_file(out, earlier).is_file():
                fail(f"{out}: stage {stage!r} needs stage {earlier!r}, which has not run")
    import torch

    from mosaic_toolkit.sam.models import resolve_model

    torch.set_num_threads(args.threads)
    try:
        base_spec = resolve_model(args.base)
    except Exception as exc:  # MosaicError: a clear message, no traceback
        fail(str(exc))
    args.base = str(base_spec.base_checkpoint)
    (out / "stages").mkdir(parents=True, exist_ok=True)

    def record(stage: str, result: dict, started: float, cpu: float) -> None:
        result = {**result, "seconds": round(time.perf_counter() - started, 1),
                  "cpu_seconds": round(result.get("cpu_seconds", _own_cpu() - cpu), 1)}
        _stage_file(out, stage).write_text(json.dumps(result, indent=1))
        print(f"{stage}: " + json.dumps({k: v for k, v in result.items() if k != "history"}), file=sys.stderr,
              flush=True)

    if "data" in stages:
        t, c = time.perf_counter(), _own_cpu()
        record("data", build_data(args, out), t, c)
    if "train" in stages:
        t = time.perf_counter()
        record("train", run_train(args, out), t, 0.0)
    if "base" in stages:
        t, c = time.perf_counter(), _own_cpu()
        record("base", evaluate_model(args.base, None, args, out, "base", not args.skip_base_prelabels), t, c)
    if "finetuned" in stages:
        t, c = time.perf_counter(), _own_cpu()
        record("finetuned", evaluate_model(str(out / "finetune.pt"), args.base, args, out, "finetuned", True), t, c)
    if "report" in stages:
        report = make_report(args, out)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))


def make_report(args: argparse.Namespace, out: Path) -> dict:
    done = {s: json.loads(_stage_file(out, s).read_text()) for s in STAGES[:-1] if _stage_file(out, s).is_file()}
    missing = [s for s in STAGES[:-1] if s not in done]
    if missing:
        fail(f"{out}: stages {', '.join(missing)} have not run")
    train, b, f = done["train"], done["base"], done["finetuned"]
    report: dict = {"base": args.base, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in vars(args).items()}}
    report["data"] = {k: v for k, v in done["data"].items() if k not in ("seconds", "cpu_seconds")}
    report["training"] = {"command": train["command"], "history": train["history"]}
    report["base_model"], report["finetuned"] = b, f
    seconds = {s: done[s]["seconds"] for s in STAGES[:-1]}
    cpu = {s: done[s]["cpu_seconds"] for s in STAGES[:-1]}
    seconds["total"], cpu["total"] = round(sum(seconds.values()), 1), round(sum(cpu.values()), 1)
    report["seconds"] = seconds
    # On a machine shared with other work, wall time overstates the cost: CPU seconds / threads
    # is what the same work takes on idle cores (when the threads scale; a lower bound).
    report["cpu_seconds"] = cpu
    report["idle_estimate_minutes"] = round(cpu["total"] / args.threads / 60, 1)
    history = train["history"]
    prompts = int(report["data"]["train_images"]) * args.max_prompts
    report["cost"] = {
        "epochs": len(history), "prompts_per_epoch": prompts,
        "train_cpu_seconds_per_epoch_with_validation": round(train["cpu_seconds"] / max(1, len(history)), 1),
        "note": "training CPU seconds include encoding the training images once and validating each epoch",
    }
    goals = {"click_single_minus_base_best_of_three": round(f["clicks"]["served"] - b["clicks"]["best_of_three"], 4)}
    goals["click_goal_met"] = goals["click_single_minus_base_best_of_three"] >= 0.01
    fp = f["prelabels"]
    if "prelabels" in b:
        bp = b["prelabels"]
        goals["finetuned_at_least_base_everywhere"] = bool(
            fp["tile_f"] >= bp["tile_f"] and fp["count_error"] <= bp["count_error"]
            and fp["pixel_iou"] >= bp["pixel_iou"] and f["clicks"]["served"] >= b["clicks"]["served"])
    goals["prelabel_goals_met"] = {"tile_f>=0.96": fp["tile_f"] >= 0.96, "count_error<=0.02": fp["count_error"] <= 0.02,
                                   "pixel_iou>=0.93": fp["pixel_iou"] >= 0.93}
    report["goals"] = goals
    # Not a goal (the goals' click is at the tessera's point): clicks away from the centre.
    report["off_centre_clicks"] = {
        n: {"base_served": b["clicks"]["off_centre"][n]["served"],
            "base_best_of_three": b["clicks"]["off_centre"][n]["best_of_three"],
            "finetuned": f["clicks"]["off_centre"][n]["served"],
            "finetuned_minus_base_served": round(f["clicks"]["off_centre"][n]["served"]
                                                 - b["clicks"]["off_centre"][n]["served"], 4)}
        for n in OFF_CENTRE_DEPTHS}
    plot_curve(out / "learning_curve.png", history, b)
    return report


if __name__ == "__main__":
    main()
