"""The guided path's pieces: windowed decoding, windowed upsampling, painting (random weights:
these are about exactness and plumbing; tests/test_real_sam2.py measures quality)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mosaic_toolkit.core.instances import paint_instances
from mosaic_toolkit.sam.guided import paint_windows, upsample_window
from mosaic_toolkit.sam.params import GeneratorParams
from test_engine import assert_valid_instances


def test_windowed_decoding_equals_the_window_of_the_full_masks(sam2_engine, tessera_grid_image):
    image, _ = tessera_grid_image
    entry = sam2_engine._encoded(image)[1]
    points = np.array([[10, 12], [60, 40], [100, 90], [5, 120]], dtype=np.float32)
    full, full_iou = sam2_engine._decode(entry, points, 8, multimask=True)
    grid = sam2_engine._sam.feat_sizes[-1][0]
    cells = 5
    windows = torch.tensor([[0, 0], [3, 4], [grid - cells, grid - cells], [grid - cells, 0]])
    part, part_iou = sam2_engine._decode(entry, points, 8, multimask=True, windows=windows, cells=cells)
    scale = full.shape[-1] // grid
    assert part.shape == (4, 3, cells * scale, cells * scale)
    torch.testing.assert_close(part_iou, full_iou)
    for i, (r, c) in enumerate(windows.tolist()):
        expected = full[i, :, r * scale:(r + cells) * scale, c * scale:(c + cells) * scale]
        torch.testing.assert_close(part[i], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hw", [(320, 320), (787, 400), (100, 333)])
def test_window_upsampling_equals_sam2_postprocessing(hw):
    """Upsampling a window equals that window of the whole map upsampled (F.interpolate)."""
    rng = np.random.default_rng(1)
    low = rng.normal(size=(64, 64)).astype(np.float32)
    whole = F.interpolate(torch.from_numpy(low)[None, None], hw, mode="bilinear", align_corners=False)[0, 0]
    for corner in [(0, 0), (10, 20), (44, 44), (50, 3)]:
        size = 14
        window = low[corner[0]:corner[0] + size, corner[1]:corner[1] + size]
        y0, x0, mask = upsample_window(window, corner, (64, 64), hw, 0.0)
        expected = whole[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]].numpy() > 0
        near = np.abs(whole[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]].numpy()) < 1e-5
        assert mask.shape == expected.shape and mask.size > 0
        assert np.array_equal(mask | near, expected | near)


def test_paint_windows_equals_paint_instances():
    rng = np.random.default_rng(0)
    shape = (60, 80)
    full, windows = [], []
    for _ in range(30):
        y0, x0 = rng.integers(0, 50), rng.integers(0, 70)
        mask = rng.random((rng.integers(3, 15), rng.integers(3, 15))) > 0.3
        mask = mask[: shape[0] - y0, : shape[1] - x0]
        big = np.zeros(shape, dtype=bool)
        big[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]] = mask
        full.append(big)
        windows.append((int(y0), int(x0), mask))
    assert np.array_equal(paint_windows(iter(windows), shape, 0.5), paint_instances(full, shape, 0.5))


def test_guided_segment_gives_valid_instance_map(sam2_engine, tessera_grid_image):
    """With random weights nearly every candidate is refused, so the classical proposals are
    kept: the map is still one valid region per tessera."""
    image, instances = tessera_grid_image
    params = GeneratorParams(method="guided")
    out = sam2_engine.segment(image, params)
    assert_valid_instances(out, image.shape[:2], min_area=params.min_area)
    assert abs(int(out.max()) - int(instances.max())) <= 0.2 * instances.max()


def test_guided_max_area_must_be_positive():
    from mosaic_toolkit.core.errors import MosaicError

    with pytest.raises(MosaicError, match="guided_max_area"):
        GeneratorParams(guided_max_area=0)
