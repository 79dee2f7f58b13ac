"""The guided path's pieces: windowed decoding, windowed upsampling, painting (random weights:
these are about exactness and plumbing; tests/test_real_sam2.py measures quality)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mosaic_toolkit.core.instances import paint_instances
from mosaic_toolkit.core.instances import paint_windows
from mosaic_toolkit.sam.guided import SPECK_FRACTION, speck_area, upsample_window
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


def _window_decoder(confidence_at, outlines=lambda x, y: False):
    """A WindowDecoder at full resolution with one candidate per point, predicted with
    ``confidence_at(x, y)``: where ``outlines(x, y)``, a square of 6 px around the point (a
    tessera it outlines), else a mask over its whole window (a network spanning many tesserae)."""
    def decoder_for(crop):
        h, w = crop.shape[:2]

        def decode(points, centers, extent):
            size = int(np.ceil(extent))
            corners = np.stack([np.clip(centers[:, 1] - size // 2, 0, h - size),
                                np.clip(centers[:, 0] - size // 2, 0, w - size)], axis=1).astype(np.int64)
            logits = torch.ones((len(points), 1, size, size))
            for i, (x, y) in enumerate(points):
                if outlines(x, y):
                    r, c = int(y) - corners[i, 0], int(x) - corners[i, 1]
                    logits[i] = -1.0
                    logits[i, 0, r - 3:r + 3, c - 3:c + 3] = 1.0
            ious = torch.tensor([[confidence_at(x, y)] for x, y in points], dtype=torch.float32)
            return logits, ious, corners, (h, w)
        return decode
    return decoder_for


def test_guided_drops_a_proposal_on_the_grout_network():
    """A proposal that SAM 2 confidently answers with a mask spanning many tesserae sits on
    grout: it is dropped. One it answers only doubtfully keeps its classical region."""
    from mosaic_toolkit.sam.guided import guided_instances

    image = np.full((120, 120, 3), 128, np.uint8)
    proposals = np.zeros((120, 120), np.int32)
    proposals[10:20, 10:20] = 1  # on grout: SAM 2 is sure of the network
    proposals[90:100, 90:100] = 2  # a tessera SAM 2 cannot outline: it is unsure
    params = GeneratorParams(method="guided")
    out = guided_instances(image, proposals, params, _window_decoder(lambda x, y: 0.95 if x < 60 else 0.2),
                           second_round=False, reference_area=4.0)
    assert not out[10:20, 10:20].any()
    assert (out[90:100, 90:100] > 0).all() and int(out.max()) == 1


@pytest.mark.parametrize("outlined_iou, dropped", [(0.95, True), (0.3, False)])
def test_a_fine_tune_drops_the_proposals_it_predicts_far_below_its_outlines(outlined_iou, dropped):
    """A proposal left without a candidate whose prediction is under ``drop_fraction`` of the
    median prediction of the outlined proposals (a fine-tune's "not a tessera") is not painted
    back as its classical region; a base model (``drop_fraction=0``) keeps every such proposal.
    Relative to the median, a weak fine-tune that predicts every outline low drops nothing."""
    from mosaic_toolkit.sam.guided import TRAINED_DROP_FRACTION, guided_instances

    image = np.full((120, 120, 3), 128, np.uint8)
    proposals = np.zeros((120, 120), np.int32)
    for k, x0 in enumerate((10, 40, 70), start=1):  # tesserae the model outlines
        proposals[10:20, x0:x0 + 10] = k
    proposals[90:100, 10:20] = 4  # refused, predicted far under the outlines
    proposals[90:100, 90:100] = 5  # refused, predicted a little under the outlines
    low, unsure = 0.2, 0.7 * outlined_iou  # 0.2: "more wrong than right", said by a good model only
    decoder_for = _window_decoder(lambda x, y: outlined_iou if y < 50 else low if x < 60 else unsure,
                                  outlines=lambda x, y: y < 50)
    params = GeneratorParams(method="guided", pred_iou_thresh=min(0.735, 0.9 * outlined_iou))
    base = guided_instances(image, proposals, params, decoder_for, second_round=False, reference_area=100.0)
    tuned = guided_instances(image, proposals, params, decoder_for, second_round=False, reference_area=100.0,
                             drop_fraction=TRAINED_DROP_FRACTION)
    assert int(base.max()) == 5 and (base[90:100, 10:20] > 0).all() and (base[90:100, 90:100] > 0).all()
    assert (tuned[13:17, 13:17] > 0).all() and not tuned[10, 10]  # SAM 2's 6-px square, not the proposal
    assert bool(tuned[90:100, 10:20].any()) is not dropped and (tuned[90:100, 90:100] > 0).all()


def test_each_guided_region_scores_the_prediction_of_what_was_painted():
    """An outlined proposal scores the IoU SAM 2 predicted for the outline painted; a proposal
    painted as it is (no candidate kept) scores 0."""
    from mosaic_toolkit.sam.guided import guided_outlines

    image = np.full((120, 120, 3), 128, np.uint8)
    proposals = np.zeros((120, 120), np.int32)
    for k, x0 in enumerate((10, 40, 70), start=1):  # outlined, predicted 0.8 + x / 1000
        proposals[10:20, x0:x0 + 10] = k
    proposals[90:100, 90:100] = 4  # refused (a mask over its whole window), predicted 0.3
    decoder_for = _window_decoder(lambda x, y: 0.8 + x / 1000 if y < 50 else 0.3, outlines=lambda x, y: y < 50)
    params = GeneratorParams(method="guided", pred_iou_thresh=0.5)
    out, scores = guided_outlines(image, proposals, params, decoder_for, second_round=False, reference_area=100.0)
    assert int(out.max()) == 4 and scores.shape == (5,)
    for k, x0 in enumerate((10, 40, 70), start=1):
        region = int(out[15, x0 + 5])
        assert region > 0 and scores[region] == pytest.approx(0.8 + (x0 + 4.5) / 1000, abs=1e-3)
    assert int(out[95, 95]) > 0 and scores[int(out[95, 95])] == 0.0


def test_scores_follow_their_regions_through_post_processing():
    """``carried_scores``: a renumbered region keeps its raw region's score; the pieces of a
    split region share it by area; a dropped one takes no id."""
    from mosaic_toolkit.core.instances import postprocess
    from mosaic_toolkit.sam.guided import carried_scores

    raw = np.zeros((60, 60), np.int32)
    raw[2:20, 40:58] = 1  # renumbered after region 2 (raster order)
    raw[2:20, 2:20] = 2
    raw[30:40, 2:58] = 3  # cut in two by a 1-px gap of grout
    raw[30:40, 30] = 0
    raw[50:52, 50:52] = 4  # a speck: dropped
    raw_scores = np.array([0.0, 0.91, 0.82, 0.73, 0.64])
    instances = postprocess(raw, 0, 10, 0)
    scores = carried_scores(raw, raw_scores, instances)
    assert int(instances.max()) == 4 and scores.shape == (5,)
    for y, x in ((10, 50), (10, 10)):
        assert scores[instances[y, x]] == raw_scores[raw[y, x]]
    assert scores[instances[35, 10]] == pytest.approx(0.73 * 28 / 55)  # columns 2-29 of 2-57 less one
    assert scores[instances[35, 50]] == pytest.approx(0.73 * 27 / 55)


def test_the_engine_drops_unlikely_proposals_for_a_fine_tune_only(sam2_engine, tessera_grid_image, monkeypatch):
    """The engine passes ``TRAINED_DROP_FRACTION`` to the guided path for a trained output, 0 for
    a base model's."""
    import mosaic_toolkit.sam.engine as engine_module
    from mosaic_toolkit.sam.engine import Sam2Engine
    from mosaic_toolkit.sam.guided import TRAINED_DROP_FRACTION
    from mosaic_toolkit.sam.params import OUTPUT_SINGLE

    seen = []
    real = engine_module.guided_outlines

    def spy(*args, **kwargs):
        seen.append(kwargs["drop_fraction"])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "guided_outlines", spy)
    image, _ = tessera_grid_image
    params = GeneratorParams(method="guided")
    sam2_engine.segment(image, params)
    single = Sam2Engine(sam2_engine.model, version="single", output=OUTPUT_SINGLE).segment(image, params)
    assert_valid_instances(single, image.shape[:2], min_area=params.min_area)
    assert seen == [0.0, TRAINED_DROP_FRACTION]


