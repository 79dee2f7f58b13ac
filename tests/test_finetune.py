"""Fine-tuning (toolkit/training/, `mosaic-toolkit train`) on CPU.

A random-weight SAM 2.1 tiny (tests/fixtures_sam2.py) runs at 128² input on three tiny synthetic
mosaics (two train, one val). Random weights make the validation Dice meaningless (it is ~0),
so the tests check what does not depend on the weights being good: the loss goes down, only the
prompt encoder and mask decoder move, the outputs exist and load, a stopped run resumes to the
same result as an uninterrupted one, and a killed run leaves only loadable files.
"""
from __future__ import annotations

import csv
import os
import multiprocessing
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mosaic_toolkit.cli.train import command
from mosaic_toolkit.core.dataset import Dataset, write_manifest
from mosaic_toolkit.sam.engine import Sam2Engine
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.training.config import TrainConfig
from mosaic_toolkit.training.data import EmbeddingCache, check_points, sample_prompts
from mosaic_toolkit.training.losses import prompt_losses
from mosaic_toolkit.training.selection import compare
from mosaic_toolkit.training.trainer import FeatureEncoder, Trainer, train
from mosaic_toolkit.sam.models import FINETUNE_PREFIXES, load_finetune

IMAGE_SIZE = 128  # tiny's features at 128² are 8x8: the decoder is cheap on two CPU cores
VAL_PARAMS = {"points_per_side": 4, "points_per_batch": 16}
# max_prompts=0: every tessera each epoch, so epoch losses are over the same prompts.
CONFIG = dict(epochs=3, batch_size=2, lr=1e-3, max_prompts=0, image_size=IMAGE_SIZE, val_params=VAL_PARAMS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedding cache for every run here (entries are keyed, so sharing is safe)."""
    return tmp_path_factory.mktemp("ft_cache")


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tiny_sam2_checkpoint, shared_cache, tmp_path_factory):
    """An uninterrupted 3-epoch run, with the full model state before and after."""
    run_dir = tmp_path_factory.mktemp("ft_runs") / "reference"
    trainer = Trainer(
        tiny_dataset, tiny_sam2_checkpoint, run_dir, TrainConfig(**CONFIG),
        cache_dir=shared_cache, progress=False,
    )
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.run()
    after = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    return trainer, result, before, after


# ------------------------------------------------------------------------------ pure helpers
def test_sample_prompts_caps_and_is_reproducible():
    assert sample_prompts(5, 0, 0, 0, 0).tolist() == [0, 1, 2, 3, 4]
    assert sample_prompts(5, 8, 0, 0, 0).tolist() == [0, 1, 2, 3, 4]
    drawn = sample_prompts(1000, 64, seed=1, epoch=2, index=3)
    assert len(drawn) == 64 and len(set(drawn.tolist())) == 64
    assert np.all(np.diff(drawn) > 0) and drawn.max() < 1000
    assert np.array_equal(drawn, sample_prompts(1000, 64, seed=1, epoch=2, index=3))
    assert not np.array_equal(drawn, sample_prompts(1000, 64, seed=1, epoch=3, index=3))


def test_prompt_losses_on_known_masks():
    targets = torch.zeros((2, 8, 8), dtype=torch.bool)
    targets[:, 2:6, 2:6] = True
    logits = torch.full((2, 4, 4), -20.0)
    logits[0, 1:3, 1:3] = 20.0  # mask 0: upsampled, exactly the target square
    dice, score = prompt_losses(logits, torch.tensor([1.0, 0.25]), targets)
    assert dice[0] < 0.01  # near-perfect soft Dice
    assert dice[1] > 0.9  # empty prediction
    assert score[0] == pytest.approx(0.0, abs=1e-6)  # predicted IoU 1, actual IoU 1
    assert score[1] == pytest.approx(0.25)  # predicted 0.25, actual 0


def test_image_dice_pools_the_prompts_of_an_image():
    """One Dice over all prompts: a large tessera weighs more than a small one."""
    from mosaic_toolkit.training.losses import image_dice

    targets = torch.zeros((2, 8, 8), dtype=torch.bool)
    targets[0, 0:6, 0:6] = True  # 36 px, predicted exactly
    targets[1, 7, 7] = True  # 1 px, missed
    logits = torch.full((2, 8, 8), -20.0)
    logits[0, 0:6, 0:6] = 20.0
    pooled = image_dice(logits, targets)
    per_prompt, _ = prompt_losses(logits, torch.ones(2), targets)
    assert float(pooled) == pytest.approx(1 - (2 * 36 + 1) / (36 + 37 + 1), abs=1e-3)
    assert float(pooled) < 0.05 < float(per_prompt.mean())  # the missed pixel barely counts pooled
    # training's pooled Dice (train --dice image) is the same value, from one upsampling
    assert float(prompt_losses(logits, torch.ones(2), targets, pooled=True)[0]) == pytest.approx(float(pooled))
    with pytest.raises(MosaicError, match="dice must be one of"):
        TrainConfig(dice="pixel")


def test_check_points_names_the_file():
    instances = np.zeros((4, 6), dtype=np.int32)
    instances[1:3, 1:3], instances[1:3, 4:6] = 1, 2
    check_points("p.json", instances, np.array([[1, 1], [4, 2]]))
    with pytest.raises(MosaicError, match=r"^p\.json: 1 points but 2 tesserae"):
        check_points("p.json", instances, np.array([[1, 1]]))
    with pytest.raises(MosaicError, match=r"^p\.json: points are not inside"):
        check_points("p.json", instances, np.array([[4, 2], [1, 1]]))
    with pytest.raises(MosaicError, match=r"^p\.json: a prompt point lies outside"):
        check_points("p.json", instances, np.array([[1, 1], [6, 2]]))


# ------------------------------------------------------------------------------ a full run
def test_loss_decreases(reference_run):
    _, result, _, _ = reference_run
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 3
    assert losses[-1] < losses[0]


def test_only_prompt_encoder_and_mask_decoder_change(reference_run):
    trainer, _, before, after = reference_run
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert all(k.startswith(FINETUNE_PREFIXES) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("sam_prompt_encoder.") for k in changed)
    assert any(k.startswith("sam_mask_decoder.") for k in changed)
    encoder = [k for k in before if k.startswith("image_encoder.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert all(not n.startswith(FINETUNE_PREFIXES) for n in frozen)


def test_run_outputs(reference_run, tiny_dataset, tiny_sam2_checkpoint):
    _, result, _, _ = reference_run
    run_dir = result.run_dir
    assert result.finished and result.epochs_completed == 3
    assert result.finetune == run_dir / "finetune.pt"
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([h["train_loss"] for h in result.history])
    assert all(0.0 <= float(r["val_dice"]) <= 1.0 for r in rows)
    assert all(0.0 <= float(r["val_prompt_iou"]) <= 1.0 for r in rows)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-3) and lrs[0] > lrs[1] > lrs[2] >= 1e-5  # cosine to lr/100
    with Image.open(run_dir / "training.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert not list(run_dir.glob(".*.tmp"))  # no leftovers of the atomic writes
    meta = load_finetune(result.finetune)
    training = meta["training"]
    assert training["best_epoch"] == result.best_epoch
    assert training["best_val_dice"] == pytest.approx(result.best_dice)
    assert training["n_train"] == 2 and training["n_val"] == 1
    assert training["epochs_completed"] == 3
    assert training["hyperparameters"]["lr"] == 1e-3
    assert training["dataset"] == str(tiny_dataset.resolve())
    assert meta["base"]["image_size"] == IMAGE_SIZE and meta["base"]["sha256"]
    assert meta["base"]["checkpoint"] == str(tiny_sam2_checkpoint.resolve())
    assert meta["generator"] == {}


def test_finetune_loads_into_segment_engine(reference_run, tiny_dataset, sam2_home):
    """segment resolves the fine-tune's base by its registry name (MOSAIC_SAM_HOME)."""
    _, result, _, _ = reference_run
    engine = Sam2Engine.from_spec(result.finetune, device="cpu")
    tuned = load_finetune(result.finetune)["state_dict"]
    state = engine.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tuned.items())
    assert engine.model.image_size == IMAGE_SIZE
    assert "+ft-" in engine.model_version
    data = Dataset.open(tiny_dataset)
    sample = data.split("val")[0]
    instances = engine.segment(data.image(sample), engine.params.replace(**VAL_PARAMS))
    assert instances.shape == (sample.height, sample.width) and instances.dtype == np.int32


