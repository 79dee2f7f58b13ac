"""End to end: `mosaic-toolkit export --url --api-key --project` against a real Label Studio server.

One project (the repository's label_config.xml) is shared by the module:

* task 1: a synthetic mosaic annotated with one brush region per tessera (RLE by the SDK's own
  ``mask2rle``), so its exported instance map must equal the synthetic ground truth exactly;
* task 2: another synthetic mosaic with polygon regions for its four largest tesserae (from
  ``cv2.findContours``) plus a keypoint and a box, which are SAM prompts and must be ignored;
* task 3: only a cancelled annotation (holding a real brush region), so it must be skipped.

The images live in a local-files storage of the server and are downloaded by the exporter, so
the test covers the whole path: SDK export, image URL resolution and download, rasterisation,
dataset writing. The error cases (wrong API key, unknown project) check the one-line message.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner, Result
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from labelstudio_server import LabelStudioServer
from mosaic_toolkit.cli import main
from mosaic_toolkit.core.dataset import Dataset, relabel_sequential
from mosaic_toolkit.data.synth import synth_mosaic

pytestmark = pytest.mark.labelstudio

LABEL_CONFIG = Path(__file__).resolve().parents[1] / "label_config.xml"
WIDTH, HEIGHT = 320, 240
POLYGON_TILES = 4  # task 2 outlines this many of its largest tesserae
MIN_POLYGON_IOU = 0.9  # polygon rasterisation is approximate at the tile border


@dataclass
class Project:
    """What the module's Label Studio project holds, with the ground truth to check against."""

    id: int
    brush_task: int
    polygon_task: int
    cancelled_task: int
    brush_image: Path
    brush_truth: np.ndarray  # synthetic instance map of the brush task
    polygon_image: Path
    polygon_tiles: list[np.ndarray]  # boolean masks of the tiles outlined by polygons
    annotations: dict[int, int]  # task id -> id of its (non-cancelled) annotation


# --------------------------------------------------------------------------------------------
# Label Studio results, as the editor would save them
# --------------------------------------------------------------------------------------------
def brush_result(mask: np.ndarray, rid: str) -> dict:
    """A BrushLabels region: the mask RLE-encoded by the SDK (alpha channel = mask)."""
    h, w = mask.shape
    return {
        "id": rid, "type": "brushlabels", "from_name": "brush", "to_name": "image",
        "original_width": w, "original_height": h, "image_rotation": 0,
        "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255),
                  "brushlabels": ["Tessera"]},
    }


def polygon_result(mask: np.ndarray, rid: str) -> dict:
    """A PolygonLabels region outlining a tile: its contour's pixel centres in percent."""
    h, w = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outline = max(contours, key=cv2.contourArea)[:, 0, :]
    points = [[(x + 0.5) / w * 100, (y + 0.5) / h * 100] for x, y in outline.tolist()]
    return {
        "id": rid, "type": "polygonlabels", "from_name": "polygon", "to_name": "image",
        "original_width": w, "original_height": h, "image_rotation": 0,
        "value": {"points": points, "closed": True, "polygonlabels": ["Tessera"]},
    }


def keypoint_result(x: float, y: float, w: int, h: int, rid: str) -> dict:
    """A KeyPointLabels click at pixel (x, y): a SAM prompt, not a tessera."""
    return {
        "id": rid, "type": "keypointlabels", "from_name": "keypoint", "to_name": "image",
        "original_width": w, "original_height": h, "image_rotation": 0,
        "value": {"x": x / w * 100, "y": y / h * 100, "width": 0.5, "keypointlabels": ["Tessera"]},
    }


