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
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TEST_IMAGE_SIZE = 256
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
