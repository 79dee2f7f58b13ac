"""The dataset contract: pure helpers and the on-disk layout."""
import json

import numpy as np
import pytest

from mosaic_toolkit.core import dataset as ds
from mosaic_toolkit.core import io
from mosaic_toolkit.core.errors import MosaicError


def test_mask_and_instances_round_trip():
    inst = np.zeros((5, 6), np.int32)
    inst[0:2, 0:2] = 1
    inst[3:5, 3:6] = 2
    mask = ds.instances_to_mask(inst)
    assert mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    assert (mask[0:2, 0:2] == 0).all() and mask[2, 2] == 255
    assert np.array_equal(ds.mask_to_instances(mask) > 0, inst > 0)


def test_mask_foreground_never_wraps_uint8():
    mask = np.array([[0, 255, 127, 128]], np.uint8)
    assert ds.mask_foreground(mask).tolist() == [[True, False, True, False]]


def test_components_are_four_connected():
    fg = np.array([[1, 0], [0, 1]], bool)  # touching only at a corner: two tiles
    labels, n = ds.label_components(fg)
    assert n == 2 and labels[0, 0] != labels[1, 1]


def test_relabel_sequential_raster_order():
    inst = np.array([[0, 7, 7], [3, 0, 9]], np.int32)
    assert ds.relabel_sequential(inst).tolist() == [[0, 1, 1], [2, 0, 3]]


def test_split_disconnected_gives_each_piece_an_id():
    inst = np.array([[5, 0, 5], [5, 0, 5]], np.int32)
    out = ds.split_disconnected(inst)
    assert out.tolist() == [[1, 0, 2], [1, 0, 2]]


def test_points_centroid_when_inside():
    inst = np.zeros((9, 9), np.int32)
    inst[2:7, 1:4] = 1  # 5 rows x 3 cols: centroid row 4, col 2
    assert ds.tessera_points(inst) == [[2, 4]]


def test_points_fall_back_to_distance_maximum_for_concave_tile():
    # A "C" shape whose centroid lies in the hollow: the point must be inside the tile,
    # at the pixel farthest from its border (the thick back of the C).
    inst = np.zeros((11, 25), np.int32)
    inst[0:11, 0:5] = 1  # thick back, 5 px wide
    inst[0:2, 5:25] = 1  # long thin top arm
    inst[9:11, 5:25] = 1  # long thin bottom arm
    rows, cols = np.nonzero(inst)
    centroid = (round(rows.mean()), round(cols.mean()))
    assert inst[centroid] == 0  # the centroid is outside, so the fallback is exercised
    (x, y), = ds.tessera_points(inst)
    assert inst[y, x] == 1
    assert x == 2  # middle column of the 5-px back is farthest from the border
    assert 2 <= y <= 8


def test_points_require_consecutive_ids():
    inst = np.zeros((3, 3), np.int32)
    inst[0, 0] = 2
    with pytest.raises(ValueError):
        ds.tessera_points(inst)


def test_write_sample_and_open(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    inst = np.zeros((20, 30), np.int32)
    inst[2:8, 2:8] = 40
    inst[10:18, 12:28] = 3
    sample = ds.write_sample(tmp_path, "a", image, inst, source={"task": 1}, split="train")
    ds.write_manifest(tmp_path, [sample])
    d = ds.Dataset.open(tmp_path)
    s = d.get("a")
    assert (s.width, s.height, s.tesserae, s.split) == (30, 20, 2, "train")
    assert np.array_equal(d.image(s), image)
    back = d.instances(s)
    assert back.max() == 2 and back[3, 3] == 1 and back[12, 20] == 2  # relabelled in raster order
    assert np.array_equal(d.mask(s) == 0, inst > 0)
    assert json.loads((tmp_path / "points" / "a.json").read_text()) == {"points": [[4, 4], [20, 14]]}
    assert d.points(s) == [[4, 4], [20, 14]]  # 4.5 rounds half to even


def test_instances_keep_sixteen_bits(tmp_path):
    inst = np.arange(1, 1001, dtype=np.int32).reshape(10, 100)  # ids above 255
    io.write_instances(tmp_path / "i.png", inst)
    assert np.array_equal(io.read_instances(tmp_path / "i.png"), inst)


def test_write_sample_copies_image_file_as_given(tmp_path):
    src = tmp_path / "src.jpg"
    io.write_image(src, np.full((4, 5, 3), 120, np.uint8))
    inst = np.ones((4, 5), np.int32)
    s = ds.write_sample(tmp_path / "d", "b", src, inst)
    assert s.image == "images/b.jpg"
    assert (tmp_path / "d" / s.image).read_bytes() == src.read_bytes()


def test_write_sample_rejects_size_mismatch(tmp_path):
    with pytest.raises(MosaicError, match="instance map"):
        ds.write_sample(tmp_path, "c", np.zeros((4, 4, 3), np.uint8), np.ones((5, 4), np.int32))


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(MosaicError, match="missing.png"):
        io.read_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(MosaicError, match="bad.png"):
        io.read_image(bad)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with io.atomic_output_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_and_overwrites(tmp_path):
    out = tmp_path / "out"
    with io.atomic_output_dir(out) as tmp:
        (tmp / "one.txt").write_text("1")
    with pytest.raises(MosaicError, match="--overwrite"):
        with io.atomic_output_dir(out):
            pass
    with io.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "two.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["two.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_open_without_manifest_scans_images(tmp_path):
    io.write_image(tmp_path / "images" / "x.png", np.zeros((3, 4, 3), np.uint8))
    io.write_mask(tmp_path / "masks" / "x.png", np.full((3, 4), 255, np.uint8))
    io.write_image(tmp_path / "images" / "nomask.png", np.zeros((3, 4, 3), np.uint8))
    d = ds.Dataset.open(tmp_path)
    assert [s.stem for s in d.samples] == ["x"]
    with pytest.raises(MosaicError, match="not found"):
        ds.Dataset.open(tmp_path / "nope")
