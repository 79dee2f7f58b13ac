"""`evaluate` and `mosaic-toolkit eval` on tiny datasets whose scores are worked out by hand."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mosaic_toolkit.cli import main
from mosaic_toolkit.core.dataset import instances_to_mask, write_manifest, write_sample
from mosaic_toolkit.core.io import write_instances, write_mask
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.evaluation.evaluate import csv_columns, evaluate, markdown_table
from mosaic_toolkit.evaluation.metrics import BLACK, BLUE, GREEN, RED, WHITE

# Sample "a" (test split), 4 x 6: tile 1 at rows 0-1, cols 0-1; tile 2 at rows 0-1, cols 4-5.
GT_A = np.array([
    [1, 1, 0, 0, 2, 2],
    [1, 1, 0, 0, 2, 2],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
])
# Its prediction: tile 1 exactly, tile 2 missed, one stray pixel at (3, 3).
PRED_A = np.array([
    [1, 1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 0, 0],
], dtype=bool)
# Baseline for "a": only the left column of tile 2.
BASE_A = np.array([
    [0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
], dtype=bool)
# Sample "b" (train split): "a" upside down, predicted perfectly by both.
GT_B = GT_A[::-1].copy()

# "a" by hand. Pixels: gt 8, pred 5, tp 4, fp 1, fn 4, tn 24 - 9 = 15.
PIXEL_A = {"iou": 4 / 9, "dice": 8 / 13, "accuracy": 19 / 24, "recall": 4 / 8, "precision": 4 / 5}
# Tiles: 2 tiles, 2 regions; tile 1 -> (1, 1), tile 2 missed -> (0, 0).
TILE_A = {"count_error": 0.0, "precision": 0.5, "recall": 0.5, "f_measure": 0.5,
          "n_gt": 2, "n_pred": 2}
PIXEL_B = dict.fromkeys(PIXEL_A, 1.0)
TILE_B = {"count_error": 0.0, "precision": 1.0, "recall": 1.0, "f_measure": 1.0,
          "n_gt": 2, "n_pred": 2}


def _mask(fg: np.ndarray) -> np.ndarray:
    return np.where(fg, 0, 255).astype(np.uint8)


@pytest.fixture
def case(tmp_path: Path) -> dict[str, Path]:
    """A two-sample dataset, a prediction folder and a baseline folder."""
    gt, pred, base = tmp_path / "gt", tmp_path / "pred", tmp_path / "base"
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    samples = [
        write_sample(gt, "a", image, GT_A, split="test"),
        write_sample(gt, "b", image, GT_B, split="train"),
    ]
    write_manifest(gt, samples)
    write_mask(pred / "a.png", _mask(PRED_A))
    write_mask(pred / "b.png", instances_to_mask(GT_B))
    write_mask(base / "a.png", _mask(BASE_A))
    write_mask(base / "b.png", instances_to_mask(GT_B))
    return {"gt": gt, "pred": pred, "base": base, "out": tmp_path / "report"}


def _strict_json(path: Path) -> dict:
    def no_constant(name: str):
        raise AssertionError(f"{path}: {name} is not valid JSON")

    return json.loads(path.read_text(), parse_constant=no_constant)


# --------------------------------------------------------------------------------------------
# Library
# --------------------------------------------------------------------------------------------
def test_report_values_and_exact_schema(case):
    report = evaluate(case["pred"], case["gt"], case["out"])
    written = _strict_json(case["out"] / "metrics.json")
    assert written == report
    assert list(written) == ["images", "mean"]
    assert list(written["images"]) == ["a", "b"]
    for metrics in list(written["images"].values()) + [written["mean"]]:
        assert list(metrics) == ["pixel", "tile"]
        assert list(metrics["pixel"]) == ["iou", "dice", "accuracy", "recall", "precision"]
        assert list(metrics["tile"]) == [
            "count_error", "precision", "recall", "f_measure", "n_gt", "n_pred"]
    assert written["images"]["a"]["pixel"] == pytest.approx(PIXEL_A)
    assert written["images"]["a"]["tile"] == pytest.approx(TILE_A)
    assert written["images"]["b"]["pixel"] == pytest.approx(PIXEL_B)
    assert written["images"]["b"]["tile"] == pytest.approx(TILE_B)
    # The mean over the two images, e.g. IoU (4/9 + 1) / 2.
    assert written["mean"]["pixel"] == pytest.approx(
        {k: (PIXEL_A[k] + PIXEL_B[k]) / 2 for k in PIXEL_A})
    assert written["mean"]["tile"] == pytest.approx(
        {k: (TILE_A[k] + TILE_B[k]) / 2 for k in TILE_A})
    assert not (case["out"] / "comparison").exists()  # only with a baseline


def test_csv_has_one_row_per_image_and_a_mean_row(case):
    report = evaluate(case["pred"], case["gt"], case["out"])
    with open(case["out"] / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["stem"] + csv_columns()
    assert csv_columns()[0] == "pixel_iou" and csv_columns()[-1] == "tile_n_pred"
    assert [r["stem"] for r in rows] == ["a", "b", "mean"]
    for row, metrics in zip(rows, [report["images"]["a"], report["images"]["b"], report["mean"]]):
        for group in ("pixel", "tile"):
            for key, value in metrics[group].items():
                assert float(row[f"{group}_{key}"]) == pytest.approx(value)


def test_split_limits_the_samples(case):
    report = evaluate(case["pred"], case["gt"], case["out"], split="test")
    assert list(report["images"]) == ["a"]
    assert report["mean"]["pixel"] == pytest.approx(PIXEL_A)
    with pytest.raises(MosaicError, match="no samples in split 'val'"):
        evaluate(case["pred"], case["gt"], case["out"], split="val", overwrite=True)


def test_baseline_comparison_pictures(case):
    evaluate(case["pred"], case["gt"], case["out"], baseline=case["base"])
    picture = np.asarray(Image.open(case["out"] / "comparison" / "a.png").convert("RGB"))
    expected = np.array([BLACK] * 24, dtype=np.uint8).reshape(4, 6, 3)
    expected[0:2, 0:2] = GREEN  # tile 1: only the prediction finds it
    expected[0:2, 4] = RED  # left column of tile 2: only the baseline
    expected[0:2, 5] = BLUE  # right column of tile 2: missed by both
    # (3, 3) is a false positive of the prediction on background: still black.
    np.testing.assert_array_equal(picture, expected)
    picture_b = np.asarray(Image.open(case["out"] / "comparison" / "b.png").convert("RGB"))
    np.testing.assert_array_equal(picture_b[GT_B > 0], np.full((8, 3), WHITE, dtype=np.uint8))
    np.testing.assert_array_equal(picture_b[GT_B == 0], np.full((16, 3), BLACK, dtype=np.uint8))


def _touching_tiles_dataset(gt: Path) -> None:
    """One 1 x 4 sample with two tiles sharing an edge: [[1, 1, 2, 2]]."""
    image = np.zeros((1, 4, 3), np.uint8)
    write_manifest(gt, [write_sample(gt, "s", image, np.array([[1, 1, 2, 2]]))])


def test_ground_truth_tiles_from_mask_when_instances_absent(tmp_path):
    # Two tiles sharing an edge: two tiles with the instance map, one 4-connected part without.
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _touching_tiles_dataset(gt)
    write_mask(pred / "s.png", _mask(np.ones((1, 4), bool)))
    with_instances = evaluate(pred, gt, tmp_path / "r1")["images"]["s"]["tile"]
    # 2 tiles, 1 region covering both: precision 2/4 each, recall 1, count error 1/2.
    assert with_instances == pytest.approx({
        "count_error": 0.5, "precision": 0.5, "recall": 1.0, "f_measure": 2 / 3,
        "n_gt": 2, "n_pred": 1,
    })
    shutil.rmtree(gt / "instances")
    from_mask = evaluate(pred, gt, tmp_path / "r2")["images"]["s"]["tile"]
    assert from_mask == {
        "count_error": 0.0, "precision": 1.0, "recall": 1.0, "f_measure": 1.0,
        "n_gt": 1, "n_pred": 1,
    }


def test_predicted_instances_are_used_when_present(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _touching_tiles_dataset(gt)
    write_mask(pred / "s.png", _mask(np.ones((1, 4), bool)))  # one component on its own
    write_instances(pred / "instances" / "s.png", np.array([[4, 4, 9, 9]]))
    tile = evaluate(pred, gt, tmp_path / "r")["images"]["s"]["tile"]
    assert tile == {
        "count_error": 0.0, "precision": 1.0, "recall": 1.0, "f_measure": 1.0,
        "n_gt": 2, "n_pred": 2,
    }


def test_missing_prediction_names_the_file_and_writes_nothing(case):
    (case["pred"] / "b.png").unlink()
    with pytest.raises(MosaicError, match=r"pred/b\.png: prediction file not found"):
        evaluate(case["pred"], case["gt"], case["out"])
    assert not case["out"].exists()


def test_incomplete_predicted_instances_folder(case):
    write_instances(case["pred"] / "instances" / "a.png", GT_A)
    with pytest.raises(MosaicError, match=r"instances/b\.png: predicted instance map"):
        evaluate(case["pred"], case["gt"], case["out"])
    assert not case["out"].exists()


def test_missing_baseline_names_the_file(case):
    (case["base"] / "a.png").unlink()
    with pytest.raises(MosaicError, match=r"base/a\.png: baseline file not found"):
        evaluate(case["pred"], case["gt"], case["out"], baseline=case["base"])


def test_size_mismatch_names_the_file_and_leaves_no_partial_output(case):
    write_mask(case["pred"] / "b.png", np.full((5, 6), 255, np.uint8))
    with pytest.raises(MosaicError, match=r"pred/b\.png: size 6x5 differs from the ground truth"):
        evaluate(case["pred"], case["gt"], case["out"], baseline=case["base"])
    # "a" was scored (and its picture drawn) before "b" failed: nothing of it may remain.
    assert sorted(p.name for p in case["out"].parent.iterdir()) == ["base", "gt", "pred"]


def test_report_folder_must_not_be_an_input(case):
    with pytest.raises(MosaicError, match="must not be or contain the input"):
        evaluate(case["pred"], case["gt"], case["pred"], overwrite=True)
    with pytest.raises(MosaicError, match="must not be or contain the input"):
        evaluate(case["pred"], case["gt"], case["gt"].parent, overwrite=True)
    assert (case["pred"] / "a.png").is_file()


def test_markdown_table():
    metrics = {
        "pixel": {"iou": 0.9102, "dice": 0.95256, "accuracy": 0.9286, "recall": 0.9589,
                  "precision": 1.0},
        "tile": {"count_error": None, "precision": 0.82, "recall": 0.83, "f_measure": 0.825,
                 "n_gt": 3.5, "n_pred": 4},
    }
    lines = markdown_table({"fine-tuned": metrics, "empty": metrics}).splitlines()
    assert lines[0] == (
        "| name | IoU % | Dice % | Accuracy % | Recall % | Precision % | Count error "
        "| Tile precision % | Tile recall % | Tile F % | Tesserae (GT) | Regions (pred) |"
    )
    assert lines[1] == "|---|" + "---:|" * 11
    assert lines[2] == (
        "| fine-tuned | 91.02 | 95.26 | 92.86 | 95.89 | 100.00 | n/a | 82.00 | 83.00 | 82.50 "
        "| 3.5 | 4 |"
    )
    assert len(lines) == 4 and lines[3].startswith("| empty |")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _eval(case, *extra: str):
    args = ["eval", "--pred", str(case["pred"]), "--gt", str(case["gt"]), "--out", str(case["out"])]
    return CliRunner().invoke(main, args + list(extra))


def test_cli_writes_report_and_prints_mean_table(case):
    result = _eval(case, "--baseline", str(case["base"]), "--per-image")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| name | IoU % |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| a", "| b", "| **mean**"]
    assert lines[2].split(" | ")[1] == f"{100 * 4 / 9:.2f}"  # IoU of "a" in percent
    assert sorted(p.name for p in case["out"].iterdir()) == [
        "comparison", "metrics.csv", "metrics.json"]


def test_cli_mean_only_by_default_and_split(case):
    result = _eval(case, "--split", "test")
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()[2:]
    assert len(rows) == 1 and rows[0].startswith("| **mean** | 44.44 |")


def test_cli_missing_prediction_fails_cleanly(case):
    (case["pred"] / "a.png").unlink()
    result = _eval(case)
    assert result.exit_code == 1
    assert "a.png: prediction file not found" in result.output
    assert "Traceback" not in result.output
    assert not case["out"].exists()


def test_cli_existing_report_needs_overwrite(case):
    assert _eval(case).exit_code == 0
    again = _eval(case)
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert _eval(case, "--overwrite").exit_code == 0


def test_cli_rejects_missing_folders_and_bad_split(case, tmp_path):
    result = CliRunner().invoke(main, [
        "eval", "--pred", str(tmp_path / "nope"), "--gt", str(case["gt"]),
        "--out", str(case["out"])])
    assert result.exit_code == 2 and "nope" in result.output
    assert _eval(case, "--split", "holdout").exit_code == 2
    assert not case["out"].exists()


def test_reference_specks_are_not_scored(tmp_path: Path):
    """A speck of the reference mask (1 px in the grout, from thresholding) is not a tessera."""
    gt_ids = np.zeros((24, 24), dtype=np.int32)
    for k, (y, x) in enumerate([(0, 0), (0, 12), (12, 0), (12, 12)], start=1):
        gt_ids[y:y + 10, x:x + 10] = k
    found = gt_ids.copy()
    gt_ids[11, 11] = 5
    data = tmp_path / "gt"
    write_manifest(data, [write_sample(data, "s", np.zeros((24, 24, 3), np.uint8), gt_ids, split="test")])
    write_mask(tmp_path / "pred" / "s.png", instances_to_mask(found))
    report = evaluate(tmp_path / "pred", data, tmp_path / "report")
    tile = report["images"]["s"]["tile"]
    assert tile["n_gt"] == 4 and tile["f_measure"] == pytest.approx(1.0)
    assert tile["count_error"] == 0.0
