"""Issue 16: the decoder output a fine-tune was trained on is the one every path serves.

SAM 2's mask decoder has four output tokens (0: single mask, 1-3: multimask candidates), each
with its own output head. A fine-tune here is the random-weight tiny (tests/fixtures_sam2.py,
256² input) with only the trained token's output head perturbed (its hypernetwork MLP and its
row of the IoU head), saved as a fine-tune file. For the same image, points and weights, the
training decoder's logits (PromptDecoder in training mode, as ``train`` decodes) must be what a
click, the fast path and the stock generator serve, and every mask served must come from the
trained token (``Sam2Engine.decoded_tokens``, recorded by the adapter's ServedDecoder). The base
model keeps SAM 2's own choice: three candidates for a click, the stability fallback otherwise.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from fixtures_sam2 import TEST_IMAGE_SIZE, grid_mosaic
from mosaic_toolkit.cli import main as cli
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.sam.adapter import OUTPUT_TOKEN, PromptDecoder, ServedDecoder, stock_generator
from mosaic_toolkit.sam.engine import Sam2Engine
from mosaic_toolkit.sam.models import (
    ModelSpec,
    UNTRAINED_NOTE,
    load_finetune,
    load_model,
    model_version,
    resolve_model,
    save_finetune,
)
from mosaic_toolkit.sam.params import GeneratorParams
from mosaic_toolkit.training.config import TrainConfig
from mosaic_toolkit.training.trainer import Trainer, decode_items

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINED = ("single", "multimask-first")
# Prompts inside tesserae of grid_mosaic(4, 5) (28 px tiles, 32 px pitch).
POINTS = np.array([[16 + 32 * c, 16 + 32 * r] for r in range(4) for c in range(5)], np.float32)
# Open filters: random weights score low, every decoded mask must get through.
OPEN = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return grid_mosaic(4, 5)[0]


def make_finetune(path: Path, spec: ModelSpec, output: str) -> Path:
    """The base weights with only ``output``'s token head changed, saved as a fine-tune file."""
    model = load_model(spec, "cpu")
    token = OUTPUT_TOKEN[output]
    decoder = model.sam_mask_decoder
    gen = torch.Generator().manual_seed(16)
    with torch.no_grad():
        last = decoder.output_hypernetworks_mlps[token].layers[-1]
        last.weight.add_(torch.randn(last.weight.shape, generator=gen) * 3 * last.weight.std())
        last.bias.add_(0.5)
        decoder.iou_prediction_head.layers[-1].bias[token] += 0.3
    base = {"name": str(spec.base_checkpoint), "config": spec.config, "image_size": spec.image_size}
    save_finetune(path, model, base=base, generator=None, training=None, output=output)
    return path


@pytest.fixture(scope="module", params=TRAINED)
def finetuned(request, tiny_sam2_spec, tmp_path_factory) -> Sam2Engine:
    path = make_finetune(tmp_path_factory.mktemp("ft") / f"{request.param}.pt", tiny_sam2_spec, request.param)
    return Sam2Engine.from_spec(path, device="cpu", cache_bytes=2**30)


def fresh(engine: Sam2Engine) -> Sam2Engine:
    """An engine on the same model and output whose token record starts empty."""
    return Sam2Engine(engine.model, version="test", output=engine.output, cache_bytes=2**30)


