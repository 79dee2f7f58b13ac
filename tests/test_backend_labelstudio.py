"""End to end: the ML backend connected to a real Label Studio 1.23.2 (tests/labelstudio_server.py).

A project with the repository's label_config.xml holds three synthetic mosaics in a local-files
storage. The backend runs with uvicorn on 127.0.0.1 (a thread of this process, so the test can
look at its engine) with SAM 2.1 tiny at random weights, and is connected through the SDK
(``ml.create``); it learns Label Studio's address and token from /setup. Then:

1. an interactive click (``ml.predict_interactive``) comes back as polygon regions, which Label
   Studio then stores in an annotation and exports unchanged;
2. "Retrieve predictions" (the Data Manager action) stores one pre-label region per tessera the
   backend found, with the backend's model version; a second backend on the classical engine
   shows those regions lie on the real tesserae (per-tessera F against the synthetic truth);
3. after two tasks are annotated (in another project, one: a single mosaic is split into
   bands), "start training" (``ml.train``) runs a training job in a
   worker process (export -> augment into 128 px crops -> 20 short epochs at 128 px, lr 6e-4) and, with the
   default promotion rule (``better``), the model version changes because the fine-tune
   measurably beats the random model on the run's validation images (a held-out mosaic): its
   prompted IoU (mean IoU of the mask decoded at each val tessera's point) at least doubles.
   Prompt-free segmentation Dice is 0 for both at random weights, so the prompted score decides
   (toolkit/training/selection.py).

Bad requests sent through Label Studio come back as errors naming the problem, and the backend
keeps answering.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import uvicorn
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from labelstudio_server import LabelStudioServer, free_port
from mosaic_backend.app import create_app
from mosaic_backend.config import Settings
from mosaic_toolkit.data.export import rasterise_region
from mosaic_toolkit.evaluation.metrics import tile_metrics
from mosaic_toolkit.segment import segment_image
from mosaic_toolkit.data.synth import synth_mosaic

pytestmark = pytest.mark.labelstudio

LABEL_CONFIG = (Path(__file__).resolve().parents[1] / "label_config.xml").read_text()
WIDTH, HEIGHT = 256, 192
SAM_PARAMS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "stability_score_offset": 0.05,
              "mask_threshold": 0.05, "points_per_side": 8}  # random weights: let masks through
TRAINING = dict(train_epochs=20, train_batch_size=1, train_lr=6e-4, train_max_prompts=0, train_image_size=128,
                train_tesserae_per_crop=20, train_max_side=128, train_promote="better",
                train_val_params={"points_per_side": 4, "points_per_batch": 16})
TRAINING_TIMEOUT_S = 420


class BackendServer:
    """The backend app served by uvicorn in a thread on a free port."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "BackendServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the backend did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def backend(self):
        return self.app.state.backend

    def get(self, path: str) -> dict[str, Any]:
        return httpx.get(self.url + path, timeout=30).json()


@dataclass
class Project:
    id: int
    tasks: list[int]
    images: list[np.ndarray]
    truths: list[np.ndarray]


def make_project(label_studio: LabelStudioServer, title: str, seeds: tuple[int, ...]) -> Project:
    """A project with label_config.xml and one synthetic mosaic per seed, in local storage."""
    client = label_studio.client()
    project = client.projects.create(title=title, label_config=LABEL_CONFIG)
    folder = label_studio.document_root / f"backend-{project.id}"
    label_studio.add_local_storage(project.id, folder)
    images, truths, urls = [], [], []
    for seed in seeds:
        image, truth = synth_mosaic(np.random.default_rng(seed), WIDTH, HEIGHT, tessera_size=28)
        Image.fromarray(image).save(folder / f"mosaic {seed}.png")
        images.append(image)
        truths.append(truth)
        urls.append(label_studio.local_file_url(folder / f"mosaic {seed}.png"))
    response = client.projects.import_tasks(id=project.id, request=[{"image": u} for u in urls],
                                            return_task_ids=True)
    return Project(project.id, list(response.task_ids), images, truths)


@pytest.fixture(scope="module")
def project(label_studio: LabelStudioServer) -> Project:
    return make_project(label_studio, "backend end to end", (11, 12, 13))


@pytest.fixture(scope="module")
def sam_backend(project, tiny_sam2_checkpoint, tmp_path_factory) -> Iterator[BackendServer]:
    settings = Settings.from_env(
        {}, engine="sam2", model=str(tiny_sam2_checkpoint), image_size=256, generator_params=SAM_PARAMS,
        click_mask_threshold=0.0,  # random weights: let the click's mask through, as SAM_PARAMS does
        models_dir=tmp_path_factory.mktemp("backend-models"), **TRAINING)
    with BackendServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def connected(label_studio, project, sam_backend) -> int:
    """The SAM 2 backend connected to the project as an interactive ML backend; its id."""
    ml = label_studio.client().ml.create(url=sam_backend.url, project=project.id, is_interactive=True,
                                         title="mosaic-sam")
    assert ml.state == "CO", ml.error_message  # connected
    assert ml.model_version == "sam2.1-tiny"
    link = sam_backend.backend.link  # learned from /setup: not configured
    assert (link.url, link.api_key) == (label_studio.url, label_studio.token)
    return ml.id


