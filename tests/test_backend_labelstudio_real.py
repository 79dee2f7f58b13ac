"""End to end with the real SAM 2 tiny: annotations in Label Studio train a version whose
pre-labels of another crop are better.

The round trip an annotator goes through, with the official SAM 2 hiera-tiny weights (skipped
where they were not imported: ``make real-sam2``) in a real Label Studio 1.23.2
(tests/labelstudio_server.py), on crops of a real mosaic photograph (tests/data/real_finetune/):

1. A project with the repository's label_config.xml holds four 320 px crops in a local-files
   storage. The backend serves the real base model at input 512 (uvicorn in a thread, as in
   test_backend_labelstudio.py) and is connected through the SDK (``ml.create``).
2. "Retrieve predictions" pre-labels the held-out crop with the base model.
3. Three other crops are annotated in Label Studio (one brush region per tessera of their
   reference masks), then "start training" (``ml.train``) runs the backend's training job: export
   -> augment (each crop kept whole, rotated and mirrored: two crops train, 12 images; one
   validates, 6 images) -> the backend's default training (``MOSAIC_BACKEND_TRAIN_*``: 3 epochs,
   lr 3e-4, 4 images and 64 tessera prompts per image and step) at input 512.
   With the default promotion rule (``better``: toolkit/training/selection.py) the backend
   switches to the new version because it beats the base model on the validation crop.
4. "Retrieve predictions" again: Label Studio stores the new version's pre-labels of the held-out
   crop (and a click on it is answered by the new version too).

What is measured: both stored pre-labels of the held-out crop, rasterised region by region, are
scored against its reference mask (reference specks dropped, as ``mosaic-toolkit eval`` does)
with the project's metrics: tile F and count error (``tile_metrics``) and pixel IoU
(``pixel_metrics``). The fine-tune must beat the base model by MIN_GAIN in tile F and in pixel
IoU. At input 512 the base model outlines these low-contrast cream tiles poorly (tile F 0.79,
pixel IoU 0.75); the default training on the other crops lifts tile F to 0.885 and pixel IoU to
0.871 (which crop validates follows the task ids; with one epoch at batch 1, each of the three
as the validation crop gave gains of 0.07-0.10 and 0.09-0.13). At the thesis's lr 1e-5 the same
run made them worse (0.760 / 0.682) and was still promoted, which this test would catch. The
count error is reported, not asserted: the fine-tune finds more regions than the base model
(94 against 84, for 85 tesserae).

Costs on two CPU cores shared with other work: the module ran in 4 min, the training job in
about 210 s (three epochs of 55 s, each with its validation: the guided segmentation of the six
validation images, which also runs once before training).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from labelstudio_server import LabelStudioServer
from mosaic_backend.config import Settings
from mosaic_toolkit.core.dataset import mask_to_instances, tessera_points
from mosaic_toolkit.core.io import read_mask
from mosaic_toolkit.data.export import rasterise_region
from mosaic_toolkit.evaluation.metrics import drop_specks, pixel_metrics, tile_metrics
from test_backend_labelstudio import (LABEL_CONFIG, BackendServer, brush_result, interactive, keypoint,
                                      wait_for_training)

# the weights first: without them the module skips before Label Studio starts
pytestmark = [pytest.mark.labelstudio, pytest.mark.slow, pytest.mark.usefixtures("real_sam2_checkpoint")]

DATA = Path(__file__).resolve().parent / "data" / "real_finetune"
TRAIN_CROPS = ("train_wing_edge", "train_blue_green", "train_body")
HELD_OUT = "heldout_antennae"
IMAGE_SIZE = 512  # serving and training: the base model is weak here, training is cheap
# The backend's own training defaults (epochs, lr, batch, prompts): what an annotator gets.
TRAINING = dict(train_image_size=IMAGE_SIZE, train_tesserae_per_crop=100, train_max_side=IMAGE_SIZE,
                train_promote="better")
TRAINING_TIMEOUT_S = 900
MIN_GAIN = {"f_measure": 0.05, "iou": 0.05}  # measured: tile F +0.075 to +0.097, IoU +0.086 to +0.134


class Crop:
    """One crop of tests/data/real_finetune: the RGB image and its reference tesserae (specks
    of the thresholded mask dropped)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.image = np.asarray(Image.open(DATA / "images" / f"{name}.jpg").convert("RGB"))
        self.truth = drop_specks(mask_to_instances(read_mask(DATA / "masks" / f"{name}.png")))[0]
        self.height, self.width = self.truth.shape


@pytest.fixture(scope="module")
def crops() -> dict[str, Crop]:
    return {name: Crop(name) for name in (*TRAIN_CROPS, HELD_OUT)}


@pytest.fixture(scope="module")
def project(label_studio: LabelStudioServer, crops) -> tuple[int, dict[str, int]]:
    """A project holding every crop as a task; (project id, task id per crop)."""
    client = label_studio.client()
    project = client.projects.create(title="real fine-tuning round trip", label_config=LABEL_CONFIG)
    folder = label_studio.document_root / f"real-{project.id}"
    label_studio.add_local_storage(project.id, folder)
    urls = []
    for crop in crops.values():
        Image.fromarray(crop.image).save(folder / f"{crop.name}.png")  # lossless from here on
        urls.append(label_studio.local_file_url(folder / f"{crop.name}.png"))
    response = client.projects.import_tasks(id=project.id, request=[{"image": u} for u in urls],
                                            return_task_ids=True)
    return project.id, dict(zip(crops, response.task_ids))


