"""Comparing models on a dataset split (toolkit/compare.py, `mosaic-toolkit eval --models`).

Models: the classical engine and the random-weight SAM 2.1 tiny of tests/fixtures_sam2.py (at
128² input, as a fine-tune file whose generator parameters let random masks through). Random
masks score badly; the tests check that the comparison is made of what `segment` and `eval`
produce, that every output exists, and that bad --models strings fail clearly.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fixtures_sam2 import TINY_NAME
from mosaic_toolkit.cli import main
from mosaic_toolkit.evaluation.compare import compare_models, parse_models
from mosaic_toolkit.core.dataset import Dataset, mask_foreground, write_manifest
from mosaic_toolkit.core.io import read_mask
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.evaluation.metrics import comparison_image
from mosaic_toolkit.sam.models import load_model, save_finetune
from mosaic_toolkit.data.synth import synth_dataset

IMAGE_SIZE = 128
# Thresholds open wide: random-weight masks pass, so the SAM 2 row is not empty.
OPEN = {"points_per_side": 8, "points_per_batch": 16, "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0, "stability_score_offset": 0.05, "mask_threshold": 0.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare") / "gt"
    samples = synth_dataset(root, 3, seed=5, min_size=56, max_size=72, tessera_size=20)
    for sample, split in zip(samples, ("train", "test", "test")):
        sample.split = split
    write_manifest(root, samples)
    return root


@pytest.fixture(scope="module")
def finetune(tiny_sam2_spec, tmp_path_factory) -> Path:
    import dataclasses

    model = load_model(dataclasses.replace(tiny_sam2_spec, image_size=IMAGE_SIZE), "cpu")
    path = tmp_path_factory.mktemp("compare_model") / "tiny.pt"
    save_finetune(path, model, base={"name": TINY_NAME, "config": tiny_sam2_spec.config,
                                     "image_size": IMAGE_SIZE}, generator=OPEN, training=None)
    return path


@pytest.fixture(scope="module")
def compared(gt, finetune, tiny_sam2_home, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_out") / "report"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOSAIC_SAM_HOME", str(tiny_sam2_home))
        summary = compare_models([("sam", str(finetune)), ("classical", "classical")], gt, out,
                                 device="cpu", progress=False)
    return out, summary


# ------------------------------------------------------------------------------ parsing
def test_parse_models():
    assert parse_models("base=sam2.1-large, finetuned=run/finetune.pt,classical") == [
        ("base", "sam2.1-large"), ("finetuned", "run/finetune.pt"), ("classical", "classical")]
    assert parse_models("c2=classical") == [("c2", "classical")]
    assert parse_models("x=a=b.pt") == [("x", "a=b.pt")]  # only the first '=' splits


@pytest.mark.parametrize("text,message", [
    ("", "empty entry"),
    ("a=classical,,classical", "empty entry"),
    ("sam2.1-large", r"'sam2.1-large' needs a label, e.g. base=sam2.1-large"),
    ("=sam2.1-large", "needs both a label and a model"),
    ("base=", "needs both a label and a model"),
    ("my model=x.pt", "label 'my model' may only hold"),
    ("classical,classical", "label 'classical' is given twice"),
])
def test_parse_models_errors(text, message):
    with pytest.raises(MosaicError, match=message):
        parse_models(text)


# ------------------------------------------------------------------------------ the comparison
def test_report_files(compared, gt):
    out, _ = compared
    test_stems = sorted(s.stem for s in Dataset.open(gt).split("test"))
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison", "comparison.csv", "comparison.json", "comparison.md", "comparison.png",
        "eval", "pred"]
    for label in ("sam", "classical"):
        assert sorted(p.stem for p in (out / "pred" / label).glob("*.png")) == test_stems
        assert (out / "pred" / label / "segment.json").is_file()
        assert (out / "eval" / label / "metrics.json").is_file()
    assert sorted(p.stem for p in (out / "comparison").iterdir()) == test_stems
    with Image.open(out / "comparison.png") as im:
        assert im.format == "PNG" and im.size == (1000, 450)


def test_rows_are_the_eval_of_each_segmentation(compared, gt):
    out, summary = compared
    assert [m["label"] for m in summary["models"]] == ["sam", "classical"]
    assert summary["split"] == "test" and summary["images"] == 2
    sam, classical = summary["models"]
    assert sam["engine"] == "sam2" and sam["params"]["mask_threshold"] == 0.0
    assert classical["engine"] == "classical" and classical["spec"] == "classical"
    for model in summary["models"]:
        metrics = json.loads((out / "eval" / model["label"] / "metrics.json").read_text())
        assert model["mean"] == metrics["mean"]
        assert model["mean"]["tile"]["n_pred"] > 0, f"{model['label']} found regions"
    assert json.loads((out / "comparison.json").read_text()) == summary

    with open(out / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == ["sam", "classical"]
    assert float(rows[1]["pixel_dice"]) == pytest.approx(classical["mean"]["pixel"]["dice"])
    assert float(rows[0]["tile_f_measure"]) == pytest.approx(sam["mean"]["tile"]["f_measure"])

    table = (out / "comparison.md").read_text().splitlines()
    assert table[2].startswith("| name | IoU % |")
    assert table[4].startswith(f"| sam | {100 * sam['mean']['pixel']['iou']:.2f} |")
    assert table[5].startswith(f"| classical | {100 * classical['mean']['pixel']['iou']:.2f} |")


def test_pictures_compare_the_first_two_models(compared, gt):
    out, summary = compared
    assert summary["pictures"] == {"green": "classical", "red": "sam"}
    data = Dataset.open(gt)
    for sample in data.split("test"):
        name = f"{sample.stem}.png"
        expected = comparison_image(
            mask_foreground(data.mask(sample)),
            mask_foreground(read_mask(out / "pred" / "classical" / name)),
            mask_foreground(read_mask(out / "pred" / "sam" / name)),
        )
        np.testing.assert_array_equal(np.asarray(Image.open(out / "comparison" / name)), expected)


# ------------------------------------------------------------------------------ command line
def test_cli_compares_models(gt, finetune, sam2_home, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, [
        "eval", "--models", f"tiny={finetune},classical", "--gt", str(gt), "--out", str(out),
        "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| name | IoU % |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| tiny", "| classical"]
    assert (out / "comparison.png").is_file() and (out / "comparison").is_dir()


@pytest.mark.parametrize("args,message", [
    (["--models", "sam2.1-large"], "Invalid value for '--models': models: 'sam2.1-large' needs a label"),
    (["--models", "a=classical,a=classical"], "label 'a' is given twice"),
    ([], "give either --pred"),
    (["--models", "classical", "--per-image"], "--per-image applies to --pred"),
])
def test_cli_usage_errors(gt, tmp_path, args, message):
    result = CliRunner().invoke(main, ["eval", "--gt", str(gt), "--out", str(tmp_path / "r")] + args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "r").exists()


def test_cli_pred_and_models_together(gt, tmp_path):
    result = CliRunner().invoke(main, ["eval", "--pred", str(gt), "--models", "classical",
                                       "--gt", str(gt), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "give either --pred" in result.output


def test_unknown_model_fails_before_any_work(gt, sam2_home, tmp_path):
    result = CliRunner().invoke(main, ["eval", "--models", "classical,big=sam2.1-large", "--gt",
                                       str(gt), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "model 'big': sam2.1-large: checkpoint not found" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_report_folder_must_not_hold_the_dataset(gt):
    with pytest.raises(MosaicError, match="must not be or contain the dataset"):
        compare_models([("classical", "classical")], gt, gt.parent, overwrite=True, progress=False)
    assert (gt / "manifest.json").is_file()