def test_finetune_finds_its_base_without_the_model_cache(reference_run, tiny_sam2_checkpoint, tmp_path,
                                                       monkeypatch):
    """Trained with --base PATH: the file finds that path again when the cache does not hold it."""
    from mosaic_toolkit.sam.models import resolve_model

    _, result, _, _ = reference_run
    monkeypatch.setenv("MOSAIC_SAM_HOME", str(tmp_path / "empty_home"))
    spec = resolve_model(result.finetune)
    assert spec.base_checkpoint.resolve() == tiny_sam2_checkpoint.resolve()
    assert spec.finetune == result.finetune and spec.image_size == IMAGE_SIZE


def test_cache_holds_the_encoder_features(reference_run):
    trainer, _, _, _ = reference_run
    sample, sha = trainer.train_samples[0], trainer.hashes[0]
    cached = trainer.cache.load(sample.stem, sha)
    fresh = FeatureEncoder(trainer.model)([trainer.data.image(sample)])[0]
    assert [t.shape for t in cached] == [t.shape for t in fresh]
    assert all(t.dtype == torch.float16 for t in cached)
    for c, f in zip(cached, fresh):
        torch.testing.assert_close(c.float(), f, atol=2e-3, rtol=2e-3)
    other = EmbeddingCache(trainer.cache.folder, trainer.cache.model_key + "|other model")
    assert other.path(sample.stem, sha) != trainer.cache.path(sample.stem, sha)
    assert not other.has(sample.stem, sha)  # another model never reads these features


