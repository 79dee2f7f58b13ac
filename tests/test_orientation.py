"""Photographs with an EXIF orientation, and results saved from a rotated editor view.

One synthetic mosaic is stored eight ways: the pixels a camera writes for each EXIF orientation
1..8, each file shown upright by browsers (so by Label Studio's editor). Through ``segment``,
``export`` (brush and polygon annotations made in the displayed frame, as the editor stores
them) and a backend click, every orientation must give exactly the upright image's answer.

Label Studio's rotate button (``image_rotation``): Label Studio 1.23.2 stores every image result
in the image's own frame whatever the view's rotation, and records the angle only. Source:
label-studio, web/libs/editor/src/tags/object/Image/Image.js: ``createSerializedResult`` writes
``original_width: naturalWidth, original_height: naturalHeight, image_rotation: rotation`` next
to the unchanged value; ``rotate()`` changes only ``rotation`` and the zoom position; pointer
positions go through the stage's inverse transform (``fixZoomedCoords``) and
``canvasToInternalX = x / stageWidth * 100``. The frontend bundle Label Studio 1.23.2 ships
(web/dist/apps/labelstudio/358.js) holds ``image_rotation`` exactly once: written, never read.
Results saved while rotated are therefore shaped as here: the same values, ``image_rotation``
90, 180 or 270 (the rotate button turns by 90 degrees; other angles can only come through the
API, and are stored the same way). tests/test_browser_rotation.py checks it in the real editor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image
from scipy import ndimage as ndi

from mosaic_toolkit.core import imageio
from mosaic_toolkit.classical import ClassicalEngine
from mosaic_toolkit.core.dataset import Dataset
from mosaic_toolkit.core.io import read_instances
from mosaic_toolkit.data.export import export_dataset, folder_resolver
from mosaic_toolkit.core.predictions import RESULT_FILE
from mosaic_toolkit.segment import segment_paths
from mosaic_toolkit.data.synth import synth_mosaic

from test_backend import (
    HEIGHT,
    TOKEN,
    WIDTH,
    FakeHost,
    brush_mask,
    centre,
    keypoint,
    predict,
    serve,
    task,
)

ORIENTATIONS = range(1, 9)
INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}  # orient(orient(U, INVERSE[o]), o) == U
ROTATIONS = (90, 180, 270, 45.5)  # as the editor stores them (45.5: only through the API)


@pytest.fixture(scope="module")
def mosaic() -> tuple[np.ndarray, np.ndarray]:
    """The upright mosaic (displayed frame, WIDTH x HEIGHT, not square) and its tesserae."""
    return synth_mosaic(np.random.default_rng(15), WIDTH, HEIGHT, tessera_size=28)


def stored_png(image: np.ndarray, orientation: int) -> bytes:
    """The PNG file a camera would write for ``image`` shown with EXIF ``orientation``."""
    import io

    pixels = np.ascontiguousarray(imageio.orient(image, INVERSE[orientation]))
    exif = Image.Exif()
    exif[imageio.ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory, mosaic) -> Path:
    """o1.png .. o8.png: the mosaic stored in each orientation."""
    folder = tmp_path_factory.mktemp("photos")
    for o in ORIENTATIONS:
        (folder / f"o{o}.png").write_bytes(stored_png(mosaic[0], o))
    stored_shape = Image.open(folder / "o6.png").size
    assert stored_shape == (HEIGHT, WIDTH)  # really stored turned
    return folder


def test_segment_every_orientation_matches_upright(tmp_path, photos, mosaic) -> None:
    """segment: the same instance map as the upright image, in the displayed frame, and
    segment.json records the orientation applied."""
    records = segment_paths([photos], tmp_path / "out", ClassicalEngine(), progress=False)
    result = json.loads((tmp_path / "out" / RESULT_FILE).read_text())
    assert [r["orientation"] for r in result["images"]] == list(ORIENTATIONS)
    reference = read_instances(tmp_path / "out" / "instances" / "o1.png")
    assert reference.shape == (HEIGHT, WIDTH) and reference.max() > 20
    for record in records:
        assert (record["width"], record["height"]) == (WIDTH, HEIGHT)
        instances = read_instances(tmp_path / "out" / "instances" / f"{record['stem']}.png")
        np.testing.assert_array_equal(instances, reference, err_msg=record["stem"])
        overlay = np.asarray(Image.open(tmp_path / "out" / "overlays" / f"{record['stem']}.jpg"))
        assert overlay.shape == (HEIGHT, WIDTH, 3)


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def editor_results(truth: np.ndarray, rotation: float = 0) -> list[dict[str, Any]]:
    """Brush and polygon results for some tesserae, drawn in the displayed frame, shaped as
    Label Studio stores them (``rotation``: the view's angle when they were saved)."""
    results = []
    ids = [k for k in range(1, int(truth.max()) + 1) if (truth == k).sum() > 200][:12]
    for n, k in enumerate(ids):
        base = {"id": f"r{n}", "to_name": "image", "original_width": WIDTH,
                "original_height": HEIGHT, "image_rotation": rotation}
        if n % 2:
            mask = (truth == k).astype(np.uint8) * 255
            results.append({**base, "type": "brushlabels", "from_name": "brush",
                            "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["Tessera"]}})
        else:  # the tessera's bounding box as a polygon, in percent of the displayed size
            rows, cols = ndi.find_objects((truth == k).astype(int))[0]
            x0, x1, y0, y1 = cols.start + 1, cols.stop - 1, rows.start + 1, rows.stop - 1
            points = [[x / WIDTH * 100, y / HEIGHT * 100] for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
            results.append({**base, "type": "polygonlabels", "from_name": "poly",
                            "value": {"points": points, "closed": True, "polygonlabels": ["Tessera"]}})
    return results


def ls_task(tid: int, image: str, results: list[dict]) -> dict:
    return {"id": tid, "project": 1, "data": {"image": f"/data/upload/1/{image}"}, "predictions": [],
            "annotations": [{"id": tid, "result": results, "was_cancelled": False, "ground_truth": False,
                             "created_at": "2024-01-01T09:00:00Z", "updated_at": "2024-01-01T10:00:00Z"}]}


def test_export_every_orientation_and_rotation_matches_upright(tmp_path, photos, mosaic) -> None:
    """export: brush and polygon annotations made in the displayed frame give the upright
    image's instance map for every EXIF orientation; the manifest records the orientation and
    the displayed size. Results saved while the editor's view was rotated (image_rotation
    90/180/270, or any angle set through the API) give the same instance map."""
    _, truth = mosaic
    results = editor_results(truth)
    tasks = [ls_task(o, f"o{o}.png", results) for o in ORIENTATIONS]
    tasks += [ls_task(10 + i, "o6.png", editor_results(truth, rotation)) for i, rotation in enumerate(ROTATIONS)]
    summary = export_dataset(tasks, folder_resolver(photos), tmp_path / "ds")
    assert not summary.skipped and len(summary.samples) == len(tasks)
    data = Dataset.open(tmp_path / "ds")
    reference = data.instances(data.samples[0])
    assert reference.max() == 12
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())["samples"]
    for sample, entry, t in zip(data.samples, manifest, tasks):
        o = int(Path(t["data"]["image"]).stem[1:])
        assert entry["orientation"] == o and (entry["width"], entry["height"]) == (WIDTH, HEIGHT)
        np.testing.assert_array_equal(data.instances(sample), reference, err_msg=sample.stem)
        np.testing.assert_array_equal(data.image(sample), mosaic[0])  # training reads it upright
        assert (tmp_path / "ds" / sample.image).read_bytes() == (photos / f"o{o}.png").read_bytes()


def test_export_names_a_turned_image(tmp_path, mosaic) -> None:
    """A file whose orientation differs from what the editor showed: a size mismatch that says so."""
    from mosaic_toolkit.core.errors import MosaicError

    folder = tmp_path / "img"
    folder.mkdir()
    Image.fromarray(np.ascontiguousarray(mosaic[0].swapaxes(0, 1))).save(folder / "o1.png")  # EXIF lost
    with pytest.raises(MosaicError, match="turned by 90 degrees"):
        export_dataset([ls_task(1, "o1.png", editor_results(mosaic[1]))], folder_resolver(folder), tmp_path / "ds")


# --------------------------------------------------------------------------------------------
# backend
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory, mosaic) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from mosaic_backend.app import create_app
    from mosaic_backend.config import Settings

    files = {f"/data/upload/1/o{o}.png": stored_png(mosaic[0], o) for o in ORIENTATIONS}
    handler = type("LabelStudio", (FakeHost,), {"files": files, "local": {}, "tasks": {}, "cloud": "",
                                                "requests": []})
    server, url = serve(handler)
    settings = Settings.from_env({}, label_studio_url=url, label_studio_api_key=TOKEN,
                                 models_dir=tmp_path_factory.mktemp("models"), engine="classical",
                                 click_region="brush")  # pixel-exact answers to compare
    with TestClient(create_app(settings)) as test_client:
        yield test_client
    server.shutdown()
    server.server_close()


def test_backend_click_every_orientation_and_rotation_matches_upright(client, mosaic) -> None:
    """A click at a tessera of the displayed image answers that tessera, as on the upright
    image, for every EXIF orientation, and from a rotated editor view (image_rotation)."""
    image, _ = mosaic
    instances = ClassicalEngine().segment(image)
    k = int(np.argmax(np.bincount(instances.ravel())[1:])) + 1
    x, y = centre(instances, k)
    expected = ClassicalEngine().predict_point(image, x, y)
    assert expected.any()
    clicks = [(o, keypoint(x, y)) for o in ORIENTATIONS]
    clicks += [(6, {**keypoint(x, y), "image_rotation": r}) for r in ROTATIONS]
    for o, click in clicks:
        response = predict(client, click, tasks=[task(f"/data/upload/1/o{o}.png")])
        assert response.status_code == 200, response.text
        [region] = response.json()["results"][0]["result"]
        assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT)
        np.testing.assert_array_equal(brush_mask(region), expected, err_msg=f"orientation {o}")


def test_backend_prelabels_every_orientation_match_upright(client, mosaic) -> None:
    """Pre-labels (no click) are the upright image's tesserae for every orientation."""
    answers = {}
    for o in (1, 3, 6, 7):
        response = predict(client, tasks=[task(f"/data/upload/1/o{o}.png")])
        assert response.status_code == 200, response.text
        regions = response.json()["results"][0]["result"]
        assert regions and all((r["original_width"], r["original_height"]) == (WIDTH, HEIGHT) for r in regions)
        answers[o] = [r["value"] for r in regions]
    for o in (3, 6, 7):
        assert answers[o] == answers[1], f"orientation {o}"
