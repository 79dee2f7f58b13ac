"""`mosaic-toolkit augment`: crops, transforms, cut tesserae, resizing and per-mosaic splits."""
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mosaic_toolkit.data.augment import (
    TRANSFORMS,
    assign_splits,
    augment_dataset,
    crop_instances,
    mosaic_id,
    parse_split,
    plan_crops,
    resize_to_max_side,
)
from mosaic_toolkit.cli import main
from mosaic_toolkit.core.dataset import (
    Dataset,
    Sample,
    label_components,
    write_manifest,
    write_sample,
)
from mosaic_toolkit.core.io import read_image, read_instances, read_mask
from mosaic_toolkit.core.errors import MosaicError

RED = (220, 30, 30)


def grid_instances(width: int, height: int, pitch: int = 10, tile: int = 8) -> np.ndarray:
    """Square tesserae of ``tile`` px on a ``pitch`` grid, starting 1 px in (grout around)."""
    inst = np.zeros((height, width), np.int32)
    n = 0
    for y in range(1, height - tile + 1, pitch):
        for x in range(1, width - tile + 1, pitch):
            n += 1
            inst[y:y + tile, x:x + tile] = n
    return inst


def colour_image(instances: np.ndarray) -> np.ndarray:
    """Grey grout, a different colour per tessera."""
    ids = instances.astype(np.int64)
    image = np.full(instances.shape + (3,), 128, np.uint8)
    fg = ids > 0
    for c, mult in enumerate((37, 91, 53)):
        image[..., c][fg] = (ids[fg] * mult) % 200 + 40
    return image


def make_dataset(root: Path, parents, width: int = 120, height: int = 80, pitch: int = 10,
                 tile: int = 8, splits=None) -> Path:
    """A dataset of grid mosaics; ``parents`` is a list of (stem, source dict)."""
    inst = grid_instances(width, height, pitch, tile)
    samples = []
    for i, (stem, source) in enumerate(parents):
        split = splits[i] if splits else None
        samples.append(write_sample(root, stem, colour_image(inst), inst, source=source,
                                    split=split))
    write_manifest(root, samples)
    return root


def read_manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


# --------------------------------------------------------------------------------------------
# Crops
# --------------------------------------------------------------------------------------------
def test_crop_plan_for_known_density():
    # 120x80 with 96 tesserae: 100 px per tessera, so 16 tesserae need 1600 px = 40x40 crops.
    boxes = plan_crops(120, 80, 96, 16)
    assert len(boxes) == 6
    assert all((x1 - x0, y1 - y0) == (40, 40) for x0, y0, x1, y1 in boxes)
    covered = np.zeros((80, 120), int)
    for x0, y0, x1, y1 in boxes:
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()  # a partition: no gap, no overlap
    inst = grid_instances(120, 80)
    areas = np.bincount(inst.ravel())
    counts = [len(np.unique(crop_instances(inst, b, 0.5, areas))) - 1 for b in boxes]
    assert counts == [16] * 6


def test_crop_plan_whole_image_and_uneven_sizes():
    assert plan_crops(120, 80, 96, 100) == [(0, 0, 120, 80)]
    assert plan_crops(120, 80, 96, 64) == [(0, 0, 120, 80)]  # 96 <= 1.5 * 64
    assert len(plan_crops(120, 80, 96, 63)) > 1
    # Elongated: 1000x100 px, 1000 tesserae, 100 per crop -> ten 100x100 crops, not strips.
    strip = plan_crops(1000, 100, 1000, 100)
    assert strip == [(100 * i, 0, 100 * i + 100, 100) for i in range(10)]
    # A size that does not divide evenly: evenly spaced crops, sizes differ by at most 1 px,
    # the last one flush with the border.
    boxes = plan_crops(131, 83, 100, 10)
    widths = {x1 - x0 for x0, _, x1, _ in boxes}
    heights = {y1 - y0 for _, y0, _, y1 in boxes}
    assert max(widths) - min(widths) <= 1 and max(heights) - min(heights) <= 1
    assert max(x1 for *_, x1, _ in boxes) == 131 and max(b[3] for b in boxes) == 83
    assert 6 <= len(boxes) <= 14  # about 100 / 10 crops