# ------------------------------------------------------------------------------ resume
def test_resume_continues_like_an_uninterrupted_run(reference_run, tiny_dataset, tiny_sam2_checkpoint,
                                                     shared_cache, tmp_path):
    _, reference, _, after = reference_run
    run_dir = tmp_path / "run"
    first = train(tiny_dataset, tiny_sam2_checkpoint, run_dir, **CONFIG, cache_dir=shared_cache,
                  stop_after_epoch=1, progress=False)
    assert first.epochs_completed == 1 and not first.finished
    epoch1 = torch.load(run_dir / "last.pt", weights_only=True)
    assert epoch1["epochs_completed"] == 1

    # The CLI's --resume continues it: options not repeated keep the run's recorded values.
    args = [
        str(tiny_dataset), "--base", str(tiny_sam2_checkpoint), "--out", str(run_dir), "--resume",
        "--cache-dir", str(shared_cache), "--device", "cpu",
    ]
    res = CliRunner().invoke(command, args)
    assert res.exit_code == 0, res.output
    assert f"best epoch {reference.best_epoch}/3" in res.output and "finetune.pt" in res.output
    resumed = torch.load(run_dir / "last.pt", weights_only=True)
    assert resumed["epochs_completed"] == 3 and [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for got, want in zip(resumed["history"], reference.history):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
    with open(run_dir / "metrics.csv", newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3]
    for k, v in resumed["trainable"].items():
        torch.testing.assert_close(v, after[k], atol=1e-4, rtol=1e-3)
    # finetune.pt holds the best epoch's weights (selection.compare; ties to the later epoch).
    best = None
    for h in resumed["history"]:
        if best is None or compare(h, resumed["history"][best - 1]) >= 0:
            best = h["epoch"]
    assert resumed["best_epoch"] == best == reference.best_epoch
    kept = load_finetune(run_dir / "finetune.pt")["state_dict"]
    expected = epoch1["trainable"] if best == 1 else resumed["trainable"] if best == 3 else None
    if expected is not None:
        assert all(torch.equal(kept[k], v) for k, v in expected.items())


def test_resume_refuses_other_settings(reference_run, tiny_dataset, tiny_sam2_checkpoint, shared_cache):
    _, result, _, _ = reference_run
    with pytest.raises(MosaicError, match=r"config\.lr"):
        train(tiny_dataset, tiny_sam2_checkpoint, result.run_dir, **{**CONFIG, "lr": 2e-3},
              cache_dir=shared_cache, resume=True, progress=False)


def _train_in_child(kwargs: dict) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    train(**kwargs)


def test_killed_run_leaves_loadable_files_and_resumes(tiny_dataset, tiny_sam2_checkpoint, shared_cache,
                                                      tmp_path):
    """SIGKILL a training process right after it saved an epoch; every file left must load.

    The process is forked from this one (imports already done: much faster than a fresh
    interpreter); the kill is a real SIGKILL, no clean-up code runs.
    """
    run_dir = tmp_path / "killed"
    kwargs = dict(
        dataset=tiny_dataset, base=tiny_sam2_checkpoint, out=run_dir, epochs=50, batch_size=2,
        max_prompts=2, image_size=IMAGE_SIZE, cache_dir=shared_cache, device="cpu", progress=False,
        val_params=VAL_PARAMS,
    )
    child = multiprocessing.get_context("fork").Process(target=_train_in_child, args=(kwargs,))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "last.pt").is_file():
            assert child.is_alive(), "training exited early"
            assert time.monotonic() < deadline, "no epoch saved in time"
            time.sleep(0.02)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    state = torch.load(run_dir / "last.pt", weights_only=True)
    done = state["epochs_completed"]
    assert 1 <= done < 50
    assert load_finetune(run_dir / "finetune.pt")["state_dict"]
    resumed = train(**{**kwargs, "resume": True, "stop_after_epoch": done + 1})
    assert [h["epoch"] for h in resumed.history] == list(range(1, done + 2))