@pytest.fixture(scope="module")
def backend(real_sam2_checkpoint, tmp_path_factory) -> Iterator[BackendServer]:
    settings = Settings.from_env({}, engine="sam2", model=str(real_sam2_checkpoint), image_size=IMAGE_SIZE,
                                 models_dir=tmp_path_factory.mktemp("real-models"), **TRAINING)
    with BackendServer(settings) as server:
        yield server


def instance_map(task: int, regions: list[dict], crop: Crop) -> np.ndarray:
    """The regions as an instance map, painted in order without overwriting."""
    found = np.zeros(crop.truth.shape, np.int32)
    for k, region in enumerate(regions, start=1):
        found[rasterise_region(task, region, crop.width, crop.height) & (found == 0)] = k
    return found


def prelabel_scores(label_studio: LabelStudioServer, project: int, task: int, crop: Crop,
                    version: str) -> dict[str, float]:
    """Retrieve predictions for ``task`` (the Data Manager action), check that Label Studio stored
    one from ``version``, and score it against the crop's reference."""
    client = label_studio.client()
    client.actions.create(id="retrieve_tasks_predictions", project=project,
                          selected_items={"all": False, "included": [task]})
    [prediction] = [p for p in client.predictions.list(task=task) if p.model_version == version]
    assert prediction.result and all(r["type"] == "polygonlabels" for r in prediction.result)
    found = instance_map(task, prediction.result, crop)
    tiles = tile_metrics(crop.truth, found)
    pixels = pixel_metrics(found > 0, crop.truth > 0)
    return {"f_measure": tiles["f_measure"], "count_error": tiles["count_error"], "iou": pixels["iou"],
            "regions": tiles["n_pred"], "tesserae": tiles["n_gt"]}


# --------------------------------------------------------------------------------------------
def test_training_on_annotations_improves_prelabels_of_a_held_out_crop(label_studio, project, crops, backend) -> None:
    project_id, tasks = project
    held_out = crops[HELD_OUT]
    client = label_studio.client()
    ml = client.ml.create(url=backend.url, project=project_id, is_interactive=True, title="mosaic-sam real")
    assert ml.state == "CO", ml.error_message  # connected
    base = backend.get("/health")["model_version"]
    assert "+ft-" not in base

    # (2) the base model's pre-labels of the held-out crop, as Label Studio stores them
    before = prelabel_scores(label_studio, project_id, tasks[HELD_OUT], held_out, base)

    # (3) annotate the other crops, then "start training"
    for name in TRAIN_CROPS:
        truth = crops[name].truth
        client.annotations.create(id=tasks[name], result=[
            brush_result(truth == k, f"t{k}") for k in np.unique(truth[truth > 0])])
    started = time.monotonic()
    client.ml.train(id=ml.id)
    status = wait_for_training(backend, TRAINING_TIMEOUT_S)
    seconds = time.monotonic() - started
    assert status["state"] == "succeeded", status
    assert (status["annotated_tasks"], status["train_images"], status["val_images"]) == (3, 12, 6), status
    assert status["promoted"] is True and "beats the current model" in status["reason"], status
    after = backend.get("/health")["model_version"]
    assert after == status["version"] and after.startswith(base + "+ft-"), (base, after)
    assert backend.get("/versions")["versions"] == [base, after]
    assert after in client.ml.list_model_versions(id=ml.id).versions

    # (4) the new version's pre-labels of the same crop, scored the same way
    trained = prelabel_scores(label_studio, project_id, tasks[HELD_OUT], held_out, after)
    print(f"\ntraining job {seconds:.0f} s (validation Dice {status['baseline_dice']:.3f} -> "
          f"{status['val_dice']:.3f}, prompted IoU {status['baseline_prompt_iou']:.3f} -> "
          f"{status['val_prompt_iou']:.3f})\nheld-out pre-labels, base {base}: {before}\n"
          f"held-out pre-labels, fine-tune {after}: {trained}")
    for metric, gain in MIN_GAIN.items():
        assert trained[metric] >= before[metric] + gain, (metric, before, trained)

    # a click on the held-out crop is answered by the new version, with the tessera clicked
    k = int(held_out.truth[held_out.height // 2, held_out.width // 2]) or int(np.max(held_out.truth))
    tessera = held_out.truth == k
    [(x, y)] = tessera_points(tessera.astype(np.int32))
    response = interactive(label_studio, ml.id, tasks[HELD_OUT],
                           keypoint(x + 0.5, y + 0.5, size=(held_out.width, held_out.height)))
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["model_version"] == after
    clicked = instance_map(tasks[HELD_OUT], data["result"], held_out) > 0
    iou = (clicked & tessera).sum() / (clicked | tessera).sum()
    print(f"click on tessera {k}: IoU {iou:.3f}")
    assert iou > 0.8
