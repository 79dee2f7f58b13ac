"""`mosaic-toolkit export`: Label Studio JSON export -> ground-truth dataset.

Brush regions are always encoded with label-studio-sdk's own RLE encoder (mask2rle), never a
hand-written codec, so the tests check the real Label Studio format end to end.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image
from pycocotools import mask as coco_mask
from scipy import ndimage as ndi

from mosaic_toolkit.cli import main
from mosaic_toolkit.core.dataset import Dataset, relabel_sequential, split_disconnected
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.data.export import (
    choose_annotation,
    export,
    folder_resolver,
    rasterise_region,
)


# --------------------------------------------------------------------------------------------
# Builders for Label Studio JSON
# --------------------------------------------------------------------------------------------
def brush(mask: np.ndarray, rid: str, label: str = "Tessera") -> dict:
    """A brushlabels result, RLE-encoded by the SDK (an RGBA HxWx4 array, alpha = mask)."""
    h, w = mask.shape
    return {
        "id": rid, "type": "brushlabels", "from_name": "tag", "to_name": "image",
        "original_width": w, "original_height": h, "image_rotation": 0,
        "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]},
    }


def polygon(points: list[list[float]], w: int, h: int, rid: str, label: str = "Tessera") -> dict:
    return {
        "id": rid, "type": "polygonlabels", "from_name": "poly", "to_name": "image",
        "original_width": w, "original_height": h, "image_rotation": 0,
        "value": {"points": points, "closed": True, "polygonlabels": [label]},
    }


def keypoint(x: float, y: float, w: int, h: int, rid: str) -> dict:
    return {
        "id": rid, "type": "keypointlabels", "from_name": "kp", "to_name": "image",
        "original_width": w, "original_height": h,
        "value": {"x": x, "y": y, "width": 1.0, "keypointlabels": ["Tessera"]},
    }


def rectangle(w: int, h: int, rid: str) -> dict:
    return {
        "id": rid, "type": "rectanglelabels", "from_name": "rect", "to_name": "image",
        "original_width": w, "original_height": h,
        "value": {"x": 0, "y": 0, "width": 100, "height": 100, "rotation": 0,
                  "rectanglelabels": ["Tessera"]},
    }


def annotation(aid: int, results: list[dict], updated: str = "2024-01-01T10:00:00.000000Z",
               cancelled: bool = False, ground_truth: bool = False) -> dict:
    return {"id": aid, "result": results, "was_cancelled": cancelled, "ground_truth": ground_truth,
            "created_at": "2024-01-01T09:00:00.000000Z", "updated_at": updated}


def task(tid: int, image: str, annotations: list[dict]) -> dict:
    return {"id": tid, "project": 3, "data": {"image": image}, "annotations": annotations,
            "predictions": []}


def write_png(path: Path, w: int, h: int, seed: int = 0) -> Path:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def write_export(path: Path, tasks: list[dict]) -> Path:
    path.write_text(json.dumps(tasks))
    return path


def run_cli(*args: str):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def synthetic_instances(h: int, w: int, seed: int) -> np.ndarray:
    """Voronoi tesserae with one-pixel grout lines, every id one 4-connected piece."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform([0, 0], [h, w], size=(14, 2))
    rr, cc = np.mgrid[:h, :w]
    dist = (rr[..., None] - seeds[:, 0]) ** 2 + (cc[..., None] - seeds[:, 1]) ** 2
    cells = np.argmin(dist, axis=2) + 1
    grout = np.zeros((h, w), dtype=bool)
    grout[:, 1:] |= cells[:, 1:] != cells[:, :-1]
    grout[1:, :] |= cells[1:, :] != cells[:-1, :]
    cells[grout] = 0
    return split_disconnected(cells)


# --------------------------------------------------------------------------------------------
# Which annotation counts
# --------------------------------------------------------------------------------------------
def test_cancelled_annotations_never_count():
    chosen, reason = choose_annotation(task(1, "a.png", [
        annotation(1, [], updated="2024-05-01T00:00:00Z", cancelled=True),
        annotation(2, [], updated="2024-01-01T00:00:00Z"),
    ]))
    assert chosen["id"] == 2 and reason is None
    chosen, reason = choose_annotation(task(1, "a.png", [annotation(1, [], cancelled=True)]))
    assert chosen is None and reason == "all annotations cancelled"
    assert choose_annotation(task(1, "a.png", [])) == (None, "no annotation")


