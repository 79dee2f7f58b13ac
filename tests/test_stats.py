"""Tessera statistics on hand-made shapes with known answers, and `mosaic-toolkit stats`."""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from mosaic_toolkit.cli.stats import command
from mosaic_toolkit.core.dataset import instances_to_mask
from mosaic_toolkit.core.io import read_instances, write_instances, write_mask
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.stats.report import find_mosaics, stats_report
from mosaic_toolkit.stats.measures import (
    Units,
    coherence,
    joints,
    lattice_points_in_polygon,
    measure_mosaic,
    measure_tesserae,
    summarise,
    tessera_table,
)
from mosaic_toolkit.data.synth import synth_dataset


# --------------------------------------------------------------------------------------------
# Hand-made shapes
# --------------------------------------------------------------------------------------------
def draw_rectangle(instances: np.ndarray, centre: tuple[float, float], length: float,
                   width: float, degrees: float, value: int) -> None:
    """Digitise a length x width rectangle whose long side is at ``degrees`` counter-clockwise
    from the x axis as seen on screen (image y points down, so the long side runs along
    (cos, -sin)): a pixel belongs to it when its centre lies inside."""
    u = np.array([math.cos(math.radians(degrees)), -math.sin(math.radians(degrees))])
    v = np.array([-u[1], u[0]])
    reach = int(math.ceil(math.hypot(length, width) / 2)) + 1
    cx, cy = centre
    h, w = instances.shape
    yy, xx = np.mgrid[max(0, int(cy) - reach):min(h, int(cy) + reach + 1),
                      max(0, int(cx) - reach):min(w, int(cx) + reach + 1)]
    along = (xx - cx) * u[0] + (yy - cy) * u[1]
    across = (xx - cx) * v[0] + (yy - cy) * v[1]
    inside = (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
    instances[yy[inside], xx[inside]] = value


def square_grid(grout: int, tile: int = 10, n: int = 3, margin: int = 0) -> np.ndarray:
    """n x n squares of ``tile`` px, ids 1..n² in raster order, ``grout`` px apart."""
    size = n * tile + (n - 1) * grout + 2 * margin
    instances = np.zeros((size, size), dtype=np.int32)
    for r in range(n):
        for c in range(n):
            y, x = margin + r * (tile + grout), margin + c * (tile + grout)
            instances[y:y + tile, x:x + tile] = r * n + c + 1
    return instances


def one(instances: np.ndarray, image: np.ndarray | None = None):
    """Measures of a map holding a single tessera."""
    t, _ = measure_tesserae(instances, image)
    assert len(t) == 1
    return t


def test_square_has_the_documented_measures():
    instances = np.zeros((30, 30), dtype=np.int32)
    instances[5:15, 8:18] = 7
    t = one(instances)
    assert t.ids.tolist() == [7]  # ids as in the instance map
    assert t.area[0] == 100
    assert t.equivalent_diameter[0] == pytest.approx(math.sqrt(400 / math.pi))
    assert t.elongation[0] == pytest.approx(1.0)
    assert t.solidity[0] == pytest.approx(1.0)
    # Documented: contour through boundary pixel centres, a k x k square measures 4 (k - 1).
    assert t.perimeter[0] == pytest.approx(36.0)
    assert t.centroid[0].tolist() == pytest.approx([12.5, 9.5])  # (x, y)


@pytest.mark.parametrize("vertical, expected", [(False, 0.0), (True, 90.0)])
def test_axis_aligned_rectangle(vertical, expected):
    instances = np.zeros((60, 60), dtype=np.int32)
    if vertical:
        instances[5:45, 20:30] = 1
    else:
        instances[20:30, 5:45] = 1
    t = one(instances)
    assert t.orientation[0] == pytest.approx(expected)
    assert t.elongation[0] == pytest.approx(4.0)
    assert t.perimeter[0] == pytest.approx(2 * 39 + 2 * 9)
    assert t.solidity[0] == pytest.approx(1.0)


@pytest.mark.parametrize("degrees", [30.0, 150.0, 75.0, 45.0])
def test_rotated_rectangle_orientation_and_elongation(degrees):
    instances = np.zeros((80, 80), dtype=np.int32)
    draw_rectangle(instances, (40.3, 39.8), 40, 10, degrees, 1)
    t = one(instances)
    assert abs(t.area[0] - 400) <= 10  # lattice points in a 400 px^2 rectangle
    # Screen convention: counter-clockwise from the x axis, although image y points down.
    assert abs(t.orientation[0] - degrees) < 1.0
    # Digitisation: the pixel staircase makes a rotated rectangle look up to ~8 % stubbier.
    assert 3.65 < t.elongation[0] < 4.05
    assert t.solidity[0] > 0.97  # a digital rectangle is convex


def test_rectangle_drawn_with_fillpoly():
    # cv2.fillPoly also fills the polygon's edge pixels: the 40 x 10 tile is drawn ~41 x 11.
    instances = np.zeros((80, 80), dtype=np.int32)
    u = np.array([math.cos(math.radians(30)), -math.sin(math.radians(30))])
    v = np.array([-u[1], u[0]])
    corners = [np.array([40, 40]) + a * 20 * u + b * 5 * v for a, b in
               ((1, 1), (-1, 1), (-1, -1), (1, -1))]
    cv2.fillPoly(instances, [np.round(corners).astype(np.int32)], 1)
    t = one(instances)
    assert abs(t.orientation[0] - 30) < 1.0
    assert 3.5 < t.elongation[0] < 3.9


def test_l_shape_solidity_and_perimeter_by_hand():
    # A 20 x 20 square (pixels x, y in 2..21) without its top-right 10 x 10 quarter.
    instances = np.zeros((24, 24), dtype=np.int32)
    instances[2:22, 2:12] = 1
    instances[12:22, 12:22] = 1
    t = one(instances)
    assert t.area[0] == 300
    # Convex hull of the pixel centres: the notch is cut by the diagonal from the top-right
    # pixel of the upper arm to the top-right pixel of the lower arm. In the notch's column
    # j = 1..10 (from the arm), the pixels on or below that diagonal are 10 - j: 45 in all.
    assert t.solidity[0] == pytest.approx(300 / (300 + 45))
    # Outer contour through pixel centres: 9 + 9 + sqrt(2) (inner corner) + 9 + 9 + 19 + 19.
    assert t.perimeter[0] == pytest.approx(74 + math.sqrt(2))


def test_lattice_points_by_picks_theorem():
    square = np.array([[0, 0], [9, 0], [9, 9], [0, 9]])
    assert lattice_points_in_polygon(square) == 100
    assert lattice_points_in_polygon(np.array([[0, 0], [4, 0], [0, 4]])) == 15  # 5+4+3+2+1
    assert lattice_points_in_polygon(np.array([[3, 3]])) == 1
    assert lattice_points_in_polygon(np.array([[0, 0], [6, 3]])) == 4  # (0,0) (2,1) (4,2) (6,3)


def test_one_pixel_and_one_line_tiles():
    instances = np.zeros((10, 20), dtype=np.int32)
    instances[2, 2] = 1
    instances[6, 3:15] = 2
    t, _ = measure_tesserae(instances)
    assert t.area.tolist() == [1, 12]
    assert t.elongation.tolist() == pytest.approx([1.0, 12.0])
    assert t.solidity.tolist() == pytest.approx([1.0, 1.0])
    assert t.perimeter.tolist() == pytest.approx([0.0, 22.0])  # there and back: 2 x 11
    assert t.orientation[1] == pytest.approx(0.0)


def test_mean_lab_of_pure_red():
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    image[...] = (0, 255, 0)  # background and the other tile are green
    image[2:8, 2:8] = (255, 0, 0)
    instances = np.zeros((20, 20), dtype=np.int32)
    instances[2:8, 2:8] = 1
    instances[12:18, 12:18] = 2
    t, _ = measure_tesserae(instances, image)
    assert t.lab[0] == pytest.approx([53.24, 80.09, 67.20], abs=0.02)
    assert t.lab[1][0] == pytest.approx(87.73, abs=0.02)  # pure green's L*


# --------------------------------------------------------------------------------------------
# Grout and neighbours
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grout", [1, 2, 3, 4])
def test_grid_neighbours_grout_width_and_fraction(grout):
    instances = square_grid(grout)
    stats = measure_mosaic(instances)
    # Edge neighbours count, diagonal ones (across a grout crossing) do not: centre 4.
    assert stats.tesserae.neighbours.tolist() == [2, 3, 2, 3, 4, 3, 2, 3, 2]
    assert stats.grout_width == pytest.approx(grout)
    side = 30 + 2 * grout
    assert stats.grout_fraction == pytest.approx((side * side - 900) / (side * side))


def test_touching_tiles_have_zero_grout_width():
    instances = square_grid(0)
    stats = measure_mosaic(instances)
    assert stats.grout_width == 0.0
    assert stats.grout_fraction == 0.0
    assert stats.tesserae.neighbours[4] == 4


def test_hole_of_a_missing_tessera_is_not_a_grout_joint():
    instances = square_grid(2)
    instances[instances == 5] = 0  # the centre tile is missing
    stats = measure_mosaic(instances)
    # Tiles facing each other across the 14-px hole are not neighbours, nor is it grout.
    assert stats.tesserae.neighbours.tolist() == [2, 2, 2, 2, 2, 2, 2, 2]
    assert stats.grout_width == pytest.approx(2.0)
    j = joints(instances)
    assert (~j.grout).sum() >= 2 and j.width[~j.grout].min() > 6


def test_single_tessera_and_empty_map():
    instances = np.zeros((20, 20), dtype=np.int32)
    empty = measure_mosaic(instances)
    assert len(empty.tesserae) == 0 and empty.grout_fraction == 1.0
    assert summarise(empty)["distributions"]["area_px"]["median"] is None
    instances[5:10, 5:10] = 1
    single = measure_mosaic(instances)
    assert single.tesserae.neighbours.tolist() == [0]
    assert math.isnan(single.grout_width)


def test_border_tesserae_are_counted_but_left_out_of_distributions():
    instances = np.zeros((40, 60), dtype=np.int32)
    instances[10:20, 10:20] = 1  # complete 10 x 10 squares
    instances[10:20, 25:35] = 2
    instances[25:35, 25:35] = 3
    instances[0:3, 40:50] = 4  # cut by the top edge: a 3 x 10 sliver, long axis along x
    instances[20:30, 57:60] = 5  # cut by the right edge
    stats = measure_mosaic(instances)
    assert stats.tesserae.border.tolist() == [False, False, False, True, True]
    assert tessera_table(stats)["touches_border"] == [0, 0, 0, 1, 1]
    summary = summarise(stats)
    assert summary["tesserae"] == 5 and summary["tesserae_complete"] == 3
    area = summary["distributions"]["area_px"]
    assert area["median"] == area["q25"] == area["q75"] == 100
    assert summary["distributions"]["elongation_ratio"]["median"] == pytest.approx(1.0)
    assert np.all(stats.weights[3:] == 0)  # slivers do not vote for the orientation field
    assert summary["orientation"]["voting_tesserae"] == 0


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------
def test_pixel_size_scales_areas_and_lengths_and_headers():
    instances = square_grid(2)
    px = measure_mosaic(instances)
    mm = measure_mosaic(instances, units=Units(0.5))
    px_table, mm_table = tessera_table(px), tessera_table(mm)
    assert "area_px" in px_table and "perimeter_px" in px_table
    assert "area_mm2" in mm_table and "perimeter_mm" in mm_table
    assert "equivalent_diameter_mm" in mm_table
    np.testing.assert_allclose(mm_table["area_mm2"], np.array(px_table["area_px"]) * 0.25)
    np.testing.assert_allclose(mm_table["perimeter_mm"], np.array(px_table["perimeter_px"]) * 0.5)
    np.testing.assert_allclose(mm_table["equivalent_diameter_mm"],
                               np.array(px_table["equivalent_diameter_px"]) * 0.5)
    for unitless in ("elongation_ratio", "solidity_ratio", "neighbours_count", "orientation_deg"):
        assert mm_table[unitless] == px_table[unitless]
    # Every header states its unit.
    for header in mm_table:
        assert header in ("id", "touches_border") or header.rsplit("_", 1)[1] in (
            "px", "mm", "mm2", "deg", "ratio", "count", "cielab")

    s_px, s_mm = summarise(px), summarise(mm)
    assert s_px["grout_width_px"] == pytest.approx(2.0)
    assert s_mm["grout_width_mm"] == pytest.approx(1.0)
    assert s_mm["distributions"]["area_mm2"]["median"] == pytest.approx(25.0)
    # 9 tiles on 34 x 34 px: per megapixel, or per cm^2 of 17 x 17 mm.
    assert s_px["density_per_megapixel"] == pytest.approx(9 / (34 * 34 / 1e6), rel=1e-4)
    assert s_mm["density_per_cm2"] == pytest.approx(9 / (17 * 17 / 100), rel=1e-4)
    assert "mm" in s_mm["units"]["note"] and "pixels" in s_px["units"]["note"]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_pixel_size(bad):
    with pytest.raises(MosaicError, match="pixel-size"):
        Units(bad)


# --------------------------------------------------------------------------------------------
# Orientation field
# --------------------------------------------------------------------------------------------
def test_coherence_of_axial_angles():
    assert coherence(np.array([10.0, 10.0, 10.0])) == pytest.approx(1.0)
    assert coherence(np.array([0.0, 179.999])) == pytest.approx(1.0, abs=1e-6)  # axial
    assert coherence(np.array([0.0, 90.0])) == pytest.approx(0.0, abs=1e-12)
    assert coherence(np.array([0.0, 45.0, 90.0, 135.0])) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(coherence(np.array([30.0]), np.array([0.0])))


def test_parallel_rows_are_fully_coherent():
    instances = np.zeros((200, 300), dtype=np.int32)
    k = 1
    for y in range(4, 196, 7):
        for x in range(2, 288, 14):
            instances[y:y + 4, x:x + 12] = k
            k += 1
    stats = measure_mosaic(instances)
    assert stats.coherence_global == pytest.approx(1.0)
    assert stats.coherence_local == pytest.approx(1.0)
    assert stats.dominant_orientation == pytest.approx(0.0)


@pytest.mark.parametrize("degrees", [30.0, 150.0])
def test_tilted_rows_dominant_orientation(degrees):
    instances = np.zeros((300, 300), dtype=np.int32)
    k = 1
    for y in range(20, 290, 14):
        for x in range(20, 290, 24):
            draw_rectangle(instances, (x, y), 16, 5, degrees, k)
            k += 1
    stats = measure_mosaic(instances)
    assert stats.coherence_global > 0.99
    assert abs(stats.dominant_orientation - degrees) < 1.5


def test_random_orientations_have_low_coherence():
    rng = np.random.default_rng(0)
    instances = np.zeros((400, 400), dtype=np.int32)
    k = 1
    for y in range(20, 390, 25):
        for x in range(20, 390, 25):
            draw_rectangle(instances, (x, y), 18, 6, rng.uniform(0, 180), k)
            k += 1
    stats = measure_mosaic(instances)
    assert stats.coherence_global < 0.2
    assert stats.coherence_local < 0.4


def test_squares_do_not_vote():
    stats = measure_mosaic(square_grid(2))
    assert np.all(stats.weights == 0)
    summary = summarise(stats)
    assert summary["orientation"]["coherence_global"] is None
    assert summary["orientation"]["voting_tesserae"] == 0


def test_two_thousand_tesserae_take_seconds():
    instances = np.zeros((920, 920), dtype=np.int32)
    image = np.zeros((920, 920, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    k = 1
    for y in range(0, 900, 20):
        for x in range(0, 900, 20):
            draw_rectangle(instances, (x + 10, y + 10), 16, 9, rng.uniform(0, 180), k)
            image[y:y + 20, x:x + 20] = rng.integers(0, 256, 3)
            k += 1
    start = time.perf_counter()
    stats = measure_mosaic(instances, image)
    elapsed = time.perf_counter() - start
    assert len(stats.tesserae) == 2025
    assert elapsed < 15, f"{elapsed:.1f} s for 2025 tesserae"  # ~1 s when the machine is idle


# --------------------------------------------------------------------------------------------
# Reports and the command
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stats") / "ds"
    synth_dataset(root, 2, seed=3, min_size=120, max_size=180)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_writes_every_file(dataset, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(command, [str(dataset), "--out", str(out)])
    assert result.exit_code == 0, result.output
    stems = ["synth_00000", "synth_00001"]
    for stem in stems:
        folder = out / stem
        for name in ("tesserae.csv", "summary.json", "report.html", "area_histogram.png",
                     "orientation_histogram.png", "orientation_map.png",
                     "orientation_field.png", "palette.png", "measures.png"):
            assert (folder / name).is_file(), name
        ids = np.unique(read_instances(dataset / "instances" / f"{stem}.png"))
        rows = read_csv(folder / "tesserae.csv")
        assert [int(r["id"]) for r in rows] == ids[ids > 0].tolist()
        assert "area_px" in rows[0] and rows[0]["L_cielab"] != ""
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["tesserae"] == len(rows)
        assert summary["units"]["length"] == "px"
        page = (folder / "report.html").read_text()
        assert f"Tessera statistics: {stem}" in page
        assert "data:image/png;base64," in page
        assert "http://" not in page and "https://" not in page and "<script" not in page
        assert "pixels" in page  # units note
        assert f'href="{stem}/report.html"' in (out / "index.html").read_text()
        assert stem in result.output


def test_cli_pixel_size_and_compare_one_input(dataset, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(
        command, [str(dataset), "--out", str(out), "--pixel-size", "0.2", "--compare"])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "synth_00000" / "tesserae.csv")
    assert "area_mm2" in rows[0] and "area_px" not in rows[0]
    summary = json.loads((out / "synth_00000" / "summary.json").read_text())
    assert "density_per_cm2" in summary and "grout_width_mm" in summary
    assert "mm²" in (out / "synth_00000" / "report.html").read_text()
    # One input: its mosaics are the groups compared.
    groups = json.loads((out / "compare.json").read_text())["groups"]
    assert [g["group"] for g in groups] == ["synth_00000", "synth_00001"]
    assert groups[0]["tesserae"] == summary["tesserae"]
    assert groups[0]["distributions"] == summary["distributions"]
    assert (out / "compare.html").is_file()


def make_segment_output(dataset: Path, folder: Path, stems: tuple[str, ...] | None = None) -> None:
    """A `segment`-style output: instances/<stem>.png and <stem>.png masks, no images."""
    for path in sorted((dataset / "instances").glob("*.png")):
        if stems is not None and path.stem not in stems:
            continue
        instances = read_instances(path)
        write_instances(folder / "instances" / path.name, instances)
        write_mask(folder / path.name, instances_to_mask(instances))


def test_segment_output_with_and_without_images(dataset, tmp_path):
    pred = tmp_path / "pred"
    make_segment_output(dataset, pred, stems=("synth_00000",))
    out = tmp_path / "plain"
    assert CliRunner().invoke(command, [str(pred), "--out", str(out)]).exit_code == 0
    rows = read_csv(out / "synth_00000" / "tesserae.csv")
    assert rows and all(r["L_cielab"] == "" for r in rows)  # no image: no colour
    assert json.loads((out / "synth_00000" / "summary.json").read_text())["palette"] is None
    assert not (out / "synth_00000" / "palette.png").exists()
    assert (out / "synth_00000" / "orientation_map.png").is_file()  # on a blank background

    out = tmp_path / "coloured"
    result = CliRunner().invoke(command, [str(pred), "--out", str(out), "--images", str(dataset)])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "synth_00000" / "tesserae.csv")
    assert all(r["L_cielab"] != "" for r in rows)


def test_compare_groups(dataset, tmp_path):
    # Two inputs with the same folder name and the same stem (ground truth vs a prediction).
    first, second = tmp_path / "a" / "pred", tmp_path / "b" / "pred"
    make_segment_output(dataset, first, stems=("synth_00000",))
    make_segment_output(dataset, second, stems=("synth_00000",))
    out = tmp_path / "report"
    result = CliRunner().invoke(
        command, [str(first), str(second), "--out", str(out), "--compare", "--images",
                  str(dataset)])
    assert result.exit_code == 0, result.output
    assert (out / "pred" / "synth_00000" / "report.html").is_file()
    assert (out / "pred-2" / "synth_00000" / "report.html").is_file()
    groups = json.loads((out / "compare.json").read_text())["groups"]
    assert [g["group"] for g in groups] == ["pred", "pred-2"]
    # The same instance maps: identical summaries, equal to the mosaic's own.
    summary = json.loads((out / "pred" / "synth_00000" / "summary.json").read_text())
    assert groups[0]["tesserae"] == groups[1]["tesserae"] == summary["tesserae"] > 0
    assert groups[0]["distributions"] == groups[1]["distributions"] == summary["distributions"]
    page = (out / "compare.html").read_text()
    assert "data:image/png;base64," in page and "pred-2" in page
    index = (out / "index.html").read_text()
    assert 'href="compare.html"' in index and 'href="pred-2/synth_00000/report.html"' in index


def test_prediction_without_tesserae_still_reports(tmp_path):
    pred = tmp_path / "pred"
    write_instances(pred / "instances" / "empty crop.png", np.zeros((40, 50), dtype=np.int32))
    out = tmp_path / "report"
    result = stats_report([pred], out, compare=True)
    assert result["mosaics"]["empty crop"]["tesserae"] == 0
    assert result["mosaics"]["empty crop"]["grout_fraction"] == 1.0
    assert read_csv(out / "empty crop" / "tesserae.csv") == []
    assert (out / "empty crop" / "orientation_map.png").is_file()
    assert 'href="empty%20crop/report.html"' in (out / "index.html").read_text()


def test_folder_without_instances_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("nothing here")
    out = tmp_path / "report"
    result = CliRunner().invoke(command, [str(bad), "--out", str(out)])
    assert result.exit_code == 1
    assert "no instance maps found" in result.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [bad]  # no temporary folder left behind either


def test_missing_image_and_size_mismatch_are_errors(dataset, tmp_path):
    pred = tmp_path / "pred"
    make_segment_output(dataset, pred)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(command, [str(pred), "--out", str(tmp_path / "r"), "--images",
                                          str(empty)])
    assert result.exit_code == 1 and "no image named synth_00000" in result.output
    # An instance map of the wrong size for its image.
    write_instances(pred / "instances" / "synth_00000.png", np.ones((7, 9), dtype=np.int32))
    with pytest.raises(MosaicError, match="instance map"):
        stats_report([pred], tmp_path / "r2", images=dataset)
    assert not (tmp_path / "r2").exists()


def test_existing_report_needs_overwrite(tmp_path):
    pred = tmp_path / "pred"
    write_instances(pred / "instances" / "grid.png", square_grid(2))
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = CliRunner().invoke(command, [str(pred), "--out", str(out)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (out / "old.txt").is_file()
    result = CliRunner().invoke(command, [str(pred), "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists()
    rows = read_csv(out / "grid" / "tesserae.csv")
    assert [int(r["neighbours_count"]) for r in rows] == [2, 3, 2, 3, 4, 3, 2, 3, 2]


def test_report_inside_the_input_is_refused(dataset):
    with pytest.raises(MosaicError, match="must not be or contain the input"):
        stats_report([dataset], dataset)


def test_dataset_without_instances_uses_mask_components(dataset, tmp_path):
    masks_only = tmp_path / "masks_only"
    (masks_only / "images").mkdir(parents=True)
    (masks_only / "masks").mkdir()
    for stem in ("synth_00000",):
        (masks_only / "images" / f"{stem}.png").write_bytes(
            (dataset / "images" / f"{stem}.png").read_bytes())
        (masks_only / "masks" / f"{stem}.png").write_bytes(
            (dataset / "masks" / f"{stem}.png").read_bytes())
    [mosaic] = find_mosaics(masks_only)
    assert mosaic.instances is None
    instances, image = mosaic.load()
    truth = read_instances(dataset / "instances" / "synth_00000.png")
    assert instances.max() == truth.max() and image is not None
