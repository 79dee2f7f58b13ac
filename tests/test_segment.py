"""`mosaic-toolkit segment` and its library: engine choice, outputs, eval on them, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fixtures_sam2 import grid_mosaic
from mosaic_toolkit.classical import ClassicalEngine
from mosaic_toolkit.cli import main
from mosaic_toolkit.core.dataset import instances_to_mask, relabel_sequential
from mosaic_toolkit.core.io import read_image, read_instances, read_mask, write_image
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.evaluation.metrics import pixel_metrics
from mosaic_toolkit.engines import open_engine
from mosaic_toolkit.segment import collect_images, overlay, segment_image
from mosaic_toolkit.data.synth import synth_dataset
from mosaic_toolkit.sam.weights import MODELS


@pytest.fixture
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty checkpoint folder: no SAM 2 model is installed."""
    monkeypatch.setenv("MOSAIC_SAM_HOME", str(tmp_path / "empty_sam_home"))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Two small synthetic mosaics in the dataset layout."""
    root = tmp_path / "synthetic"
    synth_dataset(root, 2, seed=3, min_size=280, max_size=360)
    return root


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------ engines
def test_auto_engine_is_classical_without_weights_and_sam2_needs_weights(no_weights):
    assert isinstance(open_engine(None, None, None), ClassicalEngine)
    assert isinstance(open_engine("auto", None, None), ClassicalEngine)
    with pytest.raises(MosaicError, match="weights fetch sam2.1-large"):
        open_engine("sam2", None, None)
    with pytest.raises(MosaicError, match="only applies to --engine sam2"):
        open_engine("classical", "sam2.1-tiny", None)


def test_auto_engine_is_sam2_when_a_model_is_installed(sam2_home):
    engine = open_engine(None, None, "cpu", {"method": "stock"})
    assert engine.name == "sam2"
    assert engine.model_version == "sam2.1-tiny"
    assert engine.params.method == "stock"


# ------------------------------------------------------------------------------ pieces
def test_collect_images_from_files_folders_and_datasets(dataset: Path, tmp_path: Path):
    images = sorted((dataset / "images").iterdir())
    assert collect_images([dataset]) == images  # a dataset folder: its images/
    assert collect_images([dataset / "images", images[0]]) == images  # same file twice is fine
    other = tmp_path / "other"
    other.mkdir()
    (other / images[0].name).write_bytes(images[0].read_bytes())
    with pytest.raises(MosaicError, match="both have the stem"):
        collect_images([dataset, other])
    with pytest.raises(MosaicError, match="no such file"):
        collect_images([tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MosaicError, match="no images found"):
        collect_images([empty])


def test_overlay_outlines_each_tessera_and_nothing_else():
    image, instances = grid_mosaic(2, 3)
    out = overlay(image, instances)
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = np.any(out != image, axis=2)
    # Outline = tessera pixels with a 4-neighbour outside the tessera: the ring of each square.
    tile = np.zeros((28, 28), bool)
    tile[[0, -1], :] = tile[:, [0, -1]] = True
    expected = np.zeros(instances.shape, bool)
    for k in range(1, int(instances.max()) + 1):
        ys, xs = np.nonzero(instances == k)
        expected[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = tile
    assert np.array_equal(changed, expected)
    assert np.all(out[changed] == (255, 0, 255))


def test_segment_image_tiles_large_images_for_the_classical_engine():
    image, truth = grid_mosaic(12, 16, seed=1)  # 384 x 512
    engine = ClassicalEngine()
    tiled = segment_image(engine, image, tile=256)
    whole = segment_image(engine, image)  # fits one 1024 tile
    assert np.array_equal(whole, relabel_sequential(engine.segment(image)))
    assert tiled.max() == whole.max() == truth.max()
    assert pixel_metrics(tiled > 0, whole > 0)["dice"] > 0.98


def test_classical_tiles_share_the_image_statistics():
    """Tiles of one image are segmented with the statistics measured on the whole image: the
    same result as segmenting each tile with ``statistics=engine.statistics(image)``, and the
    statistics change nothing when the image is segmented whole."""
    from mosaic_toolkit.core.tiling import resolve_tiling, segment_tiled

    image, _ = grid_mosaic(12, 16, seed=2)  # 384 x 512
    engine = ClassicalEngine()
    size = 32.0
    stats = engine.statistics(image, size)
    assert len(stats.grout) == 3
    assert np.array_equal(engine.segment(image, size), engine.segment(image, size, stats))
    tiled = segment_image(engine, image, tile=256, tessera_size=size)
    tile, overlap = resolve_tiling(image, 256, None, size)
    shared = segment_tiled(image, lambda crop: engine.segment(crop, size, stats), tile=tile,
                           overlap=overlap)
    assert np.array_equal(tiled, shared)


# ------------------------------------------------------------------------------ command
def test_segment_classical_writes_outputs_that_eval_scores(dataset: Path, tmp_path: Path, no_weights):
    pred = tmp_path / "pred"
    result = run("segment", dataset, "--out", pred, "--tile", 256)
    assert result.exit_code == 0, result.output
    assert "Engine: classical" in result.output
    assert "No SAM 2 weights are installed" in result.output
    assert "2 images" in result.output
    info = json.loads((pred / "segment.json").read_text())
    assert info["engine"] == "classical" and info["tile"] == 256
    assert [r["stem"] for r in info["images"]] == ["synth_00000", "synth_00001"]
    for record in info["images"]:
        stem = record["stem"]
        image = read_image(dataset / "images" / f"{stem}.png")
        instances = read_instances(pred / "instances" / f"{stem}.png")
        assert instances.shape == image.shape[:2]
        assert int(instances.max()) == record["tesserae"] > 10
        assert np.array_equal(read_mask(pred / f"{stem}.png"), instances_to_mask(instances))
        assert read_image(pred / "overlays" / f"{stem}.jpg").shape == image.shape

    report = tmp_path / "report"
    result = run("eval", "--pred", pred, "--gt", dataset, "--out", report)
    assert result.exit_code == 0, result.output
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["mean"]["pixel"]["dice"] > 0.8


def test_segment_records_the_scale_and_tessera_size_overrides_it(
    dataset: Path, tmp_path: Path, no_weights
):
    auto = tmp_path / "auto"
    result = run("segment", dataset, "--out", auto, "--engine", "classical")
    assert result.exit_code == 0, result.output
    for record in json.loads((auto / "segment.json").read_text())["images"]:
        gt = read_instances(dataset / "instances" / f"{record['stem']}.png")
        areas = np.bincount(gt.ravel())[1:]
        diameter = 2 * np.sqrt(np.median(areas[areas > 0]) / np.pi)
        assert record["tessera_size_px"] == pytest.approx(diameter, rel=0.15)
        assert record["tile"] == 1024 and record["overlap"] == 0  # one tile holds the image

    forced = tmp_path / "forced"
    result = run("segment", dataset, "--out", forced, "--engine", "classical",
                 "--tessera-size", 20, "--tile", 128)
    assert result.exit_code == 0, result.output
    info = json.loads((forced / "segment.json").read_text())
    assert info["tessera_size"] == 20
    for record in info["images"]:
        assert record["tessera_size_px"] == 20 and record["tile"] == 128
        assert record["overlap"] == 40  # two diameters

    result = run("segment", dataset, "--out", tmp_path / "bad", "--tessera-size", 0)
    assert result.exit_code != 0 and "--tessera-size" in result.output
    assert not (tmp_path / "bad").exists()


def test_unreadable_image_fails_cleanly_without_output(dataset: Path, tmp_path: Path, no_weights):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not an image at all")
    out = tmp_path / "pred"
    result = run("segment", dataset, broken, "--out", out)
    assert result.exit_code == 1
    assert "bad.png" in result.output and "cannot read image" in result.output
    assert not out.exists()
    # A valid header with truncated pixel data fails while segmenting: still no output.
    good = (dataset / "images" / "synth_00001.png").read_bytes()
    (broken / "bad.png").write_bytes(good[: len(good) // 2])
    result = run("segment", dataset, broken, "--out", out)
    assert result.exit_code == 1
    assert "bad.png" in result.output
    assert not out.exists() and not any(p.name.startswith(".pred") for p in tmp_path.iterdir())


def test_too_small_tile_is_a_usage_error(dataset: Path, tmp_path: Path):
    result = run("segment", dataset, "--out", tmp_path / "pred", "--tile", 10)
    assert result.exit_code == 2
    assert "--tile" in result.output
    assert not (tmp_path / "pred").exists()


def test_sam2_requested_without_weights_is_a_clear_error(dataset: Path, tmp_path: Path, no_weights):
    result = run("segment", dataset, "--out", tmp_path / "pred", "--engine", "sam2")
    assert result.exit_code == 1
    assert "mosaic-toolkit weights fetch sam2.1-large" in result.output
    assert "--engine classical" in result.output
    assert not (tmp_path / "pred").exists()


def test_segment_with_sam2_model_end_to_end(sam2_home: Path, sam2_engine, tmp_path: Path):
    """A fine-tune of the random-weight tiny fixture: its metadata runs it at 256² input and
    opens the generator's filters (random weights give low scores) so masks get through."""
    from mosaic_toolkit.sam.models import save_finetune

    image, _ = grid_mosaic(3, 4)
    write_image(tmp_path / "images" / "grid.png", image)
    centres = np.array([[16 + 32 * c, 16 + 32 * r] for r in range(3) for c in range(4)], np.float32)
    logits, _ = sam2_engine.decode_points(image, centres)
    generator = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                 "stability_score_offset": 0.05, "mask_threshold": float(logits.median()),
                 "min_area": 16}
    finetune = tmp_path / "tiny-finetune.pt"
    base = {"name": "sam2.1-tiny", "config": MODELS["sam2.1-tiny"].config, "image_size": 256}
    # The base decoder untouched (only tuned parameters): served with SAM 2's own output choice.
    save_finetune(finetune, sam2_engine.model, base=base, generator=generator, training=None, output="sam2")

    out = tmp_path / "pred"
    result = run("segment", tmp_path / "images", "--out", out, "--engine", "sam2",
                 "--model", finetune, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "Engine: SAM 2, model sam2.1-tiny+ft-" in result.output
    info = json.loads((out / "segment.json").read_text())
    assert info["engine"] == "sam2" and info["model"] == str(finetune)
    assert info["params"]["mask_threshold"] == pytest.approx(generator["mask_threshold"])
    instances = read_instances(out / "instances" / "grid.png")
    assert instances.shape == image.shape[:2]
    assert int(instances.max()) == info["images"][0]["tesserae"] > 0
    assert np.array_equal(read_mask(out / "grid.png"), instances_to_mask(instances))
    assert (out / "overlays" / "grid.jpg").is_file()


def test_too_coarse_image_gets_a_warning_and_no_regions(tmp_path: Path, no_weights):
    """A whole panel photographed at 5 px per tessera: `segment` writes an empty mask and a
    warning naming the image and the resolution to use, records the estimate (confidence,
    alternatives) in segment.json, and still segments the other images (exit status 0)."""
    from mosaic_toolkit.data.synth import synth_mosaic

    folder = tmp_path / "in"
    folder.mkdir()
    panel, _ = synth_mosaic(np.random.default_rng(2), 700, 560, style="opus", tessera_size=5,
                            realism=1.0, weathering=1.0)
    detail, _ = synth_mosaic(np.random.default_rng(1), 360, 300, style="irregular",
                             tessera_size=24, realism=1.0)
    write_image(folder / "panel.png", panel)
    write_image(folder / "detail.png", detail)
    out = tmp_path / "out"
    result = run("segment", folder, "--out", out, "--engine", "classical")
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.output and "panel.png" in result.output
    assert "too coarse" in result.output and "resolution" in result.output
    assert "1 too coarse" in result.output
    records = {r["stem"]: r for r in json.loads((out / "segment.json").read_text())["images"]}
    assert records["panel"]["tesserae"] == 0 and records["panel"]["scale"]["coarse"]
    assert "too coarse" in records["panel"]["warning"]
    assert (read_mask(out / "panel.png") == 255).all()  # nothing segmented
    assert records["detail"]["tesserae"] > 50 and not records["detail"]["scale"]["coarse"]
    assert records["detail"]["scale"]["confidence"] > 0
    assert {a["source"] for a in records["detail"]["scale"]["alternatives"]} == {
        "autocorrelation", "spectrum"}


def test_segment_finetune_with_base_outside_the_cache(sam2_engine, tiny_sam2_checkpoint, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    """`segment --model FT` finds a base given by path at training time; `--base` when it moved."""
    import dataclasses
    import shutil

    from mosaic_toolkit.sam.models import base_record, resolve_model, save_finetune

    image, _ = grid_mosaic(2, 3)
    write_image(tmp_path / "images" / "grid.png", image)
    base = tmp_path / "w" / MODELS["sam2.1-tiny"].filename
    base.parent.mkdir()
    shutil.copyfile(tiny_sam2_checkpoint, base)
    monkeypatch.setenv("MOSAIC_SAM_HOME", str(tmp_path / "empty_home"))
    spec = dataclasses.replace(resolve_model(base), image_size=256)
    finetune = tmp_path / "ft.pt"
    save_finetune(finetune, sam2_engine.model, base=base_record(spec), generator={"min_area": 16},
                  training=None, output="sam2")

    result = run("segment", tmp_path / "images", "--out", tmp_path / "a", "--model", finetune, "--device", "cpu")
    assert result.exit_code == 0, result.output
    moved = base.rename(tmp_path / "moved.pt")
    result = run("segment", tmp_path / "images", "--out", tmp_path / "b", "--model", finetune, "--device", "cpu")
    assert result.exit_code == 1 and "not found" in result.output and "--base" in result.output
    assert not (tmp_path / "b").exists()
    result = run("segment", tmp_path / "images", "--out", tmp_path / "b", "--model", finetune,
                 "--base", moved, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "segment.json").is_file()
    result = run("segment", tmp_path / "images", "--out", tmp_path / "c", "--base", moved)
    assert result.exit_code == 2 and "--base applies to a fine-tune" in result.output
