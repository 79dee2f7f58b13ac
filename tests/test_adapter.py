"""toolkit/sam/adapter.py: the one home of sam2's internals.

Train/serve parity (the training decoder and the engine give identical logits for the same
image, points and weights) and the bfloat16 paths on CPU: ``torch.autocast("cpu", bfloat16)``
around decoding and a training step shows the dtype mismatches that would break CUDA bf16.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mosaic_toolkit.sam.adapter import PromptDecoder, feature_sizes
from mosaic_toolkit.sam.engine import Sam2Engine
from mosaic_toolkit.training.trainer import FeatureEncoder, TrainConfig, Trainer, decode_items

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POINTS = np.array([[15.0, 15.0], [100.5, 47.0], [200.0, 150.0], [250.0, 10.0]], np.float32)
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_nothing_outside_the_adapter_names_sam2_internals():
    root = Path(__file__).resolve().parents[1]
    private = r"\._features\|_bb_feat_sizes\|_orig_hw\|_is_image_set\|_transforms"
    found = subprocess.run(["grep", "-rln", private, "toolkit", "backend"], cwd=root,
                           capture_output=True, text=True).stdout.split()
    assert found == ["toolkit/sam/adapter.py"]


def test_train_serve_parity(sam2_engine, tessera_grid_image):
    """Same image, points and weights: the training decoder (no grad) gives the engine's logits."""
    image, _ = tessera_grid_image
    engine = Sam2Engine(sam2_engine.model, version="parity", cache_bytes=2**30)
    served_logits, served_ious = engine.decode_points(image, POINTS, batch=len(POINTS))

    encoder = FeatureEncoder(engine.model)
    [feats] = encoder([image])
    item = {"points": torch.from_numpy(POINTS), "hw": image.shape[:2]}
    decoder = PromptDecoder(engine.model)
    with torch.no_grad():
        [(logits, ious)] = decode_items(decoder, encoder.sam, [item], [feats], engine.device)
    # The training encoder (set_image_batch) and the engine's (set_image) give the same features...
    key = engine.encode(image)
    cached = engine._cache.get(key).features
    for a, b in zip([cached["image_embed"], *cached["high_res_feats"]], feats):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # ...and the same features decode to identical logits through the training decoder.
    with torch.no_grad():
        [(same_feats_logits, same_feats_ious)] = decode_items(
            decoder, encoder.sam, [item],
            [[cached["image_embed"], *cached["high_res_feats"]]], engine.device,
        )
    assert torch.equal(same_feats_logits, served_logits)
    assert torch.equal(same_feats_ious, served_ious)
    torch.testing.assert_close(logits, served_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ious, served_ious, rtol=1e-4, atol=1e-4)
    assert logits.shape == (len(POINTS), *feature_sizes(engine.model)[0])


def test_bf16_decoding_on_cpu(sam2_engine, tessera_grid_image):
    image, _ = tessera_grid_image
    reference, _ = sam2_engine.decode_points(image, POINTS)
    engine = Sam2Engine(sam2_engine.model, version="bf16", cache_bytes=2**30)  # encode under bf16 too
    with torch.autocast(**BF16):
        logits, ious = engine.decode_points(image, POINTS)
        mask, score = engine.predict_points(image, POINTS[:1], [1])
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    assert torch.isfinite(logits).all() and torch.isfinite(ious).all()
    assert mask.shape == image.shape[:2] and np.isfinite(score)
    # bf16 keeps ~3 significant digits: the masks agree with full precision almost everywhere.
    agree = ((logits > 0) == (reference > 0)).float().mean().item()
    assert agree > 0.9


@pytest.mark.parametrize("use_cache", [True, False])
def test_bf16_training_step_on_cpu(tiny_dataset, tiny_sam2_checkpoint, tmp_path, use_cache):
    config = TrainConfig(epochs=1, batch_size=2, lr=1e-3, max_prompts=0, image_size=128)
    trainer = Trainer(tiny_dataset, tiny_sam2_checkpoint, tmp_path / "run", config,
                      cache_dir=tmp_path / "cache", cache_embeddings=use_cache, progress=False)
    trainer.prepare()
    items = next(iter(trainer._loader(0)))
    before = {n: p.detach().clone() for n, p in trainer.decoder.named_parameters()}
    with torch.autocast(**BF16):
        losses = trainer.train_step(items, use_cache=use_cache)
    assert all(np.isfinite(v) for v in losses.values())
    assert losses["loss"] > 0
    changed = [n for n, p in trainer.decoder.named_parameters() if not torch.equal(before[n], p)]
    assert changed, "no weight changed"
    assert all(torch.isfinite(p).all() for p in trainer.decoder.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.decoder.parameters())


def test_unsupported_sam2_fails_at_import_in_one_line(tmp_path):
    """A sam2 whose predictor lacks a private attribute is refused with the version named."""
    code = (
        "import inspect, sys\n"
        "import sam2.sam2_image_predictor as m\n"
        "real = inspect.getsource\n"
        "inspect.getsource = lambda obj: real(obj).replace('self._orig_hw', 'self._hw') if obj is m.SAM2ImagePredictor else real(obj)\n"
        "import mosaic_toolkit.sam.adapter\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "sam2 1.1.0 is not supported" in last and "_orig_hw" in last


@pytest.mark.parametrize("output", ["single", "multimask-first", "sam2"])
def test_shared_image_decoding_matches_sam2(sam2_engine, tessera_grid_image, output):
    """PromptDecoder's decoding with the first layer's image side computed once per image gives
    sam2's ``predict_masks`` (image repeated per prompt): same logits and IoUs, in training
    mode (with the same gradients of every trained parameter) and in eval mode."""
    import copy

    from mosaic_toolkit.training.trainer import freeze_all_but_decoder

    image, _ = tessera_grid_image
    model = copy.deepcopy(sam2_engine.model)  # gradients and requires_grad stay off the fixture
    trainable = freeze_all_but_decoder(model)
    [feats] = FeatureEncoder(model)([image])
    item = {"points": torch.from_numpy(POINTS), "hw": image.shape[:2]}
    results = {}
    for share in (False, True):
        decoder = PromptDecoder(model, output, share_image=share)
        decoder.train()
        [(logits, ious)] = decode_items(decoder, FeatureEncoder(model).sam, [item], [feats], torch.device("cpu"))
        for p in trainable:
            p.grad = None
        (logits.sigmoid().mean() + (ious - 0.5).square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        decoder.eval()
        with torch.no_grad():
            [(eval_logits, eval_ious)] = decode_items(decoder, FeatureEncoder(model).sam, [item], [feats],
                                                      torch.device("cpu"))
        results[share] = (logits.detach(), ious.detach(), grads, eval_logits, eval_ious,
                          decoder.served.tokens_seen)
    (l0, i0, g0, e0, ei0, t0), (l1, i1, g1, e1, ei1, t1) = results[False], results[True]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(i1, i0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ei1, ei0, rtol=1e-5, atol=1e-6)
    assert t1 == t0  # the same decoder tokens returned
    assert g1.keys() == g0.keys() and any(n.startswith("sam_mask_decoder.transformer.layers.0") for n in g0)
    scale = max(g.abs().max().item() for g in g0.values())
    for name, g in g0.items():  # (a key bias's gradient is ~0 analytically: rounding only)
        torch.testing.assert_close(g1[name], g, rtol=1e-4, atol=1e-5 * scale, msg=name)