# ------------------------------------------------------------------------------ errors
def test_refuses_a_non_empty_run_dir(reference_run, tiny_dataset, tiny_sam2_checkpoint):
    _, result, _, _ = reference_run
    with pytest.raises(MosaicError, match="not empty"):
        train(tiny_dataset, tiny_sam2_checkpoint, result.run_dir, **CONFIG, progress=False)


def test_needs_a_validation_split(tiny_dataset, tiny_sam2_checkpoint, tmp_path):
    data = Dataset.open(tiny_dataset)
    no_val = tmp_path / "no_val"
    no_val.mkdir()
    for sub in ("images", "masks", "instances", "points"):
        (no_val / sub).symlink_to(tiny_dataset / sub)
    for sample in data.samples:
        sample.split = "train"
    write_manifest(no_val, data.samples)
    with pytest.raises(MosaicError, match="no validation images"):
        train(no_val, tiny_sam2_checkpoint, tmp_path / "run", **CONFIG, progress=False)


def test_cli_rejects_resume_with_overwrite(tiny_dataset, tmp_path):
    res = CliRunner().invoke(command, [str(tiny_dataset), "--base", "x", "--out", str(tmp_path / "r"),
                                       "--resume", "--overwrite"])
    assert res.exit_code == 2 and "exclude each other" in res.output


def test_bad_hyperparameters_are_clear_errors():
    with pytest.raises(MosaicError, match="min_lr"):
        TrainConfig(lr=1e-5, min_lr=1e-4)
    with pytest.raises(MosaicError, match="unknown key"):
        TrainConfig(val_params={"not_a_param": 1})