def test_min_visible_drops_tessera_cut_to_30_percent_keeps_70():
    inst = np.zeros((20, 80), np.int32)
    inst[5:15, 37:47] = 1  # 10 px wide, cut at x=40: 3 columns left, 7 right
    inst[5:15, 10:20] = 2  # wholly inside the left crop
    left = crop_instances(inst, (0, 0, 40, 20), 0.5)
    right = crop_instances(inst, (40, 0, 80, 20), 0.5)
    assert set(np.unique(left)) == {0, 2}  # the 30 % piece is gone
    assert set(np.unique(right)) == {0, 1}
    assert np.count_nonzero(right == 1) == 70  # the 70 % piece is kept whole
    assert set(np.unique(crop_instances(inst, (40, 0, 80, 20), 0.8))) == {0}


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------
# An L-shaped marker in the top-left corner of a 30x40 (rows x cols) image: a vertical arm
# 10 rows x 3 cols and a horizontal arm 3 rows x 6 cols. Where it must end up, worked out by hand
# (rot90 counter-clockwise: (r, c) -> (W-1-c, r); rot270 clockwise: (r, c) -> (c, H-1-r)).
MARKER_EXPECTED = {
    "identity": ((30, 40), [(slice(0, 10), slice(0, 3)), (slice(0, 3), slice(0, 6))]),
    "rot90": ((40, 30), [(slice(37, 40), slice(0, 10)), (slice(34, 40), slice(0, 3))]),
    "rot180": ((30, 40), [(slice(20, 30), slice(37, 40)), (slice(27, 30), slice(34, 40))]),
    "rot270": ((40, 30), [(slice(0, 3), slice(20, 30)), (slice(0, 6), slice(27, 30))]),
    "hflip": ((30, 40), [(slice(0, 10), slice(37, 40)), (slice(0, 3), slice(34, 40))]),
    "vflip": ((30, 40), [(slice(20, 30), slice(0, 3)), (slice(27, 30), slice(0, 6))]),
}


def test_each_transform_moves_marker_to_expected_place(tmp_path):
    inst = np.zeros((30, 40), np.int32)
    inst[0:10, 0:3] = 1
    inst[0:3, 0:6] = 1
    inst[14:18, 20:24] = 2  # an ordinary square tessera
    image = np.full((30, 40, 3), 128, np.uint8)
    image[inst == 1] = RED
    image[inst == 2] = (30, 30, 220)
    src = tmp_path / "src"
    write_manifest(src, [write_sample(src, "m", image, inst)])
    augment_dataset(src, tmp_path / "out", split=(1.0, 0.0, 0.0))  # one mosaic, kept whole
    for name, (shape, arms) in MARKER_EXPECTED.items():
        expected = np.zeros(shape, bool)
        for arm in arms:
            expected[arm] = True
        out_image = read_image(tmp_path / "out" / "images" / f"m_c000_{name}.png")
        out_inst = read_instances(tmp_path / "out" / "instances" / f"m_c000_{name}.png")
        out_mask = read_mask(tmp_path / "out" / "masks" / f"m_c000_{name}.png")
        assert out_image.shape[:2] == shape and out_inst.shape == shape, name
        is_red = (out_image == RED).all(axis=2)
        assert np.array_equal(is_red, expected), name
        marker_id = out_inst[expected][0]
        assert marker_id > 0 and np.array_equal(out_inst == marker_id, expected), name
        assert len(np.unique(out_inst)) == 3, name  # background + 2 tesserae
        assert np.array_equal(out_mask == 0, out_inst > 0), name


def test_transforms_are_exact_array_operations():
    a = np.arange(6).reshape(2, 3)
    assert TRANSFORMS["rot90"](a).tolist() == [[2, 5], [1, 4], [0, 3]]  # counter-clockwise
    assert TRANSFORMS["rot270"](a).tolist() == [[3, 0], [4, 1], [5, 2]]  # clockwise
    assert TRANSFORMS["hflip"](a).tolist() == [[2, 1, 0], [5, 4, 3]]
    assert TRANSFORMS["vflip"](a).tolist() == [[3, 4, 5], [0, 1, 2]]


def test_points_are_recomputed_inside_their_tiles(tmp_path):
    src = make_dataset(tmp_path / "src", [("a", {})])
    augment_dataset(src, tmp_path / "out", tesserae_per_crop=16, split=(1.0, 0.0, 0.0))
    out = Dataset.open(tmp_path / "out")
    assert len(out) == 6 * 6  # six 40x40 crops x six transforms
    for sample in out.samples:
        inst = out.instances(sample)
        points = out.points(sample)
        assert len(points) == sample.tesserae == inst.max() == 16
        for i, (x, y) in enumerate(points, start=1):
            assert inst[y, x] == i, sample.stem


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------
def test_resize_keeps_longest_side_within_max(tmp_path):
    src = make_dataset(tmp_path / "src", [("big", {})], width=300, height=200, pitch=30, tile=24)
    augment_dataset(src, tmp_path / "out", max_side=64, split=(1.0, 0.0, 0.0))
    manifest = read_manifest(tmp_path / "out")
    sizes = {s["source"]["transform"]: (s["width"], s["height"]) for s in manifest["samples"]}
    assert sizes["identity"] == (64, 43) and sizes["rot90"] == (43, 64)
    assert all(max(w, h) <= 64 for w, h in sizes.values())
    assert manifest["samples"][0]["source"]["scale"] == pytest.approx(64 / 300, abs=1e-6)
    out = Dataset.open(tmp_path / "out")
    for sample in out.samples:
        assert 0 < sample.tesserae <= 60  # 10 x 6 tesserae at most
        assert out.image(sample).shape[:2] == out.instances(sample).shape


