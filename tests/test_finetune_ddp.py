"""`mosaic-toolkit train` under torchrun: DistributedDataParallel on CPU (gloo), 2 processes.

Two processes with one image each per step average their gradients, which is exactly the
update of one process with both images in its batch (the loss is a mean over images): the
distributed run must end with the same weights as that single-process run.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mosaic_toolkit.sam.engine import Sam2Engine
from mosaic_toolkit.training.trainer import train
from mosaic_toolkit.sam.models import load_finetune

IMAGE_SIZE = 128
VAL_PARAMS = {"points_per_side": 4, "points_per_batch": 16}


@pytest.fixture(scope="module")
def tiny_dataset(tiny_dataset_factory) -> Path:
    return tiny_dataset_factory(seed=5)


def test_torchrun_two_processes_gloo(tiny_dataset, tiny_sam2_checkpoint, sam2_home, tmp_path):
    run_dir = tmp_path / "ddp_run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mosaic_toolkit.cli.train", str(tiny_dataset), "--base", str(tiny_sam2_checkpoint),
        "--out", str(run_dir), "--epochs", "1", "--batch-size", "1", "--lr", "1e-3",
        "--max-prompts", "0", "--image-size", str(IMAGE_SIZE), "--device", "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best epoch 1/1") == 1  # only rank 0 reports
    assert str(run_dir / "finetune.pt") in proc.stdout

    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["epochs_completed"] == 1 and state["run"]["world_size"] == 2
    with open(run_dir / "metrics.csv", newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1]
    meta = load_finetune(run_dir / "finetune.pt")
    assert meta["training"]["processes"] == 2 and meta["training"]["effective_batch_size"] == 2
    engine = Sam2Engine.from_spec(run_dir / "finetune.pt", device="cpu")
    assert all(torch.equal(engine.model.state_dict()[k], v) for k, v in meta["state_dict"].items())

    # The same update from one process with both images in its batch.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster when other processes compete for the cores
    try:
        single = train(
            tiny_dataset, tiny_sam2_checkpoint, tmp_path / "single", epochs=1, batch_size=2,
            lr=1e-3, max_prompts=0, image_size=IMAGE_SIZE, device="cpu", val_params=VAL_PARAMS,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    reference = torch.load(single.run_dir / "last.pt", weights_only=True)["trainable"]
    assert single.history[0]["train_loss"] == pytest.approx(state["history"][0]["train_loss"], rel=1e-4)
    for k, v in state["trainable"].items():
        torch.testing.assert_close(v, reference[k], atol=1e-5, rtol=1e-4)
    base = torch.load(tiny_sam2_checkpoint, weights_only=True)["model"]
    assert any(not torch.equal(v, base[k]) for k, v in state["trainable"].items())  # it trained