def box_result(w: int, h: int, rid: str) -> dict:
    """A RectangleLabels box over the whole image: a SAM prompt, not a tessera."""
    return {
        "id": rid, "type": "rectanglelabels", "from_name": "box", "to_name": "image",
        "original_width": w, "original_height": h, "image_rotation": 0,
        "value": {"x": 0, "y": 0, "width": 100, "height": 100, "rotation": 0,
                  "rectanglelabels": ["Tessera"]},
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def run_export(*args: str) -> Result:
    return CliRunner().invoke(main, ["export", *args])


# --------------------------------------------------------------------------------------------
# The shared project and its export
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project(label_studio: LabelStudioServer) -> Project:
    """A project with a brush-annotated, a polygon-annotated and a cancelled task."""
    client = label_studio.client()
    created = client.projects.create(title="export end to end", label_config=LABEL_CONFIG.read_text())
    folder = label_studio.document_root / f"export-{created.id}"
    label_studio.add_local_storage(created.id, folder)

    images, truths = [], []
    for seed, name in ((1, "mosaic one.png"), (2, "mosaic-two.png"), (3, "cancelled.png")):
        image, instances = synth_mosaic(np.random.default_rng(seed), WIDTH, HEIGHT)
        Image.fromarray(image).save(folder / name)
        images.append(folder / name)
        truths.append(instances)
    response = client.projects.import_tasks(
        id=created.id, request=[{"image": label_studio.local_file_url(p)} for p in images],
        return_task_ids=True)
    brush_task, polygon_task, cancelled_task = response.task_ids

    truth = truths[0]
    brush = [brush_result(truth == t, f"b{t}") for t in np.unique(truth[truth > 0])]
    polygon_truth = truths[1]
    ids, areas = np.unique(polygon_truth[polygon_truth > 0], return_counts=True)
    chosen = ids[np.argsort(-areas, kind="stable")[:POLYGON_TILES]]
    tiles = [polygon_truth == t for t in chosen]
    # the keypoint sits on a tile that has no polygon: counted, it would add a tessera
    other = (polygon_truth > 0) & ~np.isin(polygon_truth, chosen)
    rows, cols = np.nonzero(other)
    polygon_results = [polygon_result(tile, f"p{t}") for t, tile in zip(chosen, tiles)]
    # the prompts sit between the tessera regions, as they would after a SAM session
    polygon_results[2:2] = [keypoint_result(cols[0] + 0.5, rows[0] + 0.5, WIDTH, HEIGHT, "k1"),
                            box_result(WIDTH, HEIGHT, "r1")]

    annotations = {
        brush_task: client.annotations.create(id=brush_task, result=brush).id,
        polygon_task: client.annotations.create(id=polygon_task, result=polygon_results).id,
    }
    cancelled = client.annotations.create(
        id=cancelled_task, result=[brush_result(truths[2] > 0, "c1")], was_cancelled=True)
    assert cancelled.was_cancelled, "the server did not store the annotation as cancelled"
    return Project(created.id, brush_task, polygon_task, cancelled_task, images[0], truth,
                   images[1], tiles, annotations)


@pytest.fixture(scope="module")
def exported(label_studio: LabelStudioServer, project: Project,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Dataset]:
    """The CLI run against the project, and the dataset it wrote."""
    out = tmp_path_factory.mktemp("export") / "dataset"
    result = run_export("--url", label_studio.url, "--api-key", label_studio.token,
                        "--project", str(project.id), "--out", str(out))
    assert result.exit_code == 0, result.output
    return result, Dataset.open(out)


def sample_of(dataset: Dataset, task: int):
    [sample] = [s for s in dataset.samples if s.source["task"] == task]
    return sample


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_summary_reports_exported_and_skipped_tasks(project: Project,
                                                    exported: tuple[Result, Dataset]) -> None:
    """Two tasks exported; the cancelled one is listed as skipped, with its reason."""
    result, dataset = exported
    lines = result.stdout.splitlines()
    assert lines[0] == "exported mosaics: 2 (from 2 tasks)"
    assert lines[1] == f"tesserae: {int(project.brush_truth.max()) + POLYGON_TILES}"
    assert lines[2:] == ["skipped tasks: 1", f"  task {project.cancelled_task}: all annotations cancelled"]
    assert "Dataset written to" in result.stderr
    assert len(dataset) == 2


def test_brush_task_equals_the_ground_truth(project: Project, exported: tuple[Result, Dataset]) -> None:
    """One brush region per tessera comes back as exactly the synthetic partition."""
    _, dataset = exported
    sample = sample_of(dataset, project.brush_task)
    instances = dataset.instances(sample)
    expected = relabel_sequential(project.brush_truth)
    assert instances.shape == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(relabel_sequential(instances), expected)
    assert sample.tesserae == int(expected.max())
    np.testing.assert_array_equal(dataset.mask(sample) == 0, expected > 0)
    assert len(dataset.points(sample)) == sample.tesserae


def test_images_are_the_uploaded_files(project: Project, exported: tuple[Result, Dataset]) -> None:
    """The exporter downloads each task image from the server and keeps its bytes unchanged."""
    _, dataset = exported
    for task, uploaded in ((project.brush_task, project.brush_image),
                           (project.polygon_task, project.polygon_image)):
        sample = sample_of(dataset, task)
        assert dataset.image_path(sample).read_bytes() == uploaded.read_bytes()
        assert (sample.width, sample.height) == (WIDTH, HEIGHT)


def test_polygon_task_matches_the_outlined_tiles(project: Project,
                                                 exported: tuple[Result, Dataset]) -> None:
    """Each polygon becomes one tessera close to its tile; the keypoint and the box add none."""
    _, dataset = exported
    sample = sample_of(dataset, project.polygon_task)
    instances = dataset.instances(sample)
    assert sample.tesserae == POLYGON_TILES == int(instances.max())
    matched = set()
    for tile in project.polygon_tiles:
        ids, overlap = np.unique(instances[tile & (instances > 0)], return_counts=True)
        best = int(ids[np.argmax(overlap)])
        score = iou(instances == best, tile)
        assert score >= MIN_POLYGON_IOU, f"tile IoU {score:.3f}"
        matched.add(best)
    assert matched == set(range(1, POLYGON_TILES + 1))


def test_manifest_records_the_source_and_the_skipped_task(
        project: Project, exported: tuple[Result, Dataset]) -> None:
    """Every sample names its project, task, annotation and image; skipped tasks are listed."""
    _, dataset = exported
    manifest = json.loads((dataset.root / "manifest.json").read_text())
    assert manifest["source"] == "label-studio"
    assert manifest["skipped"] == [{"task": project.cancelled_task, "reason": "all annotations cancelled"}]
    sources = {s.source["task"]: s.source for s in dataset.samples}
    assert sources == {
        project.brush_task: {"task": project.brush_task, "annotation": project.annotations[project.brush_task],
                             "image": "mosaic one.png", "project": project.id},
        project.polygon_task: {"task": project.polygon_task,
                               "annotation": project.annotations[project.polygon_task],
                               "image": "mosaic-two.png", "project": project.id},
    }
    stems = {s.source["task"]: s.stem for s in dataset.samples}
    assert stems == {project.brush_task: f"task{project.brush_task}_mosaic_one",
                     project.polygon_task: f"task{project.polygon_task}_mosaic-two"}


def assert_clean_failure(result: Result, out: Path, *fragments: str) -> None:
    """Exit status 1, one line on stderr naming the problem, no traceback, nothing written."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith("Error: ")
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_wrong_api_key_is_a_one_line_error(label_studio: LabelStudioServer, project: Project,
                                           tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    result = run_export("--url", label_studio.url, "--api-key", "0" * 40,
                        "--project", str(project.id), "--out", str(out))
    assert_clean_failure(result, out, label_studio.url, f"project {project.id}", "HTTP 401: Invalid token.")


def test_unknown_project_is_a_one_line_error(label_studio: LabelStudioServer, project: Project,
                                             tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    missing = project.id + 1000
    result = run_export("--url", label_studio.url, "--api-key", label_studio.token,
                        "--project", str(missing), "--out", str(out))
    assert_clean_failure(result, out, label_studio.url, f"project {missing}", "HTTP 404: not found")


def test_localhost_warning_is_printed_once(label_studio: LabelStudioServer, project: Project,
                                           tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With --url http://localhost:PORT the SDK warns that localhost is not reachable from a
    docker container on every image download; the export lets that warning through once."""
    out = tmp_path / "dataset"
    url = label_studio.url.replace("127.0.0.1", "localhost")
    with caplog.at_level("WARNING"):
        result = run_export("--url", url, "--api-key", label_studio.token,
                            "--project", str(project.id), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "exported mosaics: 2 (from 2 tasks)"
    warnings = [r for r in caplog.records if "localhost" in r.getMessage() and "docker" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