def test_resize_gives_every_id_one_connected_region():
    inst = np.zeros((200, 300), np.int32)
    inst[20:120, 20:120] = 1
    inst[150, :] = 2  # a 1 px line: vanishes or survives, but never as a broken id
    inst[160:200:2, 200:300] = 3  # comb teeth: one id in many pieces after shrinking
    inst[160:200, 200] = 3
    image = np.zeros((200, 300, 3), np.uint8)
    small_image, small, scale = resize_to_max_side(image, inst, 50)
    assert small.shape == (33, 50) and small_image.shape == (33, 50, 3)
    assert scale == pytest.approx(50 / 300)
    n = int(small.max())
    assert set(np.unique(small)) == set(range(n + 1))
    for i in range(1, n + 1):
        assert label_components(small == i)[1] == 1


# --------------------------------------------------------------------------------------------
# Determinism and splits
# --------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_output(tmp_path):
    src = make_dataset(tmp_path / "src", [(f"p{i}", {"mosaic": f"m{i}"}) for i in range(6)])
    for name in ("a", "b"):
        augment_dataset(src, tmp_path / name, transforms=["identity", "rot90"], seed=3)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                     if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
                     if p.is_file())
    assert files_a == files_b and len(files_a) == 6 * 2 * 4 + 1
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_splits_are_per_mosaic_and_near_the_fractions(tmp_path):
    src = make_dataset(tmp_path / "src", [(f"p{i}", {"mosaic": f"m{i}"}) for i in range(10)])
    augment_dataset(src, tmp_path / "out", tesserae_per_crop=16, transforms=["identity"],
                    seed=11)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["augment"]["split"] == [0.68, 0.17, 0.15]
    splits_of = defaultdict(set)
    for s in manifest["samples"]:
        splits_of[s["source"]["mosaic"]].add(s["split"])
    assert len(splits_of) == 10
    assert all(len(v) == 1 for v in splits_of.values())  # no mosaic in two splits
    n = len(manifest["samples"])
    assert n == 60  # 10 parents x 6 crops
    for name, target in zip(("train", "val", "test"), (0.68, 0.17, 0.15)):
        share = sum(s["split"] == name for s in manifest["samples"]) / n
        assert abs(share - target) <= 0.1, (name, share)


def test_parents_of_one_mosaic_share_a_split(tmp_path):
    parents = [("left", {"mosaic": "villa"}), ("right", {"mosaic": "villa"})]
    parents += [(f"p{i}", {"mosaic": f"m{i}"}) for i in range(6)]
    src = make_dataset(tmp_path / "src", parents)
    for seed in range(4):
        out = tmp_path / f"out{seed}"
        augment_dataset(src, out, transforms=["identity", "hflip"], seed=seed)
        samples = read_manifest(out)["samples"]
        villa = {s["split"] for s in samples if s["source"]["parent"] in ("left", "right")}
        assert len(villa) == 1
        assert {s["source"]["mosaic"] for s in samples if s["source"]["parent"] == "left"} == {
            "villa"}


def test_assign_splits_fills_every_split_and_is_seeded():
    weights = {f"m{i}": w for i, w in enumerate([5, 9, 2, 7, 3, 8, 1, 6, 4, 10, 3, 5])}
    total = sum(weights.values())
    for seed in range(10):
        result = assign_splits(weights, (0.68, 0.17, 0.15), seed)
        assert result == assign_splits(weights, (0.68, 0.17, 0.15), seed)
        assert set(result.values()) == {"train", "val", "test"}
        for name, target in zip(("train", "val", "test"), (0.68, 0.17, 0.15)):
            share = sum(w for m, w in weights.items() if result[m] == name) / total
            assert abs(share - target) <= 0.1
    # Fewer mosaics than splits: train first, then val.
    assert sorted(assign_splits({"a": 3, "b": 3}, (0.68, 0.17, 0.15), 0).values()) == [
        "train", "val"]
    assert assign_splits({"a": 1}, (0.68, 0.17, 0.15), 5) == {"a": "train"}
    # A zero fraction is never used.
    assert "test" not in assign_splits(weights, (0.8, 0.2, 0.0), 0).values()


