"""Tiled tasks (`mosaic-toolkit tasks`) and putting annotated crops back together in `export`.

The oracle: a synthetic mosaic is cut into crop tasks, each crop is annotated with its own
ground truth (brush masks, exact), and the export must give back the mosaic's instance map and
pixels exactly: one sample, each tessera once, also those cut by crop borders. The round trip
through a real Label Studio is in test_tasks_labelstudio.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from mosaic_toolkit.cli import main
from mosaic_toolkit.data.augment import augment_dataset
from mosaic_toolkit.core.dataset import Dataset, instances_to_mask, relabel_sequential
from mosaic_toolkit.core.io import read_image, write_instances, write_mask
from mosaic_toolkit.evaluation.evaluate import evaluate
from mosaic_toolkit.data.export import export_dataset, folder_resolver, rasterise_region
from mosaic_toolkit.data.tasks import CROP_KEY, crop_instances, crop_layout, make_tasks
from mosaic_toolkit.data.synth import synth_mosaic

SIZE = 22.0  # tessera diameter given to `tasks` (skips the estimate, keeps the test fast)
MAX = 120


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    image, truth = synth_mosaic(np.random.default_rng(5), 700, 560, tessera_size=24)
    path = tmp_path_factory.mktemp("mosaic") / "big mosaic.png"
    Image.fromarray(image).save(path)
    return path, image, truth


@pytest.fixture(scope="module")
def cut(mosaic, tmp_path_factory) -> tuple[Path, list[dict]]:
    path, _, _ = mosaic
    out = tmp_path_factory.mktemp("tasks") / "tasks"
    result = CliRunner().invoke(main, ["tasks", str(path), "--out", str(out), "--max-tesserae", str(MAX),
                                       "--tessera-size", str(SIZE), "--url-prefix", "https://host/m/"])
    assert result.exit_code == 0, result.output
    tasks = json.loads((out / "tasks.json").read_text())
    return out, tasks


def brush(mask: np.ndarray, rid: str) -> dict:
    h, w = mask.shape
    return {"id": rid, "type": "brushlabels", "from_name": "brush", "to_name": "image",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": ["Tessera"]}}


def annotate(tasks: list[dict], truth: np.ndarray, skip: set[int] = frozenset()) -> list[dict]:
    """A Label Studio JSON export of the tasks: each crop annotated with its ground truth."""
    exported = []
    for i, task in enumerate(tasks):
        meta = task["meta"][CROP_KEY]
        crop = (meta["y"], meta["x"], meta["y"] + meta["height"], meta["x"] + meta["width"])
        labels = crop_instances(truth, crop)
        result = [brush(labels == k, f"c{i}t{k}") for k in range(1, int(labels.max()) + 1)]
        annotations = [] if i in skip else [{"id": 100 + i, "result": result, "was_cancelled": False,
                                              "ground_truth": False, "updated_at": "2026-01-01T00:00:00Z"}]
        exported.append({"id": i + 1, "data": task["data"], "meta": task["meta"], "annotations": annotations,
                         "project": 3})
    return exported


def test_crops_hold_at_most_about_max_tesserae_and_cover_the_mosaic(mosaic, cut) -> None:
    path, image, truth = mosaic
    out, tasks = cut
    assert len(tasks) >= 6
    covered = np.zeros(truth.shape, bool)
    for task in tasks:
        meta = task["meta"][CROP_KEY]
        assert task["data"][CROP_KEY] == meta and task["data"]["mosaic"] == path.name
        assert (meta["mosaic_width"], meta["mosaic_height"]) == (image.shape[1], image.shape[0])
        y0, x0 = meta["y"], meta["x"]
        crop = read_image(out / task["data"]["image"].removeprefix("https://host/m/"))
        np.testing.assert_array_equal(crop, image[y0:y0 + meta["height"], x0:x0 + meta["width"]])
        covered[y0:y0 + meta["height"], x0:x0 + meta["width"]] = True
        assert crop_instances(truth, (y0, x0, y0 + meta["height"], x0 + meta["width"])).max() <= MAX
        assert "predictions" not in task
    assert covered.all()


def test_oracle_annotations_export_back_to_the_exact_mosaic(mosaic, cut, tmp_path) -> None:
    """Each crop annotated with its ground truth -> one sample per mosaic whose instance map
    is the mosaic's ground truth exactly (nothing lost, duplicated or split at crop borders)
    and whose pixels are the mosaic's."""
    path, image, truth = mosaic
    out, tasks = cut
    summary = export_dataset(annotate(tasks, truth), folder_resolver(out / "images"), tmp_path / "ds",
                             coco=tmp_path / "coco.json")
    [sample] = summary.samples
    assert summary.skipped == []
    dataset = Dataset.open(tmp_path / "ds")
    [stored] = dataset.samples
    assert stored.stem == "mosaic_big_mosaic" and stored.source["mosaic"] == path.name
    assert stored.source["crops"] == stored.source["annotated_crops"] == len(tasks)
    np.testing.assert_array_equal(dataset.instances(stored), relabel_sequential(truth))
    np.testing.assert_array_equal(dataset.image(stored), image)
    assert sample.tesserae == truth.max()
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == [stored.image]
    assert len(coco["annotations"]) == truth.max()


