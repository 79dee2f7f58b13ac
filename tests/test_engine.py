"""Sam2Engine on a random-weight SAM 2.1 tiny at 256² input: real SAM 2 code paths, small images.

Random weights make masks meaningless, so the tests check what does not depend on the weights:
cache behaviour, equality of code paths, the structure of the outputs, and the pure helpers on
hand-made arrays.
"""
from __future__ import annotations

import dataclasses

import threading

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from mosaic_toolkit.core.dataset import FOUR_CONNECTED
from mosaic_toolkit.core.instances import paint_instances, postprocess
from mosaic_toolkit.sam.engine import Sam2Engine
from mosaic_toolkit.sam.fast import tessera_prompts, tile_interior
from mosaic_toolkit.sam.params import GeneratorParams
from mosaic_toolkit.core.errors import MosaicError

from fixtures_sam2 import random_weight_params


# ------------------------------------------------------------------------------ helpers
def fresh_engine(engine: Sam2Engine, cache_bytes: int) -> Sam2Engine:
    """A new engine (own cache) on the already loaded model."""
    return Sam2Engine(engine.model, version=engine.model_version, cache_bytes=cache_bytes)


class EncoderCalls:
    """Counts forward calls of the image encoder with a forward hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        self._handle = model.image_encoder.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.count += 1

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def encoder_calls(sam2_engine):
    calls = EncoderCalls(sam2_engine.model)
    yield calls
    calls.close()


def assert_valid_instances(instances: np.ndarray, shape: tuple[int, int], min_area: int = 0) -> None:
    """int32, ids exactly 1..N, every id one 4-connected region of at least min_area pixels."""
    assert instances.dtype == np.int32
    assert instances.shape == shape
    ids = np.unique(instances)
    n = int(instances.max())
    assert ids.tolist() == list(range(0, n + 1)) or ids.tolist() == list(range(1, n + 1))
    for idx, sl in enumerate(ndi.find_objects(instances), start=1):
        region = instances[sl] == idx
        _, pieces = ndi.label(region, structure=FOUR_CONNECTED)
        assert pieces == 1, f"id {idx} has {pieces} 4-connected pieces"
        assert region.sum() >= min_area


# ------------------------------------------------------------------------------ parameters
def test_params_round_trip_and_validation():
    params = GeneratorParams(pred_iou_thresh=0.6, method="stock", min_area=10)
    assert GeneratorParams.from_dict(params.to_dict()) == params
    assert GeneratorParams.from_dict({"erosion": 3}).erosion == 3
    assert GeneratorParams.from_dict({"erosion": 3}).pred_iou_thresh == GeneratorParams().pred_iou_thresh
    with pytest.raises(MosaicError, match="unknown key.*bogus"):
        GeneratorParams.from_dict({"bogus": 1})
    with pytest.raises(MosaicError, match="method"):
        GeneratorParams(method="slow")
    with pytest.raises(MosaicError, match="pred_iou_thresh"):
        GeneratorParams(pred_iou_thresh=1.5)
    with pytest.raises(MosaicError, match="points_per_side"):
        GeneratorParams.from_dict({"points_per_side": "many"})


# ------------------------------------------------------------------------------ pure helpers
def test_opening_removes_one_pixel_spur():
    inst = np.zeros((20, 30), np.int32)
    inst[5:15, 5:15] = 1
    inst[9, 15:25] = 1  # 1-px wide spur sticking out to the right
    out = postprocess(inst, opening=1, min_area=0, erosion=0)
    assert out.max() == 1
    assert not out[9, 16:25].any()
    assert out[6:14, 6:14].all()  # the square's interior is untouched


def test_opening_does_not_merge_or_grow_neighbours():
    inst = np.zeros((12, 22), np.int32)
    inst[2:10, 2:10] = 1
    inst[2:10, 10:20] = 2  # touching square with another id
    out = postprocess(inst, opening=1, min_area=0, erosion=0)
    assert out.max() == 2
    assert (out[inst == 0] == 0).all()
    left, right = out[inst == 1], out[inst == 2]
    assert len(np.unique(left[left > 0])) == 1 and len(np.unique(right[right > 0])) == 1
    assert (left > 0).sum() >= 64 - 4 and (right > 0).sum() >= 80 - 4  # at most the corners go


def test_min_area_drops_small_region():
    inst = np.zeros((30, 30), np.int32)
    inst[2:12, 2:12] = 1  # 100 px
    inst[20:24, 20:24] = 2  # 16 px
    out = postprocess(inst, opening=0, min_area=20, erosion=0)
    assert out.max() == 1
    assert (out[2:12, 2:12] == 1).all()
    assert not out[20:24, 20:24].any()


def test_erosion_separates_squares_joined_by_bridge():
    inst = np.zeros((20, 40), np.int32)
    inst[5:15, 5:15] = 1
    inst[5:15, 20:30] = 1
    inst[10, 15:20] = 1  # 1-px bridge: one 4-connected region
    assert postprocess(inst, opening=0, min_area=0, erosion=0).max() == 1
    out = postprocess(inst, opening=0, min_area=0, erosion=1)
    assert out.max() == 2
    assert out[10, 10] != out[10, 25] and out[10, 10] > 0 and out[10, 25] > 0


def test_erosion_separates_touching_tesserae():
    inst = np.zeros((12, 22), np.int32)
    inst[2:10, 2:10] = 1
    inst[2:10, 10:20] = 2
    out = postprocess(inst, opening=0, min_area=0, erosion=1)
    fg = out > 0
    assert out.max() == 2 and ndi.label(fg, structure=FOUR_CONNECTED)[1] == 2


def test_postprocess_splits_disconnected_ids_and_relabels():
    inst = np.zeros((10, 10), np.int32)
    inst[0:3, 0:3] = 7
    inst[6:9, 6:9] = 7  # same id, two pieces
    out = postprocess(inst, opening=0, min_area=0, erosion=0)
    assert_valid_instances(out, inst.shape)
    assert out.max() == 2


def test_paint_in_order_without_overwriting():
    a = np.zeros((6, 6), bool)
    a[0:4, 0:4] = True
    b = np.zeros((6, 6), bool)
    b[2:6, 2:6] = True
    out = paint_instances([a, b], (6, 6))
    assert (out[0:4, 0:4] == 1).all()  # the first mask keeps the overlap
    assert (out[4:6, 2:6] == 2).all() and (out[2:4, 4:6] == 2).all()
    # the second mask has 12 of 16 pixels free: kept at fraction 0.5, skipped at 0.8
    assert paint_instances([a, b], (6, 6), min_new_fraction=0.8).max() == 1


def test_prompts_land_once_in_every_tile(tessera_grid_image):
    image, instances = tessera_grid_image
    points, radii = tessera_prompts(tile_interior(image), max_points=200, grid_side=3)
    hit = instances[points[:, 1].astype(int), points[:, 0].astype(int)]
    assert (hit > 0).all(), "every prompt lies inside a tile"
    assert sorted(hit.tolist()) == list(range(1, instances.max() + 1)), "one prompt per tile"
    assert (np.diff(radii) <= 0).all(), "largest inscribed disc first"

    half = int(instances.max()) // 2
    free = (instances == 0) | (instances > half)  # tiles 1..half are already painted
    later, _ = tessera_prompts(tile_interior(image), 200, 3, free=free, min_radius=float(np.median(radii)) / 2)
    hit = instances[later[:, 1].astype(int), later[:, 0].astype(int)]
    assert sorted(hit.tolist()) == list(range(half + 1, int(instances.max()) + 1))


# ------------------------------------------------------------------------------ clicks and cache
def test_cached_click_equals_uncached_and_skips_encoder(sam2_engine, tessera_grid_image, encoder_calls):
    image, _ = tessera_grid_image
    cached = fresh_engine(sam2_engine, cache_bytes=2**30)
    uncached = fresh_engine(sam2_engine, cache_bytes=0)
    clicks = [([[50, 50]], [1]), ([[120, 80], [20, 20]], [1, 0])]

    first = [cached.predict_points(image, p, l) for p, l in clicks]
    assert encoder_calls.count == 1, "the second click on the same image reuses the embedding"
    again = cached.predict_points(image.copy(), *clicks[0])
    assert encoder_calls.count == 1
    reference = [uncached.predict_points(image, p, l) for p, l in clicks]
    assert encoder_calls.count == 3, "cache_bytes=0 re-encodes every time"

    for (mask, score), (ref_mask, ref_score) in zip(first, reference):
        assert mask.dtype == bool and mask.shape == image.shape[:2]
        np.testing.assert_array_equal(mask, ref_mask)
        assert score == pytest.approx(ref_score, abs=1e-6)
    np.testing.assert_array_equal(again[0], first[0][0])


def test_lru_eviction_over_budget(sam2_engine, tessera_grid_image, encoder_calls):
    image, _ = tessera_grid_image
    images = [image, image[::-1].copy(), image[:, ::-1].copy()]
    engine = fresh_engine(sam2_engine, cache_bytes=2**30)
    keys = [engine.encode(images[0])]
    entry_bytes = engine.cache_used_bytes
    assert entry_bytes > 0
    engine.cache_bytes = int(2.5 * entry_bytes)  # room for two images
    keys.append(engine.encode(images[1]))
    assert engine.cached_keys() == keys
    engine.encode(images[0])  # touch: images[1] becomes least recently used
    calls = encoder_calls.count
    keys.append(engine.encode(images[2]))
    assert engine.cached_keys() == [keys[0], keys[2]]
    assert engine.cache_used_bytes == 2 * entry_bytes <= engine.cache_bytes
    engine.encode(images[0])
    assert encoder_calls.count == calls + 1, "images[0] stayed cached"
    engine.encode(images[1])
    assert encoder_calls.count == calls + 2, "images[1] was evicted and is encoded again"


def test_box_prompt_and_prompt_validation(sam2_engine, tessera_grid_image):
    image, _ = tessera_grid_image
    mask, score = sam2_engine.predict_points(image, [], [], box=[2, 2, 60, 60])
    assert mask.shape == image.shape[:2] and 0.0 <= score <= 1.0
    with pytest.raises(MosaicError, match="labels"):
        sam2_engine.predict_points(image, [[1, 1]], [1, 0])
    with pytest.raises(MosaicError, match="point or a box"):
        sam2_engine.predict_points(image, [], [])
    with pytest.raises(MosaicError, match="uint8"):
        sam2_engine.predict_points(image.astype(np.float32), [[1, 1]], [1])


def test_concurrent_clicks_match_sequential(sam2_engine, tessera_grid_image):
    image, _ = tessera_grid_image
    engine = fresh_engine(sam2_engine, cache_bytes=2**30)
    clicks = [[[20 + 30 * i, 40]] for i in range(4)]
    expected = [engine.predict_points(image, c, [1])[0] for c in clicks]
    engine.clear_cache()
    results: dict[int, np.ndarray] = {}

    def click(i: int) -> None:
        results[i] = engine.predict_points(image, clicks[i], [1])[0]

    threads = [threading.Thread(target=click, args=(i,)) for i in range(len(clicks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, mask in enumerate(expected):
        np.testing.assert_array_equal(results[i], mask)


# ------------------------------------------------------------------------------ full image
def test_batched_decoder_matches_predictor(sam2_engine, tessera_grid_image):
    """The fast path's own batching gives the predictor's single-mask logits, prompt by prompt."""
    image, _ = tessera_grid_image
    points = np.array([[15, 15], [100, 47], [200, 150], [250, 10]], np.float32)
    logits, ious = sam2_engine.decode_points(image, points, batch=3)
    predictor = sam2_engine._sam.predictor
    for i, point in enumerate(points):
        sam2_engine.predict_points(image, [point], [1])  # loads the cached features
        _, iou, low = predictor.predict(point[None], np.array([1]), multimask_output=False)
        np.testing.assert_allclose(logits[i].numpy(), low[0], atol=1e-4)
        assert ious[i].item() == pytest.approx(float(iou[0]), abs=1e-5)


@pytest.mark.parametrize("method", ["fast", "stock"])
def test_segment_gives_valid_instance_map(sam2_engine, tessera_grid_image, method):
    image, _ = tessera_grid_image
    params = random_weight_params(sam2_engine, image, method=method)
    instances = sam2_engine.segment(image, params)
    assert instances.max() > 0
    assert_valid_instances(instances, image.shape[:2], min_area=params.min_area)


@pytest.mark.parametrize("method", ["fast", "stock"])
def test_segment_speck_floor_follows_the_tessera_size(sam2_engine, tessera_grid_image, method):
    """A min_area larger than a tessera (tuned on coarser tesserae) drops every region unless
    the image's tessera size is known: then pieces under 5 % of its square are the specks."""
    from mosaic_toolkit.sam.guided import speck_area

    image, _ = tessera_grid_image
    params = dataclasses.replace(random_weight_params(sam2_engine, image, method=method), min_area=10**6)
    assert sam2_engine.segment(image, params).max() == 0
    instances = sam2_engine.segment(image, params, tessera_size=20.0)
    assert instances.max() > 0
    assert_valid_instances(instances, image.shape[:2], min_area=speck_area(params.min_area, 20.0))
    # What `segment` and the backend's pre-labels run: the tessera size (given, or estimated)
    # reaches the path.
    from mosaic_toolkit.segment import segment_image

    served = Sam2Engine(sam2_engine.model, version="floor", params=params)
    assert np.array_equal(segment_image(served, image, tessera_size=20.0), instances)


def test_segment_default_thresholds_and_unknown_method(sam2_engine, tessera_grid_image):
    image, _ = tessera_grid_image
    instances = sam2_engine.segment(image, GeneratorParams(points_per_side=4))
    assert_valid_instances(instances, image.shape[:2], min_area=GeneratorParams().min_area)
    with pytest.raises(MosaicError, match="method"):
        sam2_engine.segment(image, method="slow")