def test_mosaic_id_falls_back_to_task_then_stem():
    assert mosaic_id(Sample("s", "images/s.png", 1, 1, 1, source={"mosaic": "x", "task": 4})) == "x"
    assert mosaic_id(Sample("s", "images/s.png", 1, 1, 1, source={"task": 4})) == "task:4"
    assert mosaic_id(Sample("s", "images/s.png", 1, 1, 1)) == "s"


@pytest.mark.parametrize("text, message", [
    ("0.5,0.5", "three fractions"),
    ("0.7,0.2,0.2", "sum to 1"),
    ("-0.2,0.6,0.6", "non-negative"),
    ("a,b,c", "not a comma-separated"),
])
def test_bad_split_is_a_clear_error(tmp_path, text, message):
    with pytest.raises(MosaicError, match=message):
        parse_split(text)
    src = make_dataset(tmp_path / "src", [("a", {})])
    result = CliRunner().invoke(main, ["augment", str(src), "--out", str(tmp_path / "out"),
                                       "--split", text])
    assert result.exit_code != 0
    assert "--split" in result.output and message in result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def test_cli_summary_says_one_mosaic_in_the_singular(tmp_path):
    """One image of one mosaic, one crop: no "1 mosaics" in the summary."""
    src = make_dataset(tmp_path / "src", [("p0", {"task": 0, "url": "u0"})])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["augment", str(src), "--out", str(out), "--tesserae-per-crop",
                                       "1000", "--transforms", "identity", "--split", "1,0,0"])
    assert result.exit_code == 0, result.output
    assert "1 image from 1 mosaic -> 1 crop -> 1 sample in" in result.output
    assert "train 1 (1 mosaic)" in result.output and "val 0 (0 mosaics)" in result.output
    assert "1 mosaics" not in result.output and "1 samples" not in result.output


def test_cli_writes_dataset_and_summary(tmp_path):
    src = make_dataset(tmp_path / "src", [(f"p{i}", {"task": i, "url": f"u{i}"})
                                          for i in range(3)])
    out = tmp_path / "out"
    args = ["augment", str(src), "--out", str(out), "--tesserae-per-crop", "16",
            "--transforms", "identity,vflip", "--seed", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "3 images from 3 mosaics -> 18 crops -> 36 samples" in result.output
    assert "train" in result.output and "test" in result.output
    assert "mosaics)" in result.output or "mosaic)" in result.output
    manifest = read_manifest(out)
    assert manifest["augment"] == {
        "seed": 2, "tesserae_per_crop": 16, "min_visible": 0.5, "max_side": 1024,
        "transforms": ["identity", "vflip"], "split": [0.68, 0.17, 0.15], "keep_splits": False,
    }
    first = manifest["samples"][0]
    assert first["stem"] == "p0_c000_identity"
    assert first["source"] == {"task": 0, "url": "u0", "mosaic": "task:0", "parent": "p0",
                               "crop": [0, 0, 40, 40], "transform": "identity", "scale": 1.0}
    assert {s["split"] for s in manifest["samples"]} == {"train", "val", "test"}

    again = CliRunner().invoke(main, args)  # the folder exists now
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert CliRunner().invoke(main, args + ["--overwrite"]).exit_code == 0


def test_cli_keep_splits(tmp_path):
    src = make_dataset(tmp_path / "src", [("a", {}), ("b", {})], splits=["val", "test"])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["augment", str(src), "--out", str(out), "--keep-splits"])
    assert result.exit_code == 0, result.output
    splits = {s["stem"]: s["split"] for s in read_manifest(out)["samples"]}
    assert len(splits) == 12
    assert all(split == ("val" if stem.startswith("a_") else "test")
               for stem, split in splits.items())

    bare = make_dataset(tmp_path / "bare", [("a", {})])
    result = CliRunner().invoke(main, ["augment", str(bare), "--out", str(tmp_path / "o2"),
                                       "--keep-splits"])
    assert result.exit_code == 1 and "needs a train/val/test split" in result.output


