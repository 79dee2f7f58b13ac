"""Light polygons (mosaic_toolkit.core.polygons) on shapes whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk
from skimage.draw import polygon as polygon_pixels

from mosaic_toolkit.data.export import rasterise_region
from mosaic_toolkit.core.polygons import (
    check_iou,
    instance_polygons,
    is_simple,
    outline,
    pixel_iou,
    rasterise,
    simplify,
    to_percent,
)
from mosaic_toolkit.data.synth import synth_mosaic


def test_rasterise_is_the_exporters_rule() -> None:
    """Pixel-centre-inside, ties included, exactly as skimage.draw.polygon (used by export)."""
    rng = np.random.default_rng(1)
    for trial in range(400):
        n = int(rng.integers(3, 12))
        # half-pixel grids put centres exactly on edges and vertices: the ties must agree
        xy = rng.integers(0, 40, (n, 2)) / 2.0 if trial % 2 else rng.random((n, 2)) * 20
        expected = np.zeros((25, 25), bool)
        rr, cc = polygon_pixels(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=expected.shape)
        expected[rr, cc] = True
        np.testing.assert_array_equal(rasterise(xy, expected.shape), expected)


def test_square_and_l_shape_need_only_their_corners() -> None:
    square = np.zeros((40, 40), bool)
    square[10:30, 5:25] = True
    xy = simplify(square)
    assert len(xy) == 4
    np.testing.assert_array_equal(rasterise(xy, square.shape), square)

    ell = np.zeros((40, 40), bool)
    ell[5:35, 5:15] = True
    ell[25:35, 5:30] = True
    xy = simplify(ell)
    assert len(xy) == 6
    np.testing.assert_array_equal(rasterise(xy, ell.shape), ell)


def test_disc_keeps_the_fineness_with_few_vertices() -> None:
    """A 33-px disc: IoU >= the fineness, far fewer vertices than its exact outline, and a
    finer setting never gives fewer vertices."""
    mask = np.zeros((50, 50), bool)
    mask[disk((25, 25), 16.5, shape=mask.shape)] = True
    exact = outline(mask)
    counts = {}
    for iou in (0.9, 0.97, 0.99):
        xy = simplify(mask, iou)
        assert is_simple(xy)
        assert pixel_iou(rasterise(xy, mask.shape), mask) >= iou
        counts[iou] = len(xy)
    assert counts[0.9] <= counts[0.97] <= counts[0.99] < len(exact)
    assert 6 <= counts[0.97] <= 16, counts
    xy = simplify(mask, 1.0)  # fineness 1: exactly the pixels
    np.testing.assert_array_equal(rasterise(xy, mask.shape), mask)


def test_neighbours_never_take_each_others_pixels() -> None:
    """Two tesserae touching along a staircase (no grout): each polygon holds no pixel of the
    other, so they overlap by less than a pixel row."""
    instances = np.zeros((40, 60), np.int32)
    for r in range(5, 35):
        cut = 20 + (r - 5) // 2  # a diagonal staircase border
        instances[r, 5:cut] = 1
        instances[r, cut:55] = 2
    polys = instance_polygons(instances, 0.9)
    assert set(polys) == {1, 2}
    a, b = (rasterise(polys[k], instances.shape) for k in (1, 2))
    assert not np.any(a & (instances == 2)) and not np.any(b & (instances == 1))
    assert not np.any(a & b)
    for k, pixels in ((1, a), (2, b)):
        assert pixel_iou(pixels, instances == k) >= 0.9


def test_tiny_tessera_keeps_its_exact_outline() -> None:
    mask = np.zeros((6, 6), bool)
    mask[2:4, 2:4] = True
    xy = simplify(mask, 0.97)
    np.testing.assert_array_equal(rasterise(xy, mask.shape), mask)
    assert simplify(np.zeros((4, 4), bool)) is None


def test_is_simple() -> None:
    assert is_simple(np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float))
    assert not is_simple(np.array([[0, 0], [4, 4], [4, 0], [0, 4]], float))  # a bow tie
    assert not is_simple(np.array([[0, 0], [2, 0], [4, 0]], float))  # no area
    assert not is_simple(np.array([[0, 0], [4, 0], [4, 4], [2, 0], [0, 4]], float))  # touches an edge


def test_check_iou() -> None:
    assert check_iou(0.97) == 0.97 and check_iou(1) == 1.0
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="must lie in"):
            check_iou(bad)


def test_stored_polygons_export_back_to_the_checked_pixels() -> None:
    """Every polygon of a synthetic mosaic, written as Label Studio percentages and read by the
    exporter, keeps IoU >= 0.97 with its tessera and holds no neighbour's pixel; vertices per
    tessera drop from the outline's tens to about ten."""
    _, instances = synth_mosaic(np.random.default_rng(3), 300, 220, tessera_size=33)
    h, w = instances.shape
    polys = instance_polygons(instances, 0.97)
    assert len(polys) == instances.max()
    for k, xy in polys.items():
        region = {"id": k, "type": "polygonlabels", "value": {"points": to_percent(xy, w, h)}}
        pixels = rasterise_region(1, region, w, h)
        np.testing.assert_array_equal(pixels, rasterise(xy, (h, w)))
        assert pixel_iou(pixels, instances == k) >= 0.97
        assert not np.any(pixels & (instances > 0) & (instances != k))
    assert np.median([len(xy) for xy in polys.values()]) <= 12