def interactive(label_studio: LabelStudioServer, ml_id: int, task: int, *results: dict):
    return label_studio.client().ml.with_raw_response.predict_interactive(
        id=ml_id, task=task, context={"result": list(results)}).response


def keypoint(x: float, y: float, positive: bool = True, size: tuple[int, int] = (WIDTH, HEIGHT)) -> dict:
    """A smart keypoint at pixel (x, y) of an image of ``size`` (width, height)."""
    width, height = size
    return {"id": "k1", "type": "keypointlabels", "from_name": "keypoint", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0, "origin": "manual",
            "is_positive": positive, "value": {"x": x / width * 100, "y": y / height * 100, "width": 0.6,
                                               "keypointlabels": ["Tessera"]}}


def brush_result(mask: np.ndarray, rid: str) -> dict:
    """One brush region holding ``mask`` (the image's size)."""
    height, width = mask.shape
    return {"id": rid, "type": "brushlabels", "from_name": "brush", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": ["Tessera"]}}


def wait_for_training(server: BackendServer, timeout_s: float = TRAINING_TIMEOUT_S) -> dict:
    """The backend's ``/train/status`` once the run "Start training" began has ended (or at the deadline)."""
    deadline = time.monotonic() + timeout_s
    status = server.get("/train/status")
    while status["state"] in ("idle", "running") and time.monotonic() < deadline:
        time.sleep(1)
        status = server.get("/train/status")
    return status


def middle_of(truth: np.ndarray) -> tuple[float, float]:
    """The centroid of the tessera nearest the image centre."""
    k = int(truth[HEIGHT // 2, WIDTH // 2]) or int(np.max(truth[HEIGHT // 2]))
    rows, cols = np.nonzero(truth == k)
    return float(cols.mean()) + 0.5, float(rows.mean()) + 0.5


# --------------------------------------------------------------------------------------------
def test_interactive_click_returns_a_mask_label_studio_accepts(label_studio, project, connected, sam_backend) -> None:
    """(1) A keypoint click: Label Studio passes the backend's polygon regions back, and accepts them
    as an annotation that exports unchanged."""
    x, y = middle_of(project.truths[0])
    response = interactive(label_studio, connected, project.tasks[0], keypoint(x, y))
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["model_version"] == "sam2.1-tiny" and isinstance(data["score"], float)
    regions = data["result"]  # light polygons: the config has PolygonLabels
    assert regions and all(r["type"] == "polygonlabels" and r["value"]["polygonlabels"] == ["Tessera"]
                           for r in regions)
    assert all((r["original_width"], r["original_height"]) == (WIDTH, HEIGHT) for r in regions)
    assert any(rasterise_region(1, r, WIDTH, HEIGHT).any() for r in regions)
    engine = sam_backend.backend.engines.active
    assert len(engine.cached_keys()) >= 1  # the image was encoded; the next click only decodes

    client = label_studio.client()
    annotation = client.annotations.create(id=project.tasks[0], result=regions)
    [task] = [t for t in client.projects.exports.as_json(project.id) if t["id"] == project.tasks[0]]
    [stored] = [a["result"] for a in task["annotations"] if a["id"] == annotation.id]
    assert [r["value"]["points"] for r in stored] == [r["value"]["points"] for r in regions]
    client.annotations.delete(id=annotation.id)


def test_retrieved_predictions_are_stored_per_tessera(label_studio, project, connected, sam_backend) -> None:
    """(2) "Retrieve predictions" stores one polygon pre-label per tessera the backend found."""
    client = label_studio.client()
    task = project.tasks[1]
    client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                          selected_items={"all": False, "included": [task]})
    [prediction] = client.predictions.list(task=task)
    engine = sam_backend.backend.engines.active
    expected = segment_image(engine, project.images[1])
    assert prediction.model_version == "sam2.1-tiny"
    assert len(prediction.result) == expected.max() > 1
    assert all(r["type"] == "polygonlabels" and r["value"]["polygonlabels"] == ["Tessera"]
               for r in prediction.result)
    assert prediction.score == pytest.approx(np.mean([r["score"] for r in prediction.result]), abs=1e-3)


def test_classical_prelabels_lie_on_the_tesserae(label_studio, tmp_path_factory) -> None:
    """(2, classical engine) The pre-labels Label Studio stores match the synthetic tesserae."""
    project = make_project(label_studio, "classical pre-labels", (21,))
    settings = Settings.from_env({}, engine="classical", models_dir=tmp_path_factory.mktemp("classical-models"))
    with BackendServer(settings) as server:
        client = label_studio.client()
        ml = client.ml.create(url=server.url, project=project.id, is_interactive=True, title="classical")
        assert ml.state == "CO", ml.error_message
        client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                              selected_items={"all": False, "included": project.tasks})
        [prediction] = client.predictions.list(task=project.tasks[0])
    assert prediction.model_version == "classical"
    found = np.zeros((HEIGHT, WIDTH), np.int32)
    for k, region in enumerate(prediction.result, start=1):
        found[rasterise_region(project.tasks[0], region, WIDTH, HEIGHT) & (found == 0)] = k
    scores = tile_metrics(project.truths[0], found)
    assert scores["f_measure"] > 0.7, scores


def test_training_changes_the_model_version(label_studio, project, connected, sam_backend) -> None:
    """(3) Two annotated tasks, then "start training": a worker trains, and the backend (and
    what Label Studio gets from it) switches to the new version."""
    client = label_studio.client()
    for task, truth in zip(project.tasks[:2], project.truths[:2]):
        regions = [brush_result(truth == k, f"t{k}") for k in range(1, int(truth.max()) + 1)]
        client.annotations.create(id=task, result=regions)
    before = sam_backend.get("/health")["model_version"]
    client.ml.train(id=connected)
    status = wait_for_training(sam_backend)
    assert status["state"] == "succeeded", status
    assert status["promoted"] is True and status["annotated_tasks"] == 2
    assert isinstance(status["val_dice"], float) and isinstance(status["baseline_dice"], float)
    assert status["val_prompt_iou"] > 2 * status["baseline_prompt_iou"], status
    assert "beats the current model" in status["reason"], status
    assert status["epochs_completed"] == TRAINING["train_epochs"]
    after = sam_backend.get("/health")["model_version"]
    assert after != before and after == status["version"] and after.startswith("sam2.1-tiny+ft-")
    assert sam_backend.get("/versions")["versions"] == [before, after]

    x, y = middle_of(project.truths[2])
    response = interactive(label_studio, connected, project.tasks[2], keypoint(x, y))
    assert response.json()["data"]["model_version"] == after
    listed = client.ml.list_model_versions(id=connected)
    assert after in listed.versions


def test_one_annotated_mosaic_is_enough_to_train(label_studio, tiny_sam2_checkpoint, tmp_path_factory) -> None:
    """(3, one mosaic) A project with a single annotated image trains: the worker splits that
    mosaic into a train and a val band (``augment``'s spatial split) instead of asking for a
    second annotated image."""
    project = make_project(label_studio, "one annotated mosaic", (31, 32))
    settings = Settings.from_env(
        {}, engine="sam2", model=str(tiny_sam2_checkpoint), image_size=256, generator_params=SAM_PARAMS,
        models_dir=tmp_path_factory.mktemp("one-mosaic-models"),
        **{**TRAINING, "train_epochs": 2, "train_promote": "always"})
    with BackendServer(settings) as server:
        client = label_studio.client()
        ml = client.ml.create(url=server.url, project=project.id, is_interactive=True, title="one mosaic")
        assert ml.state == "CO", ml.error_message
        truth = project.truths[0]
        client.annotations.create(id=project.tasks[0], result=[brush_result(truth == k, f"t{k}")
                                                               for k in range(1, int(truth.max()) + 1)])
        client.ml.train(id=ml.id)
        status = wait_for_training(server)
    assert status["state"] == "succeeded", status
    assert status["annotated_tasks"] == 1 and status["train_images"] > 0 and status["val_images"] > 0, status
    assert status["epochs_completed"] == 2 and status["promoted"] is True, status


def test_bad_requests_through_label_studio(label_studio, project, connected, sam_backend, caplog) -> None:
    """Malformed contexts and clicks outside the image are refused (Label Studio reports only
    the status, so the backend logs the reason); unknown tasks are refused by Label Studio
    itself; the backend keeps answering."""
    caplog.set_level("WARNING", logger="mosaic_backend")
    outside = interactive(label_studio, connected, project.tasks[0], keypoint(WIDTH * 1.5, 10))
    assert outside.json() == {"errors": [f"400 Client Error: Bad Request for url: {sam_backend.url}/predict"]}
    malformed = interactive(label_studio, connected, project.tasks[0], {"type": "keypointlabels", "value": {"x": "?"}})
    assert "400 Client Error" in malformed.json()["errors"][0]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "lies outside the image" in logged and "value.x: expected a finite number" in logged
    unknown = label_studio.client().ml.with_raw_response.predict_interactive
    with pytest.raises(Exception, match="404"):
        unknown(id=connected, task=10**6, context={"result": [keypoint(10, 10)]})
    assert sam_backend.get("/health")["status"] == "UP"
    x, y = middle_of(project.truths[0])
    assert interactive(label_studio, connected, project.tasks[0], keypoint(x, y)).status_code == 200