def test_cli_rejects_unknown_transform_and_missing_dataset(tmp_path):
    src = make_dataset(tmp_path / "src", [("a", {})])
    result = CliRunner().invoke(main, ["augment", str(src), "--out", str(tmp_path / "o"),
                                       "--transforms", "identity,rot45"])
    assert result.exit_code == 1 and "unknown rot45" in result.output
    result = CliRunner().invoke(main, ["augment", str(tmp_path / "nope"), "--out",
                                       str(tmp_path / "o")])
    assert result.exit_code == 1 and "not found" in result.output


# --------------------------------------------------------------------------------------------
# One mosaic: a spatial split
# --------------------------------------------------------------------------------------------
def test_one_mosaic_is_split_spatially_with_a_gap(tmp_path):
    """One mosaic gives train, val and test bands; no tessera of the parent touches two of them."""
    src = make_dataset(tmp_path / "src", [("only", {"mosaic": "villa"})], width=300, height=80)
    parent = read_instances(src / "instances" / "only.png")
    summary = augment_dataset(src, tmp_path / "out", tesserae_per_crop=16, transforms=["identity", "rot90"])
    assert all(summary.per_split[name] > 0 for name in ("train", "val", "test")), summary.per_split
    (cut,) = summary.spatial
    assert cut.axis == "x" and cut.gap == 8  # the tesserae are 8 px wide
    assert "one mosaic: split spatially into train/val/test bands" in summary.spatial_note()
    manifest = read_manifest(tmp_path / "out")
    assert manifest["augment"]["spatial_split"] == [cut.to_json()]
    touched: dict[str, set[int]] = defaultdict(set)
    for s in manifest["samples"]:
        x0, y0, x1, y1 = s["source"]["crop"]
        band = cut.parts[s["split"]]
        assert band[0] <= x0 < x1 <= band[2], (s["stem"], band)  # every crop inside its band
        touched[s["split"]] |= set(np.unique(parent[y0:y1, x0:x1]).tolist()) - {0}
    assert not touched["train"] & touched["val"] and not touched["val"] & touched["test"]
    assert not touched["train"] & touched["test"]
    # bands are apart by the gap and share the length roughly as the fractions
    (t0, _, t1, _), (v0, _, v1, _), (s0, _, s1, _) = (cut.parts[n] for n in ("train", "val", "test"))
    assert t0 == 0 and v0 == t1 + 8 and s0 == v1 + 8 and s1 == 300
    assert abs((t1 - t0) / 284 - 0.68) < 0.02 and abs((v1 - v0) / 284 - 0.17) < 0.02


def test_spatial_gap_is_the_largest_tessera_and_tall_images_cut_across_the_height():
    from mosaic_toolkit.data.augment import spatial_parts

    inst = grid_instances(80, 300)
    inst[100:140, 20:28] = inst.max() + 1  # one tessera 40 px tall
    cut = spatial_parts(inst, (0.8, 0.2, 0.0))
    assert cut.axis == "y" and cut.gap == 40 and list(cut.parts) == ["train", "val"]
    (_, t0, _, t1), (_, v0, _, v1) = cut.parts["train"], cut.parts["val"]
    assert t0 == 0 and v0 == t1 + 40 and v1 == 300
    with pytest.raises(MosaicError, match="too small to split"):
        spatial_parts(grid_instances(40, 20, pitch=10, tile=8), (0.68, 0.17, 0.15), "tiny")


def test_several_mosaics_or_keep_splits_are_not_split_spatially(tmp_path):
    src = make_dataset(tmp_path / "src", [("a", {"mosaic": "m1"}), ("b", {"mosaic": "m2"})])
    summary = augment_dataset(src, tmp_path / "out", transforms=["identity"])
    assert summary.spatial == [] and summary.spatial_note() is None
    assert "spatial_split" not in read_manifest(tmp_path / "out")["augment"]
    one = make_dataset(tmp_path / "one", [("a", {})])
    summary = augment_dataset(one, tmp_path / "out2", transforms=["identity"], split=(1.0, 0.0, 0.0))
    assert summary.spatial == [] and summary.per_split == {"train": 1, "val": 0, "test": 0}


def test_cli_one_mosaic_says_how_it_was_split(tmp_path):
    src = make_dataset(tmp_path / "src", [("only", {})], width=300, height=80)
    result = CliRunner().invoke(main, ["augment", str(src), "--out", str(tmp_path / "out"),
                                       "--tesserae-per-crop", "16", "--split", "0.8,0.2,0"])
    assert result.exit_code == 0, result.output
    assert "val 0" not in result.output
    assert "one mosaic: split spatially into train/val bands across its width, 8 px apart" in result.output
    splits = {s["split"] for s in read_manifest(tmp_path / "out")["samples"]}
    assert splits == {"train", "val"}