def test_ground_truth_beats_a_newer_annotation():
    chosen, _ = choose_annotation(task(1, "a.png", [
        annotation(1, [], updated="2024-05-01T00:00:00Z"),
        annotation(2, [], updated="2023-01-01T00:00:00Z", ground_truth=True),
        annotation(3, [], updated="2024-06-01T00:00:00Z", cancelled=True, ground_truth=True),
    ]))
    assert chosen["id"] == 2


def test_most_recently_updated_wins_otherwise():
    chosen, _ = choose_annotation(task(1, "a.png", [
        annotation(7, [], updated="2024-03-01T12:00:00.000000Z"),
        annotation(5, [], updated="2024-03-02T08:00:00+01:00"),  # 07:00 UTC, the newest
        annotation(9, [], updated="2024-02-01T00:00:00Z"),
    ]))
    assert chosen["id"] == 5


def test_export_uses_the_chosen_annotation_and_reports_skipped_tasks(tmp_path):
    w, h = 8, 6
    left = np.zeros((h, w), bool)
    left[1:4, 0:3] = True
    right = np.zeros((h, w), bool)
    right[2:5, 5:8] = True
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "a.png", w, h)
    tasks = [
        task(1, "/data/upload/3/a.png", [
            annotation(10, [brush(left, "r1")], updated="2024-01-01T00:00:00Z"),
            annotation(11, [brush(right, "r2")], updated="2024-02-01T00:00:00Z"),
            annotation(12, [brush(left | right, "r3")], updated="2024-03-01T00:00:00Z",
                       cancelled=True),
        ]),
        task(2, "/data/upload/3/a.png", []),
        task(3, "/data/upload/3/a.png", [annotation(30, [brush(left, "r")], cancelled=True)]),
        task(4, "/data/upload/3/a.png", [annotation(40, [keypoint(50, 50, w, h, "k")])]),
    ]
    summary = export(tmp_path / "ds", export_json=write_export(tmp_path / "e.json", tasks),
                     images=images)
    assert [(s.task, s.reason) for s in summary.skipped] == [
        (2, "no annotation"), (3, "all annotations cancelled"), (4, "no tessera regions")]
    ds = Dataset.open(tmp_path / "ds")
    (sample,) = ds.samples
    assert sample.stem == "task1_a"
    assert sample.source == {"task": 1, "annotation": 11, "image": "a.png", "project": 3}
    np.testing.assert_array_equal(ds.instances(sample), right.astype(np.int32))
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["skipped"][0] == {
        "task": 2, "reason": "no annotation"}


# --------------------------------------------------------------------------------------------
# Regions -> tesserae
# --------------------------------------------------------------------------------------------
def test_brush_region_with_two_blobs_gives_two_tesserae(tmp_path):
    w, h = 9, 5
    mask = np.zeros((h, w), bool)
    mask[1:3, 1:3] = True
    mask[2:5, 5:9] = True
    mask[0, 4] = True  # touches the first blob only at a corner: a third tessera
    mask[1, 3] = True  # 4-connected to the first blob
    write_png(tmp_path / "m.png", w, h)
    export(tmp_path / "ds", images=tmp_path,
           export_json=write_export(tmp_path / "e.json", [task(5, "m.png", [annotation(1, [brush(mask, "b")])])]))
    ds = Dataset.open(tmp_path / "ds")
    inst = ds.instances(ds.samples[0])
    expected = np.zeros((h, w), np.int32)
    expected[1:3, 1:3] = 2
    expected[1, 3] = 2
    expected[0, 4] = 1
    expected[2:5, 5:9] = 3
    np.testing.assert_array_equal(inst, expected)
    assert ds.samples[0].tesserae == 3
    assert len(ds.points(ds.samples[0])) == 3