def test_regions_that_follow_the_grout_are_dropped():
    """A branched region (the grout between tilted tesserae) fills little of its convex hull and
    is dropped; convex tesserae, a chipped one included, stay, renumbered 1..N in raster order."""
    from mosaic_toolkit.sam.guided import GUIDED_MIN_SOLIDITY, drop_grout_shapes
    from skimage.measure import regionprops

    instances = np.zeros((80, 80), np.int32)
    instances[2:22, 2:22] = 1  # a square tessera
    instances[30:50, 40:46] = 2  # a cross of grout strips
    instances[37:43, 30:56] = 2
    instances[2:22, 50:70] = 3  # a tessera with a chipped corner
    instances[2:8, 64:70] = 0
    instances[60:78, 5:25] = 4
    solidity = {p.label: p.solidity for p in regionprops(instances)}
    assert solidity[2] < GUIDED_MIN_SOLIDITY < min(solidity[1], solidity[3], solidity[4])
    out = drop_grout_shapes(instances)
    assert out.max() == 3
    assert (out > 0).sum() == (instances > 0).sum() - (instances == 2).sum()
    assert out[10, 10] == 1 and out[10, 55] == 2 and out[70, 10] == 3 and out[40, 42] == 0
    assert drop_grout_shapes(out) is out  # nothing left to drop


def test_speck_floor_follows_the_tessera_size():
    """``min_area`` in pixels holds for tesserae of the size it was set at; for fine tesserae the
    floor is SPECK_FRACTION of the squared size (64 px is a whole 8-px tessera)."""
    assert speck_area(64, 37.6) == 64  # the real photograph's tesserae: unchanged
    assert speck_area(64, 8.0) == round(SPECK_FRACTION * 64) < 64
    assert speck_area(2, 8.0) == 2  # a smaller (tuned) floor is kept
    assert speck_area(0, 8.0) == 0
