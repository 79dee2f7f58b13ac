"""Benchmark fine-tuning: an epoch with the embedding cache against one re-encoding every image.

Same run, same model, same data: synthetic mosaics (toolkit/data/synth.py), one Trainer; after the
cache is built (timed separately) training epochs alternate between reading the cached
features and running the frozen image encoder on every image at every step (what the thesis's
code did). Each variant runs ``--repeats`` times; the fastest of each is reported, with the
ratio re-encoding / cached; every variant is timed twice, with the decoder as training runs it
(``PromptDecoder``: the image side of the first transformer layer once per image) and as sam2
runs it (``sam2_decoder_path``: the image repeated per prompt), so one run shows both. One more cached epoch is then profiled by phase
(``Trainer.timings``: data loading, features to the device, decoder forward, loss forward at
full resolution, backward, optimizer; seconds per step). Prints one JSON object.

``flops`` is the device-independent cost model (``flop_model``): FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions, attention; not
elementwise work) of the frozen image encoder's forward per image, and of one training step of
the decoder per prompt (prompt encoder + mask decoder forward, the loss, the backward: the
trainer's own ``decode_items`` / ``batch_loss``). A re-encoding step costs E + P·D for an image
with P prompts, a cached one P·D, so ``ceiling_ratio`` (E + P·D) / (P·D) bounds what the cache
can gain on any device, for P = 1, 16, 64 (the training default), 100 (the thesis: every
tessera of a ~100-tessera crop) and the run's ``--max-prompts``. ``--flops-only`` prints it
alone (seconds, even for SAM 2.1 large at 1024²: the encoder is counted on meta tensors).

Without ``--model`` a SAM 2.1 model with RANDOM weights is built (no weights can be downloaded
here; ``--arch`` picks its size): timings do not depend on the weights.

Run: ``.venv/bin/python bench/bench_train.py [--arch sam2.1-large] [--image-size 1024] [--n 6]``.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from mosaic_toolkit.core.dataset import write_manifest
from mosaic_toolkit.sam.adapter import PromptDecoder, Sam2Adapter, feature_sizes
from mosaic_toolkit.sam.models import build_sam2_model
from mosaic_toolkit.training.trainer import (
    TrainConfig, Trainer, batch_loss, decode_items, freeze_all_but_decoder,
)
from mosaic_toolkit.data.synth import synth_dataset
from mosaic_toolkit.sam.weights import MODELS

import random_model


def random_checkpoint(arch: str, folder: Path, seed: int) -> Path:
    return random_model.random_checkpoint(folder, arch, seed)


CEILING_PROMPTS = (1, 16, 64, 100)  # one prompt; the bench's default; train's default; the thesis


def flop_model(arch: str, image_size: int, score_weight: float = 0.2, output: str = "single",
               extra_prompts: int | None = None) -> dict:
    """FLOPs of the encoder per image and of a decoder training step (module doc).

    The decoder step runs for real on CPU (random weights, on one ``image_size`` image with
    features of the right shapes) with 1 and with 3 prompts: the difference is the cost per
    prompt D, the rest the cost per image S (the image side of the first transformer layer,
    once per image; 0 on sam2's path). The encoder is counted on meta tensors (no data:
    Hiera-L at 1024² costs nothing to count). Ceiling: (E + S + P·D) / (S + P·D).
    """
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_sam2_model(MODELS[arch].config, None, "cpu", image_size=image_size)
    freeze_all_but_decoder(model)
    decoder = PromptDecoder(model, output)
    decoder.train()
    sam = Sam2Adapter(model)
    cpu = torch.device("cpu")
    (h0, w0), (h1, w1), (h2, w2) = feature_sizes(model)
    dim = model.sam_mask_decoder.transformer_dim  # cached high-res features: after conv_s0 / conv_s1
    feats = [torch.randn(1, dim, h2, w2), torch.randn(1, dim // 8, h0, w0), torch.randn(1, dim // 4, h1, w1)]
    side = image_size

    def step_flops(prompts: int) -> tuple[int, int, int]:
        """(decoder forward, loss forward, backward) FLOPs of one step with ``prompts`` prompts."""
        k = torch.arange(prompts)
        item = {
            "points": torch.stack([(k * 7) % side, (k * 13) % side], 1).float(), "hw": (side, side),
            "ids": k + 1, "instances": torch.zeros(side, side, dtype=torch.int64),
        }
        with FlopCounterMode(display=False) as counter:
            outputs = decode_items(decoder, sam, [item], [feats], cpu)
            forward = counter.get_total_flops()
            loss, _, _ = batch_loss([item], outputs, score_weight, cpu)
            loss_fwd = counter.get_total_flops() - forward
            loss.backward()
            return forward, loss_fwd, counter.get_total_flops() - forward - loss_fwd

    steps = {}
    for share in (True, False):
        decoder.share_image = share
        one, three = step_flops(1), step_flops(3)
        per_prompt = [(c - a) / 2 for a, c in zip(one, three)]
        steps[share] = (per_prompt, [a - p for a, p in zip(one, per_prompt)])
    model.to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_image(torch.zeros(1, 3, side, side, device="meta"))
        encoder = counter.get_total_flops()
    del model, decoder, sam
    counts = sorted({*CEILING_PROMPTS, *([extra_prompts] if extra_prompts else [])})
    parts = ("decoder forward", "loss forward", "backward")

    def decoder_step(per_prompt: list[float], per_image: list[float]) -> dict:
        d, s = sum(per_prompt), sum(per_image)
        return {
            "decoder_step_gflop_per_prompt": round(d / 1e9, 3),
            "decoder_step_gflop_per_image": round(s / 1e9, 3),
            "decoder_step_parts_gflop_per_prompt": {k: round(v / 1e9, 3) for k, v in zip(parts, per_prompt)},
            "encoder_per_decoder_prompt": round(encoder / d, 1),
            "ceiling_ratio": {str(p): round((encoder + s + p * d) / (s + p * d), 2) for p in counts},
            "max_prompts_for_10x": max(0, math.floor((encoder - 9 * s) / (9 * d))),
        }

    return {
        "counted": "FlopCounterMode: matmul, convolution, attention FLOPs (2 per multiply-add); "
                   "elementwise work (activations, norms, the loss's upsampling) not counted",
        "encoder_gflop_per_image": round(encoder / 1e9, 2),
        **decoder_step(*steps[True]),
        "sam2_decoder_path": decoder_step(*steps[False]),  # the image repeated per prompt
    }


def timed_epoch(trainer: Trainer, epoch: int, use_cache: bool) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one training epoch."""
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train_epoch(epoch, use_cache=use_cache)  # every step ends in loss.item(): synchronised
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="installed model name, checkpoint or fine-tune (default: random weights)")
    ap.add_argument("--arch", default="sam2.1-tiny", choices=sorted(MODELS), help="random-weight model size")
    ap.add_argument("--n", type=int, default=6, help="training images (one more is the val split)")
    ap.add_argument("--size", type=int, default=512, help="longest side of the synthetic images")
    ap.add_argument("--image-size", type=int, default=512, help="model input resolution")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="timed epochs per variant")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--flops-only", action="store_true", help="print the FLOP cost model alone, no timing")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flops = flop_model(args.arch, args.image_size, extra_prompts=args.max_prompts or None)
    if args.flops_only:
        print(json.dumps({"model": f"{args.arch} (random weights)", "image_size": args.image_size,
                          "flops": flops}, indent=1))
        return

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        samples = synth_dataset(
            tmp / "data", args.n + 1, seed=args.seed, min_size=args.size, max_size=args.size
        )
        for i, sample in enumerate(samples):
            sample.split = "val" if i == args.n else "train"
        write_manifest(tmp / "data", samples)
        base = args.model or random_checkpoint(args.arch, tmp, args.seed)
        config = TrainConfig(
            epochs=4 * args.repeats + 2, batch_size=args.batch_size, max_prompts=args.max_prompts,
            image_size=args.image_size, seed=args.seed,
        )
        trainer = Trainer(tmp / "data", base, tmp / "run", config, device=args.device, progress=False)

        start = time.perf_counter()
        trainer.prepare()  # builds the embedding cache
        cache_build = time.perf_counter() - start
        timed_epoch(trainer, 0, use_cache=True)  # warm-up (allocator, kernels, page cache)
        # Each variant with the decoder as trained now (image side of the first layer once per
        # image) and as sam2 runs it (image repeated per prompt), alternated in each repeat.
        times = {(c, share): [] for c in (True, False) for share in (True, False)}
        epoch = 1
        for r in range(args.repeats):
            for use_cache in (True, False):
                for share in (True, False):
                    trainer.decoder.share_image = share
                    times[use_cache, share].append(timed_epoch(trainer, epoch, use_cache=use_cache))
                    epoch += 1
        trainer.decoder.share_image = True
        cached, reencoded = times[True, True], times[False, True]
        cached_sam2, reencoded_sam2 = times[True, False], times[False, False]
        # Where a cached step spends its time (one more cached epoch, phases timed).
        trainer.timings = {}
        profiled = timed_epoch(trainer, epoch, use_cache=True)[0]
        phases = {k: round(v / trainer.steps_per_epoch, 3) for k, v in trainer.timings.items()}
        trainer.timings = None
        cache_files = list(trainer.cache.folder.glob("*.pt"))
        cache_mb = sum(f.stat().st_size for f in cache_files) / 2**20 / max(len(cache_files), 1)

    def variant(cached: list, reencoded: list) -> dict:
        wall = {"cached": [w for w, _ in cached], "reencode": [w for w, _ in reencoded]}
        cpu = {"cached": [c for _, c in cached], "reencode": [c for _, c in reencoded]}
        out = {
            "epoch_cached_s": round(min(wall["cached"]), 3),
            "epoch_reencode_s": round(min(wall["reencode"]), 3),
            "all_cached_s": [round(t, 3) for t in wall["cached"]],
            "all_reencode_s": [round(t, 3) for t in wall["reencode"]],
            "speedup_cached": round(min(wall["reencode"]) / min(wall["cached"]), 2),
        }
        if device.type == "cpu":  # CPU time: what other jobs on a shared machine do not change
            out.update({
                "epoch_cached_cpu_s": round(min(cpu["cached"]), 3),
                "epoch_reencode_cpu_s": round(min(cpu["reencode"]), 3),
                "speedup_cached_cpu_time": round(min(cpu["reencode"]) / min(cpu["cached"]), 2),
            })
        return out

    device = trainer.device
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch_threads": torch.get_num_threads(),
        "model": args.model or f"{args.arch} (random weights)",
        "image_size": trainer.model.image_size,
        "image_px": args.size,
        "train_images": args.n,
        "batch_size": args.batch_size,
        "max_prompts": args.max_prompts,
        "steps_per_epoch": trainer.steps_per_epoch,
        "cache_build_s": round(cache_build, 3),
        "cache_mb_per_image": round(cache_mb, 2),
        **variant(cached, reencoded),
        "sam2_decoder_path": variant(cached_sam2, reencoded_sam2),  # before: the image repeated per prompt
        "cached_epoch_gain_shared_image": round(min(w for w, _ in cached_sam2) / min(w for w, _ in cached), 2),
        "cached_epoch_gain_shared_image_cpu_time": round(min(c for _, c in cached_sam2) / min(c for _, c in cached), 2),
        "cached_step_s": round(profiled / trainer.steps_per_epoch, 3),
        "cached_step_phases_s": phases,
        "flops": flops if not args.model else "counted for --arch (random weights), not --model",
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