def test_unannotated_crop_is_reported_or_exported_as_unknown(mosaic, cut, tmp_path) -> None:
    _, _, truth = mosaic
    out, tasks = cut
    exported = annotate(tasks, truth, skip={4})
    summary = export_dataset(exported, folder_resolver(out / "images"), tmp_path / "strict")
    assert summary.samples == []
    [skipped] = summary.skipped
    assert skipped.task == f"mosaic {tasks[0]['data']['mosaic']}" and "1 of" in skipped.reason
    assert "task 5" in skipped.reason and "--partial" in skipped.reason

    summary = export_dataset(exported, folder_resolver(out / "images"), tmp_path / "partial", partial=True)
    [sample] = summary.samples
    assert "exported partially" in summary.skipped[0].reason
    dataset = Dataset.open(tmp_path / "partial")
    [stored] = dataset.samples
    unknown = np.asarray(Image.open(tmp_path / "partial" / stored.source["unknown"])) > 0
    meta = tasks[4]["meta"][CROP_KEY]
    inside = np.zeros(truth.shape, bool)
    inside[meta["y"]:meta["y"] + meta["height"], meta["x"]:meta["x"] + meta["width"]] = True
    assert unknown.any() and not np.any(unknown & ~inside)  # only within the missing crop
    instances = dataset.instances(stored)
    assert not np.any(unknown & (instances > 0))
    # away from the missing crop every tessera is the ground truth's
    far = ~inside
    known = np.unique(truth[far & (truth > 0)])
    whole = [k for k in known if not np.any((truth == k) & inside)]
    for k in whole[:50]:
        ids = np.unique(instances[truth == k])
        assert len(ids) == 1 and ids[0] > 0 and np.array_equal(instances == ids[0], truth == k)

    # kept out of training: no augmented crop holds any unknown pixel
    augmented = augment_dataset(tmp_path / "partial", tmp_path / "augmented", tesserae_per_crop=60,
                                transforms=("identity",))
    crops = [s.source["crop"] for s in Dataset.open(tmp_path / "augmented").samples]
    assert crops and augmented.skipped_empty >= 1
    for x0, y0, x1, y1 in crops:
        assert not unknown[y0:y1, x0:x1].any()
    # and out of metrics: a prediction of the whole mosaic (tesserae in the unknown area too)
    # scores perfectly against the partial ground truth
    pred = tmp_path / "pred"
    write_mask(pred / f"{stored.stem}.png", instances_to_mask(relabel_sequential(truth)))
    write_instances(pred / "instances" / f"{stored.stem}.png", relabel_sequential(truth))
    report = evaluate(pred, tmp_path / "partial", tmp_path / "eval")
    scores = report["images"][stored.stem]
    assert scores["pixel"]["iou"] == 1.0 and scores["tile"]["f_measure"] == 1.0, scores