def test_polygon_in_percent_covers_pixels_whose_centre_is_inside(tmp_path):
    # 10 x 8 image; x 20..60 % -> 2..6 px: centres 2.5..5.5 -> columns 2..5;
    # y 10..50 % -> 0.8..4 px: centres 1.5..3.5 -> rows 1..3 (row 0's centre 0.5 is outside).
    w, h = 10, 8
    write_png(tmp_path / "p.png", w, h)
    square = polygon([[20, 10], [60, 10], [60, 50], [20, 50]], w, h, "p")
    export(tmp_path / "ds", images=tmp_path,
           export_json=write_export(tmp_path / "e.json", [task(6, "p.png", [annotation(1, [square])])]))
    ds = Dataset.open(tmp_path / "ds")
    expected = np.zeros((h, w), np.int32)
    expected[1:4, 2:6] = 1
    np.testing.assert_array_equal(ds.instances(ds.samples[0]), expected)


def test_polygon_triangle_hand_computed():
    # vertices (0,0), (4,0), (0,3.5) px on a 4 x 4 image; pixel (c, r) is in when
    # (c+0.5)/4 + (r+0.5)/3.5 < 1: row 0 -> c <= 2, row 1 -> c <= 1, row 2 -> c = 0, row 3 none.
    region = polygon([[0, 0], [100, 0], [0, 87.5]], 4, 4, "t")
    expected = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(rasterise_region(1, region, 4, 4), expected)


def test_keypoints_and_rectangles_are_prompts_not_tesserae(tmp_path):
    w, h = 6, 6
    mask = np.zeros((h, w), bool)
    mask[2:4, 2:4] = True
    write_png(tmp_path / "k.png", w, h)
    results = [keypoint(10, 10, w, h, "k1"), rectangle(w, h, "r1"), brush(mask, "b1"),
               keypoint(90, 90, w, h, "k2")]
    export(tmp_path / "ds", images=tmp_path,
           export_json=write_export(tmp_path / "e.json", [task(1, "k.png", [annotation(1, results)])]))
    ds = Dataset.open(tmp_path / "ds")
    np.testing.assert_array_equal(ds.instances(ds.samples[0]), mask.astype(np.int32))


def test_label_filter_keeps_only_the_given_labels(tmp_path):
    w, h = 8, 4
    a = np.zeros((h, w), bool)
    a[1:3, 0:2] = True
    b = np.zeros((h, w), bool)
    b[1:3, 5:8] = True
    write_png(tmp_path / "l.png", w, h)
    e = write_export(tmp_path / "e.json", [task(1, "l.png", [annotation(1, [
        brush(a, "a", label="Tessera"), brush(b, "b", label="Grout")])])])
    export(tmp_path / "ds", export_json=e, images=tmp_path, labels=["Tessera"])
    ds = Dataset.open(tmp_path / "ds")
    np.testing.assert_array_equal(ds.instances(ds.samples[0]), a.astype(np.int32))
    summary = export(tmp_path / "none", export_json=e, images=tmp_path, labels=["Crack"])
    assert [(s.task, s.reason) for s in summary.skipped] == [(1, "no tessera regions labelled Crack")]


def test_overlapping_regions_first_region_keeps_the_pixels(tmp_path):
    w, h = 9, 3
    first = np.zeros((h, w), bool)
    first[:, 3:6] = True
    second = np.zeros((h, w), bool)
    second[1, :] = True  # crosses the first: its free pixels fall into two pieces
    write_png(tmp_path / "o.png", w, h)
    export(tmp_path / "ds", images=tmp_path, export_json=write_export(
        tmp_path / "e.json", [task(1, "o.png", [annotation(1, [brush(first, "f"), brush(second, "s")])])]))
    ds = Dataset.open(tmp_path / "ds")
    inst = ds.instances(ds.samples[0])
    expected = np.zeros((h, w), np.int32)
    expected[:, 3:6] = 1
    expected[1, 0:3] = 2
    expected[1, 6:9] = 3
    np.testing.assert_array_equal(inst, expected)


