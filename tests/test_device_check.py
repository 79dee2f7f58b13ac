"""bench/device_check.py runs end to end (--smoke: tiny model, 128², CPU with bf16 autocast)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.slow
def test_device_check_smoke_runs_every_section():
    done = subprocess.run([sys.executable, "device_check.py", "--smoke"], cwd=BENCH,
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1",
                          **{k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["errors"] == {}
    for section in ("load", "encode", "click", "prelabel", "train", "tune"):
        assert section in report, section
    assert report["train"]["loss_finite"] and report["train"]["trainable_tensors_changed"] > 0
    assert report["prelabel"]["fast"]["instances"] > 0
