"""Tiled tasks and batch pre-annotation against a real Label Studio 1.23.2.

1. `mosaic-toolkit tasks` writes crop tasks into Label Studio's local-files document root; they
   are imported, each crop is annotated with its ground truth, and `mosaic-toolkit export --url`
   reads Label Studio's own export back into one sample equal to the mosaic's ground truth.
2. `mosaic-toolkit prelabel` on a project of several tasks: stopped after two tasks, run again
   (only the rest is done), with a task deleted while the run is going on.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from click.testing import CliRunner
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from labelstudio_server import LabelStudioServer
from mosaic_toolkit.classical import ClassicalEngine
from mosaic_toolkit.cli import main
from mosaic_toolkit.core.dataset import Dataset, relabel_sequential
from mosaic_toolkit.data.export import rasterise_region
from mosaic_toolkit.data.prelabel import config_names, prelabel_project
from mosaic_toolkit.segment import segment_image
from mosaic_toolkit.data.synth import synth_mosaic
from mosaic_toolkit.data.tasks import CROP_KEY, crop_instances

pytestmark = pytest.mark.labelstudio

LABEL_CONFIG = (Path(__file__).resolve().parents[1] / "label_config.xml").read_text()


def brush(mask: np.ndarray, rid: str) -> dict:
    h, w = mask.shape
    return {"id": rid, "type": "brushlabels", "from_name": "brush", "to_name": "image",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": ["Tessera"]}}


def test_tiled_tasks_round_trip_through_label_studio(label_studio: LabelStudioServer, tmp_path) -> None:
    client = label_studio.client()
    project = client.projects.create(title="tiled mosaic", label_config=LABEL_CONFIG)
    image, truth = synth_mosaic(np.random.default_rng(8), 520, 400, tessera_size=24)
    source = tmp_path / "wall.png"
    Image.fromarray(image).save(source)
    out = label_studio.document_root / f"tiles-{project.id}"
    result = CliRunner().invoke(main, ["tasks", str(source), "--out", str(out), "--max-tesserae", "150",
                                       "--tessera-size", "22", "--document-root", str(label_studio.document_root)])
    assert result.exit_code == 0, result.output
    label_studio.add_local_storage(project.id, out)
    tasks = json.loads((out / "tasks.json").read_text())
    assert len(tasks) >= 4
    response = client.projects.import_tasks(id=project.id, request=tasks, return_task_ids=True)
    ids = list(response.task_ids)
    for task_id, task in zip(ids, tasks):
        meta = task["meta"][CROP_KEY]
        labels = crop_instances(truth, (meta["y"], meta["x"], meta["y"] + meta["height"], meta["x"] + meta["width"]))
        client.annotations.create(id=task_id, result=[brush(labels == k, f"t{k}")
                                                      for k in range(1, int(labels.max()) + 1)])
    # Label Studio serves the crops under the URLs the tasks name
    name = unquote(tasks[0]["data"]["image"]).rsplit("/", 1)[-1]
    assert label_studio.download(tasks[0]["data"]["image"]) == (out / "images" / name).read_bytes()
    dataset_dir = tmp_path / "dataset"
    result = CliRunner().invoke(main, ["export", "--url", label_studio.url, "--api-key", label_studio.token,
                                       "--project", str(project.id), "--out", str(dataset_dir)])
    assert result.exit_code == 0, result.output
    assert f"exported mosaics: 1 (from {len(ids)} tasks)" in result.output and "skipped tasks: 0" in result.output
    dataset = Dataset.open(dataset_dir)
    [sample] = dataset.samples
    assert sample.source["mosaic"] == "wall.png" and sorted(sample.source["tasks"]) == sorted(ids)
    np.testing.assert_array_equal(dataset.instances(sample), relabel_sequential(truth))
    np.testing.assert_array_equal(dataset.image(sample), image)


@pytest.fixture(scope="module")
def small_project(label_studio: LabelStudioServer):
    client = label_studio.client()
    project = client.projects.create(title="prelabel", label_config=LABEL_CONFIG)
    folder = label_studio.document_root / f"prelabel-{project.id}"
    label_studio.add_local_storage(project.id, folder)
    images = []
    for seed in range(31, 36):
        image, _ = synth_mosaic(np.random.default_rng(seed), 200, 160, tessera_size=26)
        Image.fromarray(image).save(folder / f"m{seed}.png")
        images.append(image)
    response = client.projects.import_tasks(
        id=project.id, request=[{"image": label_studio.local_file_url(folder / f"m{s}.png")} for s in range(31, 36)],
        return_task_ids=True)
    return project.id, list(response.task_ids), images


def test_prelabel_is_resumable_and_survives_a_deleted_task(label_studio, small_project) -> None:
    project, ids, images = small_project
    client = label_studio.client()
    assert config_names(LABEL_CONFIG).from_name == "polygon"
    stop = threading.Event()

    def halt_after_two(summary, finished, total):
        if finished == 2:
            stop.set()

    first = prelabel_project(label_studio.url, label_studio.token, project, ClassicalEngine(),
                             model_version="classical", progress=False, stop=stop, on_task=halt_after_two)
    assert first.stopped and first.done == ids[:2] and not first.failed
    stored = client.predictions.list(project=project)
    assert sorted(p.task for p in stored) == ids[:2]
    expected = segment_image(ClassicalEngine(), images[0])
    [prediction] = [p for p in stored if p.task == ids[0]]
    assert prediction.model_version == "classical" and len(prediction.result) == expected.max()
    for k, region in enumerate(prediction.result, start=1):
        pixels = rasterise_region(ids[0], region, 200, 160)
        truth = expected == k
        assert (pixels & truth).sum() / (pixels | truth).sum() >= 0.97

    # the second run: the two done are skipped; a task deleted while it runs is skipped too
    def delete_the_last(summary, finished, total):
        if finished == 1:
            client.tasks.delete(id=str(ids[-1]))

    second = prelabel_project(label_studio.url, label_studio.token, project, ClassicalEngine(),
                              model_version="classical", progress=False, on_task=delete_the_last)
    assert second.done == ids[2:4] and not second.failed and not second.stopped
    assert second.skipped == {ids[0]: "already pre-labelled by classical", ids[1]: "already pre-labelled by classical",
                              ids[-1]: "deleted during the run"}
    assert sorted(p.task for p in client.predictions.list(project=project)) == ids[:4]

    # the command line: nothing left to do, a summary, and --tasks naming a gone task
    result = CliRunner().invoke(main, ["prelabel", "--url", label_studio.url, "--api-key", label_studio.token,
                                       "--project", str(project), "--engine", "classical",
                                       "--tasks", ",".join(str(i) for i in ids)])
    assert result.exit_code == 0, result.output
    assert "pre-labelled tasks: 0" in result.output and "skipped tasks: 5" in result.output
    assert f"not in the project (deleted?): {ids[-1]}" in result.output
    assert len(client.predictions.list(project=project)) == 4  # nothing stored twice


def test_sam2_prelabels_carry_each_region_score(label_studio, small_project, sam2_engine) -> None:
    """SAM 2's guided pre-labels store each region's score (the IoU SAM 2 predicted for its
    outline, 0 for a classical region it did not outline) and the prediction's score, their
    mean, as Label Studio returns them."""
    from mosaic_toolkit.segment import segment_image_info

    project, ids, images = small_project
    assert sam2_engine.params.method == "guided"
    summary = prelabel_project(label_studio.url, label_studio.token, project, sam2_engine,
                               model_version="sam2-scored", tasks=[ids[0]], progress=False)
    assert summary.done == [ids[0]] and not summary.failed
    [prediction] = [p for p in label_studio.client().predictions.list(task=ids[0]) if p.model_version == "sam2-scored"]
    instances, info = segment_image_info(sam2_engine, images[0], scores=True)
    assert len(prediction.result) == int(instances.max()) == len(info["scores"]) > 0
    assert [r["score"] for r in prediction.result] == [round(v, 4) for v in info["scores"]]
    assert prediction.score == pytest.approx(np.mean(info["scores"]), abs=1e-4)


def test_scored_task_predictions_import_into_label_studio(label_studio, sam2_engine, tmp_path) -> None:
    """``tasks --prelabel`` with SAM 2: Label Studio imports each task's prediction with its
    regions' scores and the prediction's score as written."""
    from mosaic_toolkit.data.tasks import make_tasks

    client = label_studio.client()
    project = client.projects.create(title="scored tasks", label_config=LABEL_CONFIG)
    image, _ = synth_mosaic(np.random.default_rng(9), 200, 150, tessera_size=24)
    Image.fromarray(image).save(tmp_path / "scored.png")
    out = label_studio.document_root / f"scored-{project.id}"
    tasks = make_tasks([tmp_path / "scored.png"], out, tessera_size=22, engine=sam2_engine, model_version="sam2-scored",
                       max_tesserae=30, document_root=label_studio.document_root, progress=False)
    label_studio.add_local_storage(project.id, out)
    ids = list(client.projects.import_tasks(id=project.id, request=tasks, return_task_ids=True).task_ids)
    assert len(ids) == len(tasks) > 1
    for task_id, task in zip(ids, tasks):
        [written] = task["predictions"]
        [stored] = client.predictions.list(task=task_id)
        assert stored.model_version == "sam2-scored" and stored.score == pytest.approx(written["score"])
        assert [r["score"] for r in stored.result] == [r["score"] for r in written["result"]]


def test_prelabel_errors_are_one_line(label_studio) -> None:
    result = CliRunner().invoke(main, ["prelabel", "--url", label_studio.url, "--api-key", "wrong" * 8,
                                       "--project", "1", "--engine", "classical"])
    assert result.exit_code == 1 and "HTTP 401" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["prelabel", "--url", label_studio.url, "--api-key", label_studio.token,
                                       "--project", "99999", "--engine", "classical"])
    assert result.exit_code == 1 and "project 99999" in result.output


def test_backend_prelabel_job_runs_in_a_worker(label_studio, tmp_path) -> None:
    """POST /prelabel starts the same job in a worker process; GET /jobs shows its progress;
    one job at a time; a second job finds nothing left to do."""
    import time

    from fastapi.testclient import TestClient

    from mosaic_backend.app import create_app
    from mosaic_backend.config import Settings

    client = label_studio.client()
    project = client.projects.create(title="backend prelabel", label_config=LABEL_CONFIG)
    folder = label_studio.document_root / f"job-{project.id}"
    label_studio.add_local_storage(project.id, folder)
    for seed in (41, 42, 43):
        image, _ = synth_mosaic(np.random.default_rng(seed), 200, 160, tessera_size=26)
        Image.fromarray(image).save(folder / f"m{seed}.png")
    ids = client.projects.import_tasks(
        id=project.id, request=[{"image": label_studio.local_file_url(folder / f"m{s}.png")} for s in (41, 42, 43)],
        return_task_ids=True).task_ids
    settings = Settings.from_env({}, engine="classical", models_dir=tmp_path / "models",
                                 label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)

    def finished(http: TestClient, job: str) -> dict:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            [status] = [j for j in http.get("/jobs").json()["jobs"] if j["job"] == job]
            if status["state"] != "running":
                return status
            time.sleep(0.5)
        raise AssertionError(f"job {job} still running")

    with TestClient(create_app(settings)) as http:
        assert http.post("/prelabel", json={"project": "x"}).status_code == 400
        started = http.post("/prelabel", json={"project": project.id}).json()
        assert started["status"] == "started" and started["model_version"] == "classical"
        again = http.post("/prelabel", json={"project": project.id}).json()
        assert again == {"status": "already running", "job": started["job"]}
        status = finished(http, started["job"])
        assert status["state"] == "succeeded", status
        assert (status["done"], status["skipped"], status["failed"], status["total_tasks"]) == (3, 0, 0, 3)
        assert "training" in http.get("/jobs").json()
        stored = client.predictions.list(project=project.id)
        assert sorted(p.task for p in stored) == sorted(ids)
        assert all(p.model_version == "classical" and len(p.result) > 10 for p in stored)

        second = http.post("/prelabel", json={"project": project.id}).json()
        status = finished(http, second["job"])
        assert (status["state"], status["done"], status["skipped"]) == ("succeeded", 0, 3)
        assert (status["finished_tasks"], status["total_tasks"]) == (0, 0)  # nothing left to do, not null
        assert len(client.predictions.list(project=project.id)) == 3