# --------------------------------------------------------------------------------------------
# Finding images
# --------------------------------------------------------------------------------------------
def test_images_found_by_name_with_or_without_upload_prefix(tmp_path):
    write_png(tmp_path / "foo.png", 2, 2)
    write_png(tmp_path / "bar baz.png", 2, 2)
    write_png(tmp_path / "3f2a9c1d-qux.png", 2, 2)
    write_png(tmp_path / "qux.png", 2, 2)
    resolve = folder_resolver(tmp_path)
    assert resolve(1, "/data/upload/3/3f2a9c1d-foo.png") == tmp_path / "foo.png"
    assert resolve(1, "/data/local-files/?d=mosaics/bar%20baz.png") == tmp_path / "bar baz.png"
    assert resolve(1, "/data/upload/3/bar%20baz.png") == tmp_path / "bar baz.png"
    assert resolve(1, "s3://bucket/dir/foo.png") == tmp_path / "foo.png"
    # the exact name wins over the name without prefix
    assert resolve(1, "/data/upload/3/3f2a9c1d-qux.png") == tmp_path / "3f2a9c1d-qux.png"
    with pytest.raises(MosaicError, match=r"task 12: image 'ab12cd34-none.png' or 'none.png' not found"):
        resolve(12, "/data/upload/3/ab12cd34-none.png")


# --------------------------------------------------------------------------------------------
# Bad input: clear error naming the task, no output left behind
# --------------------------------------------------------------------------------------------
def _bad_export(tmp_path: Path, results: list[dict], image: str = "i.png") -> Path:
    return write_export(tmp_path / "e.json", [
        task(1, "i.png", [annotation(1, [brush(np.ones((6, 6), bool), "ok")])]),
        task(7, image, [annotation(70, results)]),
    ])


def _assert_fails_cleanly(tmp_path: Path, export_json: Path, *patterns: str) -> None:
    out = tmp_path / "out"
    result = run_cli(export_json, "--images", tmp_path, "--out", out)
    assert result.exit_code == 1, result.output
    for pattern in patterns:
        assert pattern in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_wrong_rle_length_is_an_error_naming_the_task(tmp_path):
    write_png(tmp_path / "i.png", 6, 6)
    region = brush(np.ones((5, 6), bool), "bad-rle")  # 5 x 6 mask ...
    region["original_height"] = 6  # ... claiming to be drawn on the 6 x 6 image
    _assert_fails_cleanly(tmp_path, _bad_export(tmp_path, [region]),
                          "task 7: region bad-rle", "120 values, expected 144")


def test_missing_image_is_an_error_naming_the_task(tmp_path):
    write_png(tmp_path / "i.png", 6, 6)
    e = _bad_export(tmp_path, [brush(np.ones((6, 6), bool), "b")], image="/data/upload/3/gone.png")
    _assert_fails_cleanly(tmp_path, e, "task 7: image 'gone.png' not found")


def test_polygon_outside_the_image_is_an_error(tmp_path):
    write_png(tmp_path / "i.png", 6, 6)
    poly = polygon([[10, 10], [120, 10], [50, 60]], 6, 6, "far")
    _assert_fails_cleanly(tmp_path, _bad_export(tmp_path, [poly]),
                          "task 7: region far", "(120%, 10%) lies outside the image")


def test_unreadable_image_is_an_error_naming_the_task(tmp_path):
    write_png(tmp_path / "i.png", 6, 6)
    (tmp_path / "junk.png").write_bytes(b"this is not a png at all" * 10)
    e = _bad_export(tmp_path, [brush(np.ones((6, 6), bool), "b")], image="junk.png")
    _assert_fails_cleanly(tmp_path, e, "task 7:", "junk.png: cannot read image")


def test_image_of_another_size_is_an_error_naming_the_task(tmp_path):
    write_png(tmp_path / "i.png", 6, 6)
    write_png(tmp_path / "small.png", 5, 6)
    e = _bad_export(tmp_path, [brush(np.ones((6, 6), bool), "b")], image="small.png")
    _assert_fails_cleanly(tmp_path, e, "task 7: region b was drawn on a 6x6 image but small.png is 5x6")