def train_decode(engine: Sam2Engine, image: np.ndarray, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The training decoder's (low-res logits, IoU) at ``points``: training mode, as ``train``."""
    key = engine.encode(image)
    feats = engine._cache.get(key).features
    decoder = PromptDecoder(engine.model, engine.output)
    item = {"points": torch.from_numpy(np.asarray(points, np.float32)), "hw": image.shape[:2]}
    decoder.train()
    try:
        with torch.no_grad():
            [(logits, ious)] = decode_items(decoder, engine._sam, [item],
                                            [[feats["image_embed"], *feats["high_res_feats"]]], engine.device)
    finally:
        engine.model.eval()
    assert decoder.served.tokens_seen.keys() == {OUTPUT_TOKEN[engine.output]}
    return logits.float(), ious.float()


def upsample(logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits[:, None], hw, mode="bilinear", align_corners=False)[:, 0]


# --------------------------------------------------------------------------------------------
def test_finetune_changes_only_its_token(finetuned, sam2_engine, image):
    """The fixture is what it claims: the trained token's masks changed, the other three not."""
    token = OUTPUT_TOKEN[finetuned.output]
    feats = finetuned._cache.get(finetuned.encode(image)).features
    outs = []
    for engine in (sam2_engine, finetuned):
        dec = engine.model.sam_mask_decoder
        coords = engine._sam.model_coords(torch.from_numpy(POINTS[:4]), image.shape[:2])
        sparse, dense = engine.model.sam_prompt_encoder(
            points=(coords[:, None], torch.ones((4, 1), dtype=torch.int)), boxes=None, masks=None)
        with torch.no_grad():
            masks, ious, _, _ = dec.predict_masks(
                feats["image_embed"], engine.model.sam_prompt_encoder.get_dense_pe(), sparse, dense,
                repeat_image=True, high_res_features=feats["high_res_feats"])
        outs.append((masks, ious))
    (base_m, base_i), (ft_m, ft_i) = outs
    for t in range(4):
        assert torch.equal(base_m[:, t], ft_m[:, t]) == (t != token), t
        assert torch.equal(base_i[:, t], ft_i[:, t]) == (t != token), t


def test_click_serves_the_trained_output(finetuned, sam2_engine, image):
    engine = fresh(finetuned)
    token = OUTPUT_TOKEN[engine.output]
    hw = image.shape[:2]
    for point in POINTS[:6]:
        trained, trained_iou = train_decode(engine, image, point[None])
        key = engine.encode(image)
        entry = engine._cache.get(key)
        with torch.inference_mode():
            logits, scores, tokens = engine._sam.click(entry.features, entry.hw, point[None], np.array([1]), None)
        assert tokens == [token]
        torch.testing.assert_close(torch.from_numpy(logits), upsample(trained, hw), rtol=1e-4, atol=1e-4)
        mask, score = engine.predict_points(image, point[None], [1])
        assert engine.last_click_token == token
        assert score == pytest.approx(float(trained_iou[0]), abs=1e-4)
        assert (mask == (upsample(trained, hw)[0] > 0).numpy()).mean() > 0.999
        # Several clicks or a box: still the trained token, never a multimask candidate.
        engine.predict_points(image, [point, point + 3], [1, 0])
        assert engine.last_click_token == token
        engine.predict_points(image, point[None], [1], box=[point[0] - 10, point[1] - 10, point[0] + 10, point[1] + 10])
        assert engine.last_click_token == token
    assert engine.decoded_tokens().keys() == {token}
    # The base model keeps SAM 2's behaviour: a single click is answered by a multimask token.
    base = fresh(sam2_engine)
    base.predict_points(image, POINTS[:1], [1])
    assert base.last_click_token in (1, 2, 3)
    assert base.decoded_tokens() == {1: 1, 2: 1, 3: 1}


def test_fast_path_serves_the_trained_output(finetuned, sam2_engine, image):
    engine = fresh(finetuned)
    token = OUTPUT_TOKEN[engine.output]
    state = engine.prepare_fast(image)
    calls: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []

    def recording(points: np.ndarray):
        logits, ious = state.decode(points)
        calls.append((points.copy(), logits, ious))
        return logits, ious

    params = GeneratorParams(points_per_side=8, points_per_batch=16, **OPEN)
    instances = state.with_decoder(recording).generate(params)
    assert calls and instances.max() > 0
    for points, logits, ious in calls:
        trained, trained_iou = train_decode(engine, image, points)
        torch.testing.assert_close(logits, trained, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ious, trained_iou, rtol=1e-4, atol=1e-4)
    served = sum(len(p) for p, _, _ in calls)
    assert engine.decoded_tokens() == {token: served}
    assert np.array_equal(engine.segment(image, params, method="fast"), instances)
    # The same prompts on the base model: SAM 2's stability fallback picks multimask tokens for
    # some (the random weights' token-0 masks are unstable); the fine-tune's path never does.
    base = fresh(sam2_engine)
    base_logits, _ = base.decode_points(image, calls[0][0])
    assert set(base.decoded_tokens()) - {0}, "the base model's fallback did not trigger: weak test"
    assert not torch.equal(base_logits, calls[0][1])


def test_stock_path_serves_the_trained_output(finetuned, sam2_engine, image):
    engine = fresh(finetuned)
    token = OUTPUT_TOKEN[engine.output]
    hw = image.shape[:2]
    generator = stock_generator(engine.model, engine._sam.served, points_per_side=3, points_per_batch=16,
                                crop_n_layers=0, box_nms_thresh=1.0, output_mode="binary_mask", **OPEN)
    with torch.inference_mode():
        records = generator.generate(image)
    assert len(records) == 9  # one mask per grid point, not three
    points = np.array([r["point_coords"][0] for r in records], np.float32)
    trained, trained_iou = train_decode(engine, image, points)
    expected = (upsample(trained, hw) > 0).numpy()
    for record, mask, iou in zip(records, expected, trained_iou.tolist()):
        assert (record["segmentation"] == mask).mean() > 0.999
        assert record["predicted_iou"] == pytest.approx(iou, abs=1e-4)
    assert engine.decoded_tokens() == {token: 9}
    # Through the engine (the thesis's stock settings, one crop layer): the trained token only.
    engine.segment(image, GeneratorParams(method="stock", points_per_side=4, crop_n_layers=1, **OPEN))
    assert engine.decoded_tokens().keys() == {token}
    # The base model's stock path is SAM 2's: three multimask candidates per point.
    base = fresh(sam2_engine)
    base.segment(image, GeneratorParams(method="stock", points_per_side=2, crop_n_layers=0, **OPEN))
    assert base.decoded_tokens() == {1: 4, 2: 4, 3: 4}


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_sam2_output_is_sam2s_own_choice(sam2_engine, image, multimask, training):
    """For the base model the adapter's selection equals MaskDecoder.forward, value for value."""
    feats = sam2_engine._cache.get(sam2_engine.encode(image)).features
    model = sam2_engine.model
    coords = sam2_engine._sam.model_coords(torch.from_numpy(POINTS), image.shape[:2])
    sparse, dense = model.sam_prompt_encoder(
        points=(coords[:, None], torch.ones((len(POINTS), 1), dtype=torch.int)), boxes=None, masks=None)
    args = dict(image_embeddings=feats["image_embed"], image_pe=model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
                repeat_image=True, high_res_features=feats["high_res_feats"])
    served = ServedDecoder(model.sam_mask_decoder)
    model.sam_mask_decoder.train(training)
    try:
        with torch.no_grad():
            ref_masks, ref_ious, _, _ = model.sam_mask_decoder(**args)
            masks, ious, _, _ = served(**args)
    finally:
        model.eval()
    assert torch.equal(masks, ref_masks) and torch.equal(ious, ref_ious)
    tokens = served.last_tokens
    if multimask:
        assert tokens.tolist() == [[1, 2, 3]] * len(POINTS)
    elif training:
        assert tokens.flatten().tolist() == [0] * len(POINTS)
    else:  # the stability fallback, as sam2 does it: some prompts fall back on random weights
        assert set(tokens.flatten().tolist()) - {0}


# --------------------------------------------------------------------------------------------
def test_metadata_records_and_declares_the_output(tiny_sam2_spec, tiny_sam2_checkpoint, tmp_path):
    path = make_finetune(tmp_path / "mf.pt", tiny_sam2_spec, "multimask-first")
    assert load_finetune(path)["output"] == "multimask-first"
    spec = resolve_model(path)
    assert spec.output == "multimask-first"
    assert ModelSpec.from_json(json.loads(json.dumps(spec.to_json()))).output == "multimask-first"
    assert resolve_model(path, output="multimask-first").output == "multimask-first"
    with pytest.raises(MosaicError, match=r"mf\.pt: fine-tune was trained on decoder output 'multimask-first'"):
        resolve_model(path, output="single")
    # A file written before the key existed was trained by our train on token 0...
    data = torch.load(path, weights_only=True)
    del data["output"]
    torch.save(data, tmp_path / "old.pt")
    assert resolve_model(tmp_path / "old.pt").output == "single"
    # ...unless tune wrote it from an untouched base decoder.
    data["training"] = {"note": UNTRAINED_NOTE}
    torch.save(data, tmp_path / "tuned.pt")
    assert resolve_model(tmp_path / "tuned.pt").output == "sam2"
    data["output"] = "best-of-three"
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(MosaicError, match=r"bad\.pt: unknown decoder output 'best-of-three'"):
        load_finetune(tmp_path / "bad.pt")
    # A whole-model checkpoint is SAM 2's own unless declared; declared, its version says so.
    assert resolve_model(tiny_sam2_checkpoint).output == "sam2"
    declared = resolve_model(tiny_sam2_checkpoint, output="multimask-first")
    assert declared.output == "multimask-first"
    assert model_version(declared) == model_version(resolve_model(tiny_sam2_checkpoint)) + "+out-multimask-first"


def test_declared_checkpoint_serves_its_output(tiny_sam2_spec, image):
    engine = Sam2Engine.from_spec(tiny_sam2_spec, device="cpu", output="multimask-first", cache_bytes=2**30)
    assert engine.output == "multimask-first"
    engine.predict_points(image, POINTS[:1], [1])
    engine.decode_points(image, POINTS)
    assert engine.decoded_tokens() == {1: 1 + len(POINTS)}


def test_cli_refuses_a_conflicting_output(tiny_sam2_spec, tmp_path, image):
    from mosaic_toolkit.core.io import write_image

    path = make_finetune(tmp_path / "single.pt", tiny_sam2_spec, "single")
    write_image(tmp_path / "images" / "a.png", image)
    result = CliRunner().invoke(cli, ["segment", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
                                      "--model", str(path), "--output", "multimask-first"])
    assert result.exit_code == 1
    assert "single.pt: fine-tune was trained on decoder output 'single'" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("output", TRAINED)
def test_training_trains_and_validates_the_output_it_records(output, tiny_dataset, tiny_sam2_checkpoint, sam2_home,
                                                            tmp_path):
    """train --output X: only X's output head learns (the other hypernetworks get zero gradient:
    they only shrink by AdamW's weight decay), validation decodes with X, and the fine-tune
    file records X."""
    config = TrainConfig(epochs=1, batch_size=2, lr=1e-3, max_prompts=0, image_size=128, output=output,
                         val_params={"points_per_side": 4, "points_per_batch": 16})
    trainer = Trainer(tiny_dataset, tiny_sam2_checkpoint, tmp_path / "run", config, progress=False)
    heads = trainer.model.sam_mask_decoder.output_hypernetworks_mlps
    before = [{k: v.clone() for k, v in h.state_dict().items()} for h in heads]
    result = trainer.run()
    token = OUTPUT_TOKEN[output]
    for t, (head, old) in enumerate(zip(heads, before)):
        grads = [p.grad for p in head.parameters()]
        learnt = any(g is not None and bool(g.abs().max() > 0) for g in grads)  # last step's
        moved = max(float((v - old[k]).abs().max() / old[k].abs().max()) for k, v in head.state_dict().items())
        assert learnt == (t == token), t
        assert (moved > 1e-4) == (t == token), (t, moved)
    assert trainer.decoder.served.tokens_seen.keys() == {token}
    assert trainer.val_engine.decoded_tokens().keys() == {token}
    assert load_finetune(result.finetune)["output"] == output
    assert Sam2Engine.from_spec(result.finetune, device="cpu").output == output


def test_train_rejects_an_unknown_output():
    with pytest.raises(MosaicError, match="train: output: unknown decoder output 'sam2'"):
        TrainConfig(output="sam2")


def test_backend_serves_the_declared_output(tiny_sam2_checkpoint, tmp_path):
    """MOSAIC_BACKEND_MODEL_OUTPUT declares the base model's output; clicks then use it."""
    from mosaic_backend.config import Settings
    from mosaic_backend.versions import load_base_engine

    env = {"MOSAIC_BACKEND_MODEL": str(tiny_sam2_checkpoint), "MOSAIC_BACKEND_ENGINE": "sam2",
           "MOSAIC_BACKEND_IMAGE_SIZE": str(TEST_IMAGE_SIZE), "MOSAIC_BACKEND_DEVICE": "cpu",
           "MOSAIC_BACKEND_MODELS": str(tmp_path / "models")}
    assert load_base_engine(Settings.from_env(env)).output == "sam2"  # auto: SAM 2's own
    engine = load_base_engine(Settings.from_env({**env, "MOSAIC_BACKEND_MODEL_OUTPUT": "multimask-first"}))
    assert engine.output == "multimask-first" and engine.model_version.endswith("+out-multimask-first")
    engine.predict_points(grid_mosaic(2, 2)[0], [[16, 16]], [1])
    assert engine.last_click_token == 1 and engine.decoded_tokens() == {1: 1}
    with pytest.raises(Exception, match="MOSAIC_BACKEND_MODEL_OUTPUT"):
        Settings.from_env({**env, "MOSAIC_BACKEND_MODEL_OUTPUT": "best"})