def test_prelabels_are_light_polygons_inside_each_crop(mosaic, tmp_path) -> None:
    """--prelabel --engine classical: every task carries one prediction (model version
    classical) with a light polygon per tessera piece of its crop."""
    path, image, _ = mosaic
    out = tmp_path / "pre"
    result = CliRunner().invoke(main, ["tasks", str(path), "--out", str(out), "--max-tesserae", "400",
                                       "--tessera-size", str(SIZE), "--url-prefix", "s3://b/",
                                       "--prelabel", "--engine", "classical"])
    assert result.exit_code == 0, result.output
    tasks = json.loads((out / "tasks.json").read_text())
    assert 1 < len(tasks) < 6
    for task in tasks:
        [prediction] = task["predictions"]
        assert prediction["model_version"] == "classical" and len(prediction["result"]) > 50
        meta = task["meta"][CROP_KEY]
        owner = np.zeros((meta["height"], meta["width"]), np.int32)
        for region in prediction["result"]:
            assert region["type"] == "polygonlabels" and region["from_name"] == "polygon"
            assert (region["original_width"], region["original_height"]) == (meta["width"], meta["height"])
            owner += rasterise_region(task["data"]["image"], region, meta["width"], meta["height"])
        assert owner.max() == 1  # no two polygons share a pixel
        assert np.median([len(r["value"]["points"]) for r in prediction["result"]]) <= 12
        assert "score" not in prediction and not any("score" in r for r in prediction["result"])


def test_pieces_of_a_tessera_carry_its_score() -> None:
    """A crop's regions (tesserae, and pieces of tesserae the crop cuts, some in two) carry the
    score of the mosaic's tessera they are part of."""
    from mosaic_toolkit.data.tasks import piece_scores

    mosaic = np.zeros((40, 60), np.int32)
    mosaic[5:15, 5:15] = 1
    mosaic[5:35, 30:40] = 2  # the crop cuts it in two: a notch leaves the crop at column 30
    mosaic[18:22, 30:40] = 0
    mosaic[18:22, 38:40] = 2
    mosaic[25:35, 45:58] = 3  # outside the crop
    crop = (0, 0, 40, 38)
    local = crop_instances(mosaic, crop)
    scores = piece_scores(local, mosaic[0:40, 0:38], [0.9, 0.6, 0.3])
    assert int(local.max()) == 3 and scores.shape == (3,)
    assert scores[local[10, 10] - 1] == 0.9
    assert scores[local[10, 33] - 1] == scores[local[30, 33] - 1] == 0.6 and local[10, 33] != local[30, 33]


def test_sam2_prelabel_tasks_carry_scores(tmp_path, sam2_engine) -> None:
    """With SAM 2's guided method every region of every task carries a score and the prediction
    their mean."""
    image, _ = synth_mosaic(np.random.default_rng(2), 200, 150, tessera_size=24)
    Image.fromarray(image).save(tmp_path / "small.png")
    tasks = make_tasks([tmp_path / "small.png"], tmp_path / "out", tessera_size=SIZE, url_prefix="/x",
                       engine=sam2_engine, model_version="sam2", max_tesserae=30, progress=False)
    assert len(tasks) > 1
    for task in tasks:
        [prediction] = task["predictions"]
        regions = prediction["result"]
        assert regions and all(0.0 <= r["score"] <= 1.5 for r in regions)
        assert prediction["score"] == pytest.approx(np.mean([r["score"] for r in regions]), abs=1e-3)


def test_small_mosaic_is_one_task_and_bad_input_fails_cleanly(tmp_path) -> None:
    image, truth = synth_mosaic(np.random.default_rng(2), 200, 150, tessera_size=24)
    Image.fromarray(image).save(tmp_path / "small.png")
    tasks = make_tasks([tmp_path / "small.png"], tmp_path / "one", tessera_size=SIZE, url_prefix="/x",
                       progress=False)
    assert len(tasks) == 1 and tasks[0]["data"]["image"] == "/x/images/small_r00c00.png"
    assert crop_layout(150, 200, SIZE, 300)[2] == [(0, 0, 150, 200)]

    runner = CliRunner()
    result = runner.invoke(main, ["tasks", str(tmp_path / "small.png"), "--out", str(tmp_path / "no-url")],
                           env={"LOCAL_FILES_DOCUMENT_ROOT": ""})
    assert result.exit_code != 0 and "--document-root" in result.output
    assert not (tmp_path / "no-url").exists()
    result = runner.invoke(main, ["tasks", str(tmp_path / "small.png"), "--out", str(tmp_path / "outside"),
                                  "--document-root", str(tmp_path / "elsewhere")])
    assert result.exit_code != 0 and "inside the document root" in result.output
    (tmp_path / "notes.png").write_text("not an image")
    result = runner.invoke(main, ["tasks", str(tmp_path / "notes.png"), "--out", str(tmp_path / "bad"),
                                  "--url-prefix", "/x"])
    assert result.exit_code != 0 and "notes.png" in result.output and not (tmp_path / "bad").exists()