def test_not_an_export_is_a_clear_error(tmp_path):
    e = tmp_path / "min.json"
    e.write_text(json.dumps([{"image": "a.png", "tag": []}]))  # JSON_MIN-like
    result = run_cli(e, "--images", tmp_path, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "not a Label Studio JSON export" in result.output


# --------------------------------------------------------------------------------------------
# Round trip: instance map -> SDK RLE export -> export -> the same instances (and COCO)
# --------------------------------------------------------------------------------------------
def _round_trip_export(tmp_path: Path) -> tuple[list[np.ndarray], Path]:
    maps = [synthetic_instances(24, 32, seed) for seed in (1, 2)]
    images = tmp_path / "images"
    images.mkdir()
    tasks = []
    for i, inst in enumerate(maps):
        name = f"mosaic{i}.png"
        write_png(images / name, inst.shape[1], inst.shape[0], seed=i)
        results = [brush(inst == k, f"t{k}") for k in range(1, int(inst.max()) + 1)]
        results.insert(3, keypoint(50, 50, inst.shape[1], inst.shape[0], "prompt"))
        tasks.append(task(100 + i, f"/data/upload/3/0a1b2c3d-{name}", [annotation(i, results)]))
    return maps, write_export(tmp_path / "export.json", tasks)


def test_round_trip_through_the_sdk_rle_encoder_gives_identical_masks(tmp_path):
    maps, export_json = _round_trip_export(tmp_path)
    out = tmp_path / "ds"
    result = run_cli(export_json, "--images", tmp_path / "images", "--out", out)
    assert result.exit_code == 0, result.output
    assert "exported mosaics: 2 (from 2 tasks)" in result.output
    assert f"tesserae: {sum(int(m.max()) for m in maps)}" in result.output
    ds = Dataset.open(out)
    assert [s.stem for s in ds.samples] == ["task100_mosaic0", "task101_mosaic1"]
    for i, (sample, inst) in enumerate(zip(ds.samples, maps)):
        np.testing.assert_array_equal(ds.instances(sample), relabel_sequential(inst))
        np.testing.assert_array_equal(ds.mask(sample) == 0, inst > 0)
        assert sample.tesserae == int(inst.max()) > 5
        assert ds.image_path(sample).read_bytes() == (tmp_path / "images" / f"mosaic{i}.png").read_bytes()


def test_coco_file_decodes_to_the_same_tesserae(tmp_path):
    maps, export_json = _round_trip_export(tmp_path)
    out = tmp_path / "ds"
    coco_path = out / "coco.json"  # inside OUT: must survive the atomic move of OUT
    result = run_cli(export_json, "--images", tmp_path / "images", "--out", out, "--coco", coco_path)
    assert result.exit_code == 0, result.output
    coco = json.loads(coco_path.read_text())
    assert coco["categories"] == [{"id": 1, "name": "tessera", "supercategory": "mosaic"}]
    ds = Dataset.open(out)
    assert [im["file_name"] for im in coco["images"]] == [s.image for s in ds.samples]
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for image, inst in zip(coco["images"], maps):
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        decoded = np.zeros(inst.shape, np.int32)
        for k, ann in enumerate(anns, start=1):
            m = coco_mask.decode(ann["segmentation"]).astype(bool)
            assert ann["iscrowd"] == 0 and ann["category_id"] == 1
            assert ann["area"] == m.sum()
            rows, cols = ndi.find_objects(m.astype(int))[0]
            assert ann["bbox"] == [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start]
            assert not (decoded[m]).any()
            decoded[m] = k
        np.testing.assert_array_equal(decoded, relabel_sequential(inst))


def test_existing_output_needs_overwrite(tmp_path):
    maps, export_json = _round_trip_export(tmp_path)
    out = tmp_path / "ds"
    assert run_cli(export_json, "--images", tmp_path / "images", "--out", out).exit_code == 0
    again = run_cli(export_json, "--images", tmp_path / "images", "--out", out)
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert run_cli(export_json, "--images", tmp_path / "images", "--out", out, "--overwrite").exit_code == 0


def test_cli_needs_a_source(tmp_path):
    result = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "o")], env={"LABEL_STUDIO_URL": None})
    assert result.exit_code == 2
    assert "EXPORT_JSON" in result.output
