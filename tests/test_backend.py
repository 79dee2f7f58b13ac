"""The ML backend (mosaic_backend) over HTTP, with real engines and a stand-in Label Studio host.

The app runs in FastAPI's TestClient. Images come from a small HTTP server on 127.0.0.1 that
plays the Label Studio host (uploads, local files, the task API, the cloud presign redirect; it
refuses requests without the API token), so the fetching rules are exercised over real HTTP.
Engines are real: the classical engine, whose clicks are checked against
``ClassicalEngine.predict_point`` and whose pre-labels against ``segment_image``, and SAM 2.1
tiny with random weights (tests/fixtures_sam2.py) at 256 px, with its full-image filters opened
so that random masks pass (``SAM_PARAMS``). The end-to-end tests with a real Label Studio are in
test_backend_labelstudio.py.
"""
from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from mosaic_backend.app import create_app
from mosaic_backend.cli import command as cli_command
from mosaic_backend.config import Settings, settings_table
from mosaic_backend.errors import BackendError
from mosaic_backend.images import LabelStudioLink, local_files_path
from mosaic_backend.labelconfig import parse_label_config
from mosaic_backend.metrics import percentile
from mosaic_backend.predict import CLICK_WINDOW, Deadline, click_window
from mosaic_backend.regions import Prompt
from mosaic_backend.service import Backend
from mosaic_backend.jobs import should_promote
from mosaic_backend.worker import store_version
from mosaic_backend.versions import EngineManager, ModelStore
from mosaic_toolkit.classical import ClassicalEngine
from mosaic_toolkit.data.export import rasterise_region
from mosaic_toolkit.segment import segment_image
from mosaic_toolkit.data.synth import synth_mosaic

from fixtures_sam2 import random_weight_params

LABEL_CONFIG = (Path(__file__).resolve().parents[1] / "label_config.xml").read_text()
BRUSH_ONLY = """<View><Image name="img" value="$picture"/>
  <BrushLabels name="mask" toName="img"><Label value="Tessera"/><Label value="Other"/></BrushLabels>
  <KeyPointLabels name="kp" toName="img" smart="true"><Label value="Other"/></KeyPointLabels></View>"""
POLYGON_ONLY = """<View><Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="Tessera"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Tessera"/></KeyPointLabels></View>"""
TOKEN = "0123456789abcdef0123456789abcdef01234567"
WIDTH, HEIGHT = 256, 192
# Random weights: open the full-image filters so masks pass (as bench/bench_engine.py does).
SAM_PARAMS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "stability_score_offset": 0.05,
              "mask_threshold": 0.05, "points_per_side": 8}


# --------------------------------------------------------------------------------------------
# A stand-in Label Studio host and a "cloud" host
# --------------------------------------------------------------------------------------------
class FakeHost(BaseHTTPRequestHandler):
    """Serves ``files`` (path -> bytes), ``local`` (local-files d -> bytes) and ``tasks``; needs
    the API token like Label Studio; redirects the presign endpoint to ``cloud``."""

    files: dict[str, bytes]
    local: dict[str, bytes]
    tasks: dict[int, dict]
    cloud: str
    requests: list[tuple[str, str | None]]
    token_required = True

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        auth = self.headers.get("Authorization")
        self.requests.append((self.path, auth))
        if self.token_required and auth != f"Token {TOKEN}":
            return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path in self.files:
            return self._send(200, self.files[parts.path])
        if parts.path == "/data/local-files/" and query.get("d", [""])[-1] in self.local:
            return self._send(200, self.local[query["d"][-1]])
        if parts.path.startswith("/api/tasks/"):
            task = self.tasks.get(int(parts.path.split("/")[3]))
            return self._send(200, json.dumps(task).encode()) if task else self._send(404, b"{}")
        if parts.path.endswith("/presign/"):
            uri = base64.urlsafe_b64decode(query["fileuri"][0]).decode()
            return self._send(303, headers={"Location": self.cloud + "/" + uri.split("://", 1)[1]})
        return self._send(404, b"not found")

    def log_message(self, *args: Any) -> None:
        """Quiet."""


def serve(handler: type) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def mosaic() -> tuple[np.ndarray, np.ndarray]:
    return synth_mosaic(np.random.default_rng(1), WIDTH, HEIGHT, tessera_size=28)


@pytest.fixture(scope="module")
def hosts(mosaic) -> Iterator[dict[str, Any]]:
    """The Label Studio stand-in and the cloud host, with the mosaic under several URLs."""
    image, _ = mosaic
    data = png(image)
    cloud_requests: list = []
    cloud_handler = type("Cloud", (FakeHost,), {
        "files": {"/bucket/mosaic.png": data}, "local": {}, "tasks": {}, "cloud": "",
        "requests": cloud_requests, "token_required": False})
    cloud, cloud_url = serve(cloud_handler)
    ls_requests: list = []
    handler = type("LabelStudio", (FakeHost,), {
        "files": {"/data/upload/1/mosaic.png": data, "/data/upload/1/notes.txt": b"not an image"},
        "local": {"project/mosaic.png": data},
        "tasks": {7: {"id": 7, "data": {"image": "/data/upload/1/mosaic.png"}}},
        "cloud": cloud_url, "requests": ls_requests})
    server, url = serve(handler)
    yield {"url": url, "requests": ls_requests, "cloud_requests": cloud_requests}
    for s in (server, cloud):
        s.shutdown()
        s.server_close()


def make_client(tmp_path_factory: pytest.TempPathFactory, hosts: dict[str, Any], **overrides: Any) -> TestClient:
    settings = Settings.from_env({}, label_studio_url=hosts["url"], label_studio_api_key=TOKEN,
                                 models_dir=tmp_path_factory.mktemp("models"), **overrides)
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def classical(tmp_path_factory, hosts) -> Iterator[TestClient]:
    # fineness 1: polygons are exact pixel outlines, so answers compare pixel for pixel
    with make_client(tmp_path_factory, hosts, engine="classical", polygon_iou=1.0,
                     click_polygon_iou=1.0) as client:
        yield client


@pytest.fixture(scope="module")
def sam(tmp_path_factory, hosts, tiny_sam2_checkpoint) -> Iterator[TestClient]:
    # clicks answered as brush masks (MOSAIC_BACKEND_CLICK_REGION=brush): SAM 2's own pixels
    with make_client(tmp_path_factory, hosts, engine="sam2", model=str(tiny_sam2_checkpoint),
                     image_size=256, generator_params=SAM_PARAMS, click_region="brush") as client:
        yield client


def task(image: str = "/data/upload/1/mosaic.png", tid: int = 1, key: str = "image") -> dict:
    # predictions and annotations as Label Studio sends them along (ignored by the backend)
    return {"id": tid, "data": {key: image}, "annotations": [{"result": [{"type": "brushlabels"}]}],
            "predictions": []}


def keypoint(x: float, y: float, positive: bool = True, label: str = "Tessera", name: str = "keypoint") -> dict:
    """A smart keypoint click at pixel (x, y) of the test mosaic, in percent as Label Studio sends it."""
    return {"id": "k1", "type": "keypointlabels", "from_name": name, "to_name": "image",
            "original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0, "is_positive": positive,
            "value": {"x": x / WIDTH * 100, "y": y / HEIGHT * 100, "width": 0.6, "keypointlabels": [label]}}


def rectangle(x0: float, y0: float, x1: float, y1: float) -> dict:
    return {"id": "r1", "type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0,
            "value": {"x": x0 / WIDTH * 100, "y": y0 / HEIGHT * 100, "width": (x1 - x0) / WIDTH * 100,
                      "height": (y1 - y0) / HEIGHT * 100, "rotation": 0, "rectanglelabels": ["Tessera"]}}


def predict(client: TestClient, *prompts: dict, tasks: list | None = None, config: str = LABEL_CONFIG,
            **extra: Any):
    context = {"result": list(prompts)} if prompts else None
    body = {"tasks": tasks or [task()], "project": "1.1700000000", "label_config": config,
            "params": {"login": None, "password": None, "context": context}, **extra}
    return client.post("/predict", json=body)


def brush_mask(region: dict) -> np.ndarray:
    """The pixels of a brush region, or of a polygon region by the exporter's rule."""
    h, w = region["original_height"], region["original_width"]
    if region["type"] == "polygonlabels":
        return rasterise_region(1, region, w, h)
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def answer_mask(result: list[dict]) -> np.ndarray:
    """The union of an answer's regions (a box may select several tesserae: one polygon each)."""
    masks = [brush_mask(r) for r in result]
    assert masks and not np.any(np.sum(masks, axis=0) > 1)  # no pixel in two regions
    return np.any(masks, axis=0)


def centre(instances: np.ndarray, k: int) -> tuple[float, float]:
    """An interior point of tessera k (the pixel farthest from its border), as pixel-centre x, y."""
    from scipy import ndimage as ndi

    dist = ndi.distance_transform_edt(np.pad(instances == k, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return c + 0.5, r + 0.5


def middle_tessera(instances: np.ndarray) -> int:
    """The tessera whose interior point is nearest the image centre."""
    h, w = instances.shape
    return min(range(1, int(instances.max()) + 1),
               key=lambda k: np.hypot(centre(instances, k)[0] - w / 2, centre(instances, k)[1] - h / 2))


@pytest.fixture(scope="module")
def classical_instances(mosaic) -> np.ndarray:
    return segment_image(ClassicalEngine(), mosaic[0])


# --------------------------------------------------------------------------------------------
# Protocol basics
# --------------------------------------------------------------------------------------------
def test_health_setup_and_versions(classical: TestClient) -> None:
    """/ and /health say UP with the model version; /setup answers it at once; /versions lists it."""
    for path in ("/", "/health"):
        answer = classical.get(path).json()
        assert answer["status"] == "UP" and answer["model_version"] == "classical", answer
    started = time.perf_counter()
    setup = classical.post("/setup", json={"project": "1.1700000000", "schema": LABEL_CONFIG,
                                           "hostname": "http://elsewhere:8080", "access_token": "x",
                                           "extra_params": None})
    assert time.perf_counter() - started < 1.0
    assert setup.json() == {"model_version": "classical"}
    versions = classical.get("/versions").json()
    assert versions["versions"] == ["classical"] and versions["current"] == "classical"


def test_setup_hostname_is_used_only_when_not_configured() -> None:
    """Label Studio's /setup hostname and token fill in what the settings leave open, never more."""
    configured = LabelStudioLink("http://ls:8080", "key")
    configured.update_from_setup("http://other:1", "other")
    assert (configured.url, configured.api_key) == ("http://ls:8080", "key")
    address_only = LabelStudioLink("http://ls:8080", None)
    address_only.update_from_setup("http://localhost:8080", "token")
    assert (address_only.url, address_only.api_key) == ("http://ls:8080", "token")
    learned = LabelStudioLink(None, None)
    with pytest.raises(BackendError, match="set LABEL_STUDIO_URL"):
        learned.require("task 1")
    learned.update_from_setup("http://ls:8080/", "token")
    assert learned.require("task 1") == ("http://ls:8080", "token")


# --------------------------------------------------------------------------------------------
# Classical engine
# --------------------------------------------------------------------------------------------
def test_classical_click_returns_the_tessera_under_it(classical, mosaic, classical_instances) -> None:
    """A click answers with one polygon region (the config has PolygonLabels): exactly
    ClassicalEngine.predict_point's tessera."""
    image, _ = mosaic
    k = int(np.argmax(np.bincount(classical_instances.ravel())[1:])) + 1
    x, y = centre(classical_instances, k)
    response = predict(classical, keypoint(x, y))
    assert response.status_code == 200, response.text
    [answer] = response.json()["results"]
    [region] = answer["result"]
    assert answer["model_version"] == "classical" and answer["score"] is None
    assert region["type"] == "polygonlabels" and region["from_name"] == "polygon" and region["to_name"] == "image"
    assert region["value"]["polygonlabels"] == ["Tessera"]
    assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT)
    expected = ClassicalEngine().predict_point(image, x, y)
    np.testing.assert_array_equal(brush_mask(region), expected)
    np.testing.assert_array_equal(brush_mask(region), classical_instances == k)


def test_classical_click_on_grout_takes_the_nearest_tessera(classical, classical_instances) -> None:
    """A click on grout next to a single tessera selects that tessera."""
    inst = classical_instances
    h, w = inst.shape
    for r, c in zip(*np.nonzero(inst == 0)):
        near = inst[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3]
        ids = set(np.unique(near)) - {0}
        if 2 < r < h - 3 and 2 < c < w - 3 and len(ids) == 1 and inst[r, c + 1] > 0:
            break
    [region] = predict(classical, keypoint(c + 0.5, r + 0.5)).json()["results"][0]["result"]
    np.testing.assert_array_equal(brush_mask(region), inst == inst[r, c + 1])


def test_classical_box_and_negative_clicks(classical, classical_instances) -> None:
    """A box takes the tesserae at least half inside it, merged; a negative click removes one."""
    from scipy import ndimage as ndi

    slices = ndi.find_objects(classical_instances)
    a, b = 3, 4
    boxes = [slices[a - 1], slices[b - 1]]
    y0, x0 = min(s[0].start for s in boxes), min(s[1].start for s in boxes)
    y1, x1 = max(s[0].stop for s in boxes), max(s[1].stop for s in boxes)
    inside = np.bincount(classical_instances[y0:y1, x0:x1].ravel(), minlength=classical_instances.max() + 1)
    area = np.bincount(classical_instances.ravel())
    chosen = [k for k in range(1, len(area)) if inside[k] >= 0.5 * area[k]]
    assert a in chosen and b in chosen
    result = predict(classical, rectangle(x0, y0, x1, y1)).json()["results"][0]["result"]
    np.testing.assert_array_equal(answer_mask(result), np.isin(classical_instances, chosen))

    xa, ya = centre(classical_instances, a)
    minus = predict(classical, rectangle(x0, y0, x1, y1), keypoint(xa, ya, positive=False))
    result = minus.json()["results"][0]["result"]
    np.testing.assert_array_equal(answer_mask(result), np.isin(classical_instances, [k for k in chosen if k != a]))

    inner = predict(classical, rectangle(xa - 2, ya - 2, xa + 2, ya + 2))  # a box inside one tessera
    np.testing.assert_array_equal(brush_mask(inner.json()["results"][0]["result"][0]), classical_instances == a)


def test_classical_prelabels_are_one_exact_polygon_per_tessera(classical, classical_instances) -> None:
    """Without context: one PolygonLabels region per tessera, each rasterising (the exporter's
    rule) to exactly that tessera of the tiled classical segmentation."""
    response = predict(classical)
    assert response.status_code == 200, response.text
    [answer] = response.json()["results"]
    regions = answer["result"]
    assert len(regions) == classical_instances.max() > 20
    assert answer["model_version"] == "classical"
    for k, region in enumerate(regions, start=1):
        assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["Tessera"]
        np.testing.assert_array_equal(rasterise_region(1, region, WIDTH, HEIGHT), classical_instances == k)


def test_light_polygons_at_the_default_fineness(tmp_path_factory, hosts, classical_instances) -> None:
    """MOSAIC_BACKEND_POLYGON_IOU=0.97 (the default): pre-label polygons keep IoU >= 0.97 with
    their tessera, take no neighbour's pixel, carry far fewer vertices than the exact outlines,
    and /metrics reports the vertices per region."""
    with make_client(tmp_path_factory, hosts, engine="classical") as light:
        assert light.app.state.backend.settings.polygon_iou == 0.97
        regions = predict(light).json()["results"][0]["result"]
        assert len(regions) == classical_instances.max()
        owner = np.zeros(classical_instances.shape, np.int32)
        for k, region in enumerate(regions, start=1):
            pixels = rasterise_region(1, region, WIDTH, HEIGHT)
            truth = classical_instances == k
            assert (pixels & truth).sum() / (pixels | truth).sum() >= 0.97
            assert not np.any(pixels & (classical_instances > 0) & ~truth)  # no neighbour's pixel
            owner[pixels] += 1
        vertices = [len(r["value"]["points"]) for r in regions]
        assert np.median(vertices) <= 16, vertices  # measured 12.5 (exact outlines: several times more)
        summary = light.get("/metrics", params={"format": "json"}).json()["polygon_vertices"]
        assert summary["regions"] == len(regions) and summary["vertices_total"] == sum(vertices)
        assert summary["p50"] == np.median(vertices)
        assert "mosaic_backend_polygon_vertices_count %d" % len(regions) in light.get("/metrics").text


def test_click_polygons_are_finer_than_prelabels(tmp_path_factory, hosts, classical_instances) -> None:
    """A click is answered at MOSAIC_BACKEND_CLICK_POLYGON_IOU (default 1: the mask's exact
    outline, finer than pre-labels: one region, where an outline pixel is worth much of a
    tessera's IoU)."""
    with make_client(tmp_path_factory, hosts, engine="classical") as client:
        assert client.app.state.backend.settings.click_polygon_iou == 1.0
        ious = []
        for k in range(1, int(classical_instances.max()) + 1, 3):
            ys, xs = np.nonzero(classical_instances == k)
            centre = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
            [region] = predict(client, keypoint(xs[centre] + 0.5, ys[centre] + 0.5)).json()["results"][0]["result"]
            pixels, truth = rasterise_region(1, region, WIDTH, HEIGHT), classical_instances == k
            ious.append((pixels & truth).sum() / (pixels | truth).sum())
        assert min(ious) == 1.0, ious
    with pytest.raises(BackendError, match="click_polygon_iou"):
        Settings.from_env({"MOSAIC_BACKEND_CLICK_POLYGON_IOU": "1.5"})
    assert Settings.from_env({}).click_mask_threshold == 0.5
    with pytest.raises(BackendError, match="click_mask_threshold"):
        Settings.from_env({"MOSAIC_BACKEND_CLICK_MASK_THRESHOLD": "nan"})


def test_other_configs_brush_only_and_polygon_only(classical, classical_instances) -> None:
    """Brush-only configs get brush pre-labels (and the config's own names and data key);
    polygon-only configs get a polygon for a click."""
    brush = predict(classical, tasks=[task(key="picture")], config=BRUSH_ONLY).json()["results"][0]["result"]
    assert len(brush) == classical_instances.max()
    assert all(r["type"] == "brushlabels" and r["from_name"] == "mask" and r["to_name"] == "img" for r in brush)
    np.testing.assert_array_equal(brush_mask(brush[4]), classical_instances == 5)

    x, y = centre(classical_instances, 5)
    clicked = predict(classical, {**keypoint(x, y, label="Other", name="kp"), "to_name": "img"},
                      tasks=[task(key="picture")], config=BRUSH_ONLY).json()
    assert clicked["results"][0]["result"][0]["value"]["brushlabels"] == ["Other"]  # the clicked label

    [polygon] = predict(classical, {**keypoint(x, y), "from_name": "kp"},
                        config=POLYGON_ONLY).json()["results"][0]["result"]
    assert polygon["type"] == "polygonlabels" and polygon["from_name"] == "poly"
    np.testing.assert_array_equal(rasterise_region(1, polygon, WIDTH, HEIGHT), classical_instances == 5)


def test_large_click_payload_is_fast(classical, classical_instances) -> None:
    """A click whose task carries ~1 MB of earlier regions is answered in well under a second."""
    regions = predict(classical).json()["results"][0]["result"]
    heavy = task()
    heavy["annotations"] = [{"result": regions * 12}]
    heavy["predictions"] = [{"result": regions * 12}]
    size = len(json.dumps(heavy))
    assert size > 1_000_000
    x, y = centre(classical_instances, 5)
    predict(classical, keypoint(x, y), tasks=[heavy])  # warm
    started = time.perf_counter()
    response = predict(classical, keypoint(x, y), tasks=[heavy])
    assert response.status_code == 200
    assert time.perf_counter() - started < 1.0


# --------------------------------------------------------------------------------------------
# SAM 2 (random-weight tiny)
# --------------------------------------------------------------------------------------------
def test_sam2_first_click_encodes_later_clicks_only_decode(sam, mosaic) -> None:
    """The first click encodes the image (one cache entry), later clicks reuse it; the region is
    the engine's own mask for the click (pieces under the click) in a brush RLE."""
    image, truth = mosaic
    engine = sam.app.state.backend.engines.active
    engine.clear_cache()
    x, y = centre(truth, middle_tessera(truth))
    first = predict(sam, keypoint(x, y))
    assert first.status_code == 200, first.text
    assert len(engine.cached_keys()) == 1
    second = predict(sam, keypoint(x + 3, y))
    assert len(engine.cached_keys()) == 1
    [answer] = first.json()["results"]
    assert answer["model_version"] == "sam2.1-tiny" and isinstance(answer["score"], float)
    threshold = sam.app.state.backend.settings.click_mask_threshold
    expected, score = engine.predict_points(image, [[x, y]], [1], threshold=threshold)
    from mosaic_backend.predict import keep_clicked

    expected = keep_clicked(expected, np.array([[x, y]]))
    if expected.any():
        [region] = answer["result"]
        assert region["type"] == "brushlabels" and region["from_name"] == "brush"
        np.testing.assert_array_equal(brush_mask(region), expected)
        assert region["score"] == pytest.approx(score, abs=1e-4)
    assert second.json()["results"][0]["model_version"] == "sam2.1-tiny"


def test_sam2_box_and_negative_click(sam, mosaic) -> None:
    """Box prompts and Alt-click negatives reach the engine: the answer equals its own."""
    image, truth = mosaic
    engine = sam.app.state.backend.engines.active
    x, y = centre(truth, middle_tessera(truth))
    response = predict(sam, rectangle(x - 15, y - 15, x + 15, y + 15), keypoint(x, y), keypoint(x + 12, y, False))
    assert response.status_code == 200, response.text
    expected, _ = engine.predict_points(image, [[x, y], [x + 12, y]], [1, 0], box=[x - 15, y - 15, x + 15, y + 15],
                                      threshold=sam.app.state.backend.settings.click_mask_threshold)
    from mosaic_backend.predict import keep_clicked

    expected = keep_clicked(expected, np.array([[x, y]]))
    result = response.json()["results"][0]["result"]
    np.testing.assert_array_equal(brush_mask(result[0]) if result else np.zeros_like(expected), expected)


def test_sam2_prelabels_with_scores(sam, mosaic) -> None:
    """Pre-labels: one polygon per tessera of the engine's tiled segmentation, each with SAM 2's
    predicted IoU as its score; the prediction's score is their mean."""
    image, _ = mosaic
    engine = sam.app.state.backend.engines.active
    expected = segment_image(engine, image)
    response = predict(sam)
    assert response.status_code == 200, response.text
    [answer] = response.json()["results"]
    assert len(answer["result"]) == expected.max() > 1
    scores = [r["score"] for r in answer["result"]]
    assert all(isinstance(s, float) for s in scores)
    assert answer["score"] == pytest.approx(np.mean(scores), abs=1e-3)
    from scipy import ndimage as ndi

    fine = 0
    for k, region in enumerate(answer["result"], start=1):
        drawn = rasterise_region(1, region, WIDTH, HEIGHT)
        tessera = ndi.binary_fill_holes(expected == k)  # polygons have no holes
        assert (drawn & tessera).sum() / (drawn | tessera).sum() > 0.9
        assert not np.any(drawn & (expected > 0) & (expected != k))  # no neighbour's pixel
        fine += (drawn & tessera).sum() / (drawn | tessera).sum() >= 0.97  # the default fineness
    assert fine >= 0.8 * len(answer["result"])  # random weights make a few ragged shapes


def test_click_window_on_large_images() -> None:
    """Images up to CLICK_WINDOW a side are used whole; on larger ones the window holding the
    prompts farthest from its inner borders is used."""
    small = Prompt(np.array([[10.0, 10.0]]), np.array([1]), None, None)
    assert click_window((900, 1000), small) == (0, 0, 900, 1000)
    right = Prompt(np.array([[1500.0, 300.0]]), np.array([1]), None, None)
    y0, x0, y1, x1 = click_window((600, 1700), right)
    assert (y0, y1) == (0, 600) and x1 == 1700 and x1 - x0 == CLICK_WINDOW
    # windows [0, 1024) and [676, 1700): x = 1000 is 24 px from the first's inner border and
    # 324 px from the second's
    near_seam = Prompt(np.array([[1000.0, 300.0]]), np.array([1]), None, None)
    assert click_window((600, 1700), near_seam) == (0, 676, 600, 1700)
    boxed = Prompt(np.array([[350.0, 300.0]]), np.array([1]), np.array([300.0, 250, 980, 350]), None)
    assert click_window((600, 1700), boxed) == (0, 0, 600, 1024)
    too_wide = Prompt(np.array([[10.0, 10.0], [1690.0, 10.0]]), np.array([1, 1]), None, None)
    assert click_window((600, 1700), too_wide) == (0, 0, 600, 1700)  # no window holds both


def test_sam2_clicks_use_the_prelabel_tiles_and_their_encodings(sam2_engine) -> None:
    """On an image larger than one pre-label tile, a click is decoded in a tile of the pre-label
    grid (about 100 tesserae at the estimated scale): after a pre-label, clicks anywhere run no
    image encoder; the click's window is one of the tiles and holds the click."""
    from mosaic_backend.predict import Predictor
    from mosaic_toolkit.core.tiling import plan_tiles, resolve_tiling

    image, truth = synth_mosaic(np.random.default_rng(4), 900, 420, style="irregular",
                                tessera_size=24)
    tile, overlap = resolve_tiling(image)
    assert tile < 900  # several tiles: ~100 tesserae of ~24 px need ~240-300 px
    tiles = plan_tiles(420, 900, tile, overlap)
    predictor = Predictor(cache_bytes=1 << 26, prelabel_scores=False)
    assert predictor.tiling(image, "img") == (tile, overlap)
    sam2_engine.clear_cache()
    predictor.prelabel(sam2_engine, image, "img", Deadline.after(600, "task 1"))
    encoded = set(sam2_engine.cached_keys())
    assert len(encoded) == len(tiles)
    for k in (1, truth.max() // 2, truth.max()):
        x, y = centre(truth, int(k))
        prompt = Prompt(np.array([[x, y]]), np.array([1]), None, None)
        window = click_window(image.shape[:2], prompt, tile, overlap)
        assert window in tiles
        y0, x0, y1, x1 = window
        assert x0 <= x < x1 and y0 <= y < y1
        mask, score = predictor.click(sam2_engine, image, "img", prompt)
        assert mask.shape == truth.shape and isinstance(score, float)
        assert not mask[:y0].any() and not mask[y1:].any()
        assert not mask[:, :x0].any() and not mask[:, x1:].any()
        assert set(sam2_engine.cached_keys()) == encoded  # no encoder run for the click


def test_guided_prelabel_scores_need_no_second_decoding(sam2_engine, monkeypatch) -> None:
    """SAM 2's guided pre-labels score every region with the prediction of the outline painted:
    one score per region, and no prompt is decoded again once the map is made. With scores off
    (MOSAIC_BACKEND_PRELABEL_SCORES=0), the same map and no scores."""
    from mosaic_backend.predict import Predictor

    image, _ = synth_mosaic(np.random.default_rng(4), 420, 300, style="irregular", tessera_size=24)
    assert sam2_engine.params.method == "guided"
    decoded = []
    decode_points = sam2_engine.decode_points
    monkeypatch.setattr(sam2_engine, "decode_points", lambda *a, **k: decoded.append(a) or decode_points(*a, **k))
    instances, scores = Predictor(cache_bytes=1 << 26).prelabel(sam2_engine, image, "img", Deadline.after(600, "task 1"))
    assert decoded == []
    assert int(instances.max()) > 0 and len(scores) == int(instances.max())
    assert all(np.isfinite(scores))
    plain, none = Predictor(cache_bytes=1 << 26, prelabel_scores=False).prelabel(
        sam2_engine, image, "img", Deadline.after(600, "task 1"))
    assert none is None and np.array_equal(plain, instances)


@pytest.mark.parametrize("method", ["fast", "stock"])
def test_sam2_prelabels_speck_floor_follows_the_image_scale(sam2_engine, method) -> None:
    """Pre-labels on SAM 2's fast and stock paths drop specks by the image's tessera size: a
    min_area tuned far above it (on coarser tesserae) does not wipe out the image."""
    import dataclasses

    from mosaic_backend.predict import Predictor
    from mosaic_toolkit.sam.engine import Sam2Engine

    image, _ = synth_mosaic(np.random.default_rng(4), 420, 300, style="irregular", tessera_size=24)
    params = dataclasses.replace(random_weight_params(sam2_engine, image, method=method), min_area=10**6)
    engine = Sam2Engine(sam2_engine.model, version="floor", params=params)
    instances, _ = Predictor(cache_bytes=1 << 26).prelabel(engine, image, "img", Deadline.after(600, "task 1"))
    assert int(instances.max()) > 0


def test_prelabel_timeout_is_a_clear_error(tmp_path_factory, hosts) -> None:
    """A pre-label that cannot finish within the predict timeout stops with a 504 JSON error."""
    with make_client(tmp_path_factory, hosts, engine="classical", predict_timeout=1e-6) as client:
        response = predict(client)
        assert response.status_code == 504
        assert "predict timeout" in response.json()["error"]
        assert client.get("/health").json()["status"] == "UP"


# --------------------------------------------------------------------------------------------
# Bad requests
# --------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("not json", "{tasks:", 400, "not valid JSON"),
    ("not an object", [1, 2], 400, "predict: Expected `object`, got `array`"),
    ("tasks not a list", {"tasks": "all"}, 400, "Expected `array | null`, got `str` - at `$.tasks`"),
    ("no tasks", {"tasks": [], "label_config": LABEL_CONFIG}, 400, "non-empty list of tasks"),
    ("task without data", {"tasks": [{"id": 3}], "label_config": LABEL_CONFIG}, 400, "must be an object with 'data'"),
    ("no image", {"tasks": [{"id": 3, "data": {"text": "x"}}], "label_config": LABEL_CONFIG}, 400,
     "task 3: no image: its data has no 'image' field"),
    ("unknown task", {"tasks": [999], "label_config": LABEL_CONFIG}, 404, "task 999: not found on Label Studio"),
    ("missing image", {"tasks": [task("/data/upload/1/gone.png")], "label_config": LABEL_CONFIG}, 404,
     "not found on Label Studio (HTTP 404"),
    ("not an image", {"tasks": [task("/data/upload/1/notes.txt")], "label_config": LABEL_CONFIG}, 400,
     "not a readable image"),
    ("foreign host", {"tasks": [task("http://example.com/a.png")], "label_config": LABEL_CONFIG}, 400,
     "is not on the Label Studio host"),
    ("data url", {"tasks": [task("data:image/png;base64,AAAA")], "label_config": LABEL_CONFIG}, 400,
     "is not a Label Studio URL"),
    ("escaping local file", {"tasks": [task("/data/local-files/?d=../../etc/passwd")], "label_config": LABEL_CONFIG},
     400, "escapes the document root"),
    ("no label config", {"tasks": [task()], "project": "55.1"}, 400, "label config: missing"),
    ("config without image", {"tasks": [task()], "label_config": "<View><Text name='t' value='$t'/></View>"},
     400, "no <Image> tag"),
    ("context not an object", {"tasks": [task()], "label_config": LABEL_CONFIG, "params": {"context": [1]}},
     400, "context: expected an object with a 'result' list"),
    ("context result not a list", {"tasks": [task()], "label_config": LABEL_CONFIG,
                                   "params": {"context": {"result": "x"}}}, 400, "'result' must be a list"),
    ("no prompt", {"tasks": [task()], "label_config": LABEL_CONFIG, "params": {"context": {"result": []}}},
     400, "no keypoint or rectangle prompt"),
    ("x not a number", {"tasks": [task()], "label_config": LABEL_CONFIG, "params": {"context": {"result": [
        {**keypoint(10, 10), "value": {"x": "left", "y": 3}}]}}}, 400, "value.x: expected a finite number"),
    ("is_positive not a bool", {"tasks": [task()], "label_config": LABEL_CONFIG, "params": {"context": {
        "result": [{**keypoint(10, 10), "is_positive": "yes"}]}}}, 400, "is_positive: expected true or false"),
    ("click outside", {"tasks": [task()], "label_config": LABEL_CONFIG, "params": {"context": {"result": [
        keypoint(WIDTH * 1.2, 10)]}}}, 400, "lies outside the image"),
    ("box outside", {"tasks": [task()], "label_config": LABEL_CONFIG, "params": {"context": {"result": [
        rectangle(-80, -80, -10, -10)]}}}, 400, "lies outside the image"),
    ("only negative clicks", {"tasks": [task()], "label_config": LABEL_CONFIG, "params": {"context": {
        "result": [keypoint(10, 10, positive=False)]}}}, 400, "add a positive click or a box"),
    ("two tasks with context", {"tasks": [task(), task()], "label_config": LABEL_CONFIG, "params": {
        "context": {"result": [keypoint(10, 10)]}}}, 400, "takes one task"),
    ("unknown version", {"tasks": [task()], "label_config": LABEL_CONFIG, "model_version": "v99"}, 404,
     "model version 'v99'"),
]


@pytest.mark.parametrize("body,status,message", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_clear_json_errors(classical, body, status, message) -> None:
    response = classical.post("/predict", content=body if isinstance(body, str) else json.dumps(body))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert response.json()["status"] == status


def test_service_keeps_answering_after_errors(classical, hosts, classical_instances) -> None:
    """After every bad request above the service still answers health checks and clicks; an
    unreachable Label Studio is a 502, an unknown path a JSON 404."""
    assert classical.get("/health").json()["status"] == "UP"
    backend: Backend = classical.app.state.backend
    backend.link.url = "http://127.0.0.1:9"  # nothing listens on the discard port
    try:
        response = predict(classical, tasks=[task("/data/upload/1/other.png")])
        assert response.status_code == 502 and "cannot reach" in response.json()["error"]
    finally:
        backend.link.url = hosts["url"]
    assert classical.get("/no/such/path").json() == {"error": "GET /no/such/path: Not Found", "status": 404}
    x, y = centre(classical_instances, 5)
    assert predict(classical, keypoint(x, y)).status_code == 200


def test_image_limits(tmp_path_factory, hosts) -> None:
    """Images above the pixel or byte limit get a 413 naming the limit."""
    with make_client(tmp_path_factory, hosts, engine="classical", max_image_pixels=1000) as client:
        response = predict(client)
        assert response.status_code == 413 and "MOSAIC_BACKEND_MAX_IMAGE_PIXELS" in response.json()["error"]
    with make_client(tmp_path_factory, hosts, engine="classical", max_image_bytes=1000) as client:
        response = predict(client)
        assert response.status_code == 413 and "MOSAIC_BACKEND_MAX_IMAGE_BYTES" in response.json()["error"]


# --------------------------------------------------------------------------------------------
# Where images come from
# --------------------------------------------------------------------------------------------
def test_image_sources(classical, hosts, mosaic, tmp_path_factory, classical_instances) -> None:
    """Uploads, local files, task ids and cloud URIs are fetched from Label Studio with the
    token; the presigned redirect is followed without it; shared local files are read from disk
    but never from outside the document root."""
    x, y = centre(classical_instances, 5)
    expected = classical_instances == 5
    requests, cloud = hosts["requests"], hosts["cloud_requests"]
    for reference in ("/data/local-files/?d=project/mosaic.png", "s3://bucket/mosaic.png",
                      hosts["url"] + "/data/upload/1/mosaic.png", "upload/1/mosaic.png"):
        requests.clear()
        classical.app.state.backend.fetcher.cache.clear()  # fetch, do not reuse the last image
        response = predict(classical, keypoint(x, y), tasks=[task(reference, tid=42)])
        assert response.status_code == 200, (reference, response.text)
        np.testing.assert_array_equal(brush_mask(response.json()["results"][0]["result"][0]), expected)
        assert requests and all(auth == f"Token {TOKEN}" for _, auth in requests)
        if reference.startswith("s3://"):
            assert requests[0][0].startswith("/tasks/42/presign/?fileuri=")
            assert cloud == [("/bucket/mosaic.png", None)]  # followed, without the API key
    by_id = predict(classical, keypoint(x, y), tasks=[7])  # a task id: fetched through the API
    assert by_id.status_code == 200, by_id.text

    root = tmp_path_factory.mktemp("docroot")
    (root / "project").mkdir()
    (root / "project" / "disk.png").write_bytes(png(mosaic[0]))
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(png(mosaic[0]))
    (root / "project" / "link.png").symlink_to(outside / "secret.png")
    with make_client(tmp_path_factory, hosts, engine="classical", local_files_root=root) as client:
        requests.clear()
        ok = predict(client, keypoint(x, y), tasks=[task("/data/local-files/?d=project/disk.png")])
        assert ok.status_code == 200 and not requests  # read from disk, not over HTTP
        refused = predict(client, keypoint(x, y), tasks=[task("/data/local-files/?d=project/link.png")])
        assert refused.status_code == 400 and "escapes the document root" in refused.json()["error"]
        # a file missing under the shared root is "not found" there, not fetched over HTTP
        missing = predict(client, keypoint(x, y), tasks=[task("/data/local-files/?d=project/gone.png")])
        assert missing.status_code == 404 and not requests, missing.text
        error = missing.json()["error"]
        assert "project/gone.png" in error and "not found" in error and str(root) in error, error
    assert local_files_path("/data/local-files/?d=a/./b/../c.png") == "a/c.png"


def test_basic_auth(tmp_path_factory, hosts) -> None:
    """With basic auth every endpoint but GET /health needs the credentials."""
    with make_client(tmp_path_factory, hosts, engine="classical", basic_auth_user="ls",
                     basic_auth_password="secret") as client:
        assert client.get("/health").status_code == 200
        refused = client.post("/setup", json={"project": "1.1"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert refused.json()["error"] == "authentication required (HTTP basic auth)"
        assert client.post("/setup", json={"project": "1.1"}, auth=("ls", "wrong")).status_code == 401
        assert client.post("/setup", json={"project": "1.1"}, auth=("ls", "secret")).status_code == 200


# --------------------------------------------------------------------------------------------
# Versions and training
# --------------------------------------------------------------------------------------------
def test_versions_switch_atomically_and_stay_selectable(sam, tmp_path) -> None:
    """A stored fine-tune becomes a version: switching to it changes model_version (pointer file
    written atomically), the base stays selectable per request, and a second server process on
    the same models folder follows the pointer."""
    import torch

    from mosaic_toolkit.sam.models import save_finetune

    backend: Backend = sam.app.state.backend
    engine = backend.engines.base
    model = engine.model
    with torch.no_grad():
        original = model.sam_mask_decoder.iou_prediction_head.layers[-1].bias.clone()
        model.sam_mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.25)
        save_finetune(tmp_path / "ft.pt", model, base={"name": "sam2.1-tiny", "config": engine.spec.config,
                                                        "image_size": 256}, generator=None, training=None)
        model.sam_mask_decoder.iou_prediction_head.layers[-1].bias.copy_(original)
    from mosaic_toolkit.sam.models import model_version, resolve_model

    name = model_version(resolve_model(tmp_path / "ft.pt", base=engine.spec.base_checkpoint))
    store_version(backend.store.root, name, tmp_path / "ft.pt", {"version": name, "val_dice": 0.5})
    listed = sam.get("/versions").json()
    assert listed["versions"] == ["sam2.1-tiny", name] and listed["current"] == "sam2.1-tiny"
    assert listed["models"][1]["val_dice"] == 0.5

    switched = sam.post("/versions/current", json={"version": name})
    assert switched.json() == {"current": name}
    assert (backend.store.root / "current").read_text().strip() == name
    assert sam.get("/health").json()["model_version"] == name
    assert predict(sam, keypoint(50, 50)).json()["results"][0]["model_version"] == name
    base = predict(sam, keypoint(50, 50), model_version="sam2.1-tiny").json()["results"][0]
    assert base["model_version"] == "sam2.1-tiny"  # old versions stay selectable per request

    other = EngineManager(backend.settings, ModelStore(backend.store.root), base=engine)
    assert other.active_version == name  # a new process starts on the current version
    backend.store.set_current("sam2.1-tiny")  # e.g. another process switched back
    deadline = time.monotonic() + 30
    while other.active_version != "sam2.1-tiny" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert other.active_version == "sam2.1-tiny"
    assert sam.post("/versions/current", json={"version": "nope"}).status_code == 404
    sam.post("/versions/current", json={"version": "sam2.1-tiny"})

    import dataclasses

    pinned = EngineManager(dataclasses.replace(backend.settings, model_version=name), backend.store, base=engine)
    assert pinned.active_version == name
    pinned.switch("sam2.1-tiny")  # e.g. a training run of this server: the pointer moves ...
    assert backend.store.current() == "sam2.1-tiny" and pinned.active_version == name  # ... it stays


def test_promotion_rule() -> None:
    assert should_promote("better", 0.8, 0.7)[0]
    assert not should_promote("better", 0.7, 0.7)[0]
    assert "does not beat" in should_promote("better", 0.6, 0.7)[1]
    assert should_promote("always", 0.6, 0.7)[0]
    assert not should_promote("always", None, 0.7)[0]
    # Equal (zero) Dice: the prompted IoU decides, by more than the margin.
    trained, random = {"val_dice": 0.0, "val_prompt_iou": 0.45}, {"val_dice": 0.0, "val_prompt_iou": 0.02}
    assert should_promote("better", trained, random)[0]
    assert not should_promote("better", random, trained)[0]
    assert not should_promote("better", {"val_dice": 0.0, "val_prompt_iou": 0.0114},
                              {"val_dice": 0.0, "val_prompt_iou": 0.0113})[0]


def test_webhook_events(classical, sam, hosts) -> None:
    """Annotation events are counted, unknown ones ignored, training needs SAM 2 and a project."""
    created = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "project": 3}, "project": {"id": 3}}
    assert classical.post("/webhook", json=created).json() == {"status": "counted", "project": 3, "annotations": 1}
    assert classical.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3}}).json() == {
        "status": "ignored", "action": "PROJECT_UPDATED"}
    refused = classical.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}})
    assert refused.status_code == 400 and "needs the SAM 2 engine" in refused.json()["error"]
    assert sam.post("/webhook", json={"action": "START_TRAINING"}).status_code == 400
    assert sam.post("/webhook", json=[]).status_code == 400


def test_training_that_cannot_start_is_reported(tmp_path_factory, hosts) -> None:
    """"Start training" on a backend without SAM 2 weights: Label Studio gets an error status
    with the reason (it stores it as the model's error), and /train/status, /job_status and
    /jobs report the failed start instead of "idle"."""
    with make_client(tmp_path_factory, hosts, engine="classical") as client:
        assert client.get("/train/status").json()["state"] == "idle"
        for path, body in (("/webhook", {"action": "START_TRAINING", "project": {"id": 3}}),
                           ("/train", {"project": "3.1700000000"})):
            refused = client.post(path, json=body)
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert "needs the SAM 2 engine" in error and "weights fetch" in error
            status = client.get("/train/status").json()
            assert (status["state"], status["stage"], status["project"]) == ("failed", "starting", 3), status
            assert status["error"] == error and status["finished"] and "log" not in status
            assert client.post("/job_status", json={"job": status["run"]}).json()["error"] == error
            assert client.get("/jobs").json()["training"]["error"] == error
        assert client.get("/health").json()["model_version"] == "classical"  # still serving


def test_failed_training_run_is_reported_and_the_backend_keeps_serving(sam, hosts) -> None:
    """START_TRAINING runs a worker process; a run that fails (here: the host has no export
    API) is reported by /train/status with its error, and the model version stays."""
    before = sam.get("/health").json()["model_version"]
    started = sam.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5, "title": "p"}})
    assert started.status_code == 200, started.text
    assert started.json()["status"] == "started"
    again = sam.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5}})
    assert again.json() == {"status": "already running", "job": started.json()["job"]}
    assert predict(sam, keypoint(40, 40)).status_code == 200  # clicks go on while it runs
    backend: Backend = sam.app.state.backend
    assert backend.training.wait(120), "the training worker did not finish"
    status = sam.get("/train/status").json()
    assert status["state"] == "failed" and status["run"] == started.json()["job"]
    assert "cannot export project 5" in status["error"]
    assert status["active_version"] == before == sam.get("/health").json()["model_version"]
    assert sam.post("/job_status", json={"job": status["run"]}).json()["state"] == "failed"
    assert sam.get("/train/status", params={"run": "nope"}).status_code == 404
    assert Path(status["log"]).is_file()


def test_every_n_annotations_starts_a_run(sam) -> None:
    """With MOSAIC_BACKEND_TRAIN_EVERY=2 the second new annotation of a project starts a run."""
    import dataclasses

    from mosaic_backend.jobs import TrainingManager

    backend: Backend = sam.app.state.backend
    manager = TrainingManager(dataclasses.replace(backend.settings, train_every=2), backend.store,
                              backend.engines, backend.link, backend.metrics)
    assert manager.on_annotation(8) is None and manager.annotations[8] == 1
    started = manager.on_annotation(8)
    assert started["status"] == "started" and manager.annotations[8] == 0
    assert manager.wait(120)
    status = manager.status()
    assert status["run"] == started["job"] and status["reason"] == "2 new annotations"
    assert status["state"] == "failed" and "cannot export project 8" in status["error"]


# --------------------------------------------------------------------------------------------
# Metrics, settings, command line
# --------------------------------------------------------------------------------------------
def test_metrics(classical) -> None:
    assert predict(classical).status_code == 200  # a pre-label: the image's scale is estimated
    text = classical.get("/metrics").text
    assert 'mosaic_backend_info{engine="classical",model_version="classical"} 1' in text
    assert 'mosaic_backend_requests_total{endpoint="/predict",status="200"}' in text
    assert 'mosaic_backend_predict_seconds{kind="click",quantile="0.5"}' in text
    summary = classical.get("/metrics", params={"format": "json"}).json()
    assert summary["click"]["count"] >= 1 and summary["click"]["p95"] >= summary["click"]["p50"] > 0
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 50) is None
    # the tessera scale of the images segmented: outcome counts, the last with its confidence
    assert 'mosaic_backend_scale_estimates_total{outcome="confident"}' in text
    assert 'mosaic_backend_scale_last{value="confidence"}' in text
    scale = summary["scale"]  # the module's images so far; "last" is the latest estimated
    assert scale["confident"] + scale["uncertain"] >= 1 and scale["coarse"] == 0
    last = scale["last"]
    assert last["diameter_px"] > 0 and 0 <= last["confidence"] <= 1 and last["alternatives"]
    assert last["outcome"] in ("confident", "uncertain") and not last["coarse"]


def test_settings_from_environment() -> None:
    settings = Settings.from_env({"MOSAIC_BACKEND_PORT": "9191", "LABEL_STUDIO_URL": "http://ls:8080/",
                                  "MOSAIC_BACKEND_TRAIN_VAL_PARAMS": '{"points_per_side": 4}'})
    assert settings.port == 9191 and settings.label_studio_url == "http://ls:8080"
    assert settings.train_val_params == {"points_per_side": 4}
    assert "***" == Settings.from_env({}, label_studio_api_key="k").public()["label_studio_api_key"]
    with pytest.raises(BackendError, match="MOSAIC_BACKEND_PORT='x'"):
        Settings.from_env({"MOSAIC_BACKEND_PORT": "x"})
    with pytest.raises(BackendError, match="not one of better, always"):
        Settings.from_env({"MOSAIC_BACKEND_TRAIN_PROMOTE": "sometimes"})
    with pytest.raises(BackendError, match="both a user and a password"):
        Settings.from_env({"MOSAIC_BACKEND_BASIC_AUTH_USER": "u"})


def test_label_config_parsing() -> None:
    config = parse_label_config(LABEL_CONFIG)
    assert (config.image_name, config.image_key) == ("image", "image")
    assert config.region_control.name == "polygon" and config.prelabel_control.name == "polygon"
    assert config.click_control("brush").name == "brush" and config.click_control("polygon").name == "polygon"
    with pytest.raises(BackendError, match="no <PolygonLabels>"):
        parse_label_config(BRUSH_ONLY).click_control("polygon")
    assert parse_label_config(BRUSH_ONLY).click_control("auto").name == "mask"
    assert config.prompt_names == {"keypoint", "box"}
    with pytest.raises(BackendError, match="not valid XML"):
        parse_label_config("<View>")


def test_command_line_help_lists_every_setting(monkeypatch) -> None:
    result = CliRunner().invoke(cli_command, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for option, env, _, _ in settings_table():
        assert option in result.output and env in result.output
    for name in [row[1] for row in settings_table()]:
        monkeypatch.setenv(name, "")  # recorded, so the values the command sets are undone
        monkeypatch.delenv(name)
    bad = CliRunner().invoke(cli_command, ["--engine", "sam2", "--model", "/no/such.pt"])
    assert bad.exit_code == 1 and "Error: /no/such.pt" in bad.output
    assert os.environ["MOSAIC_BACKEND_MODEL"] == "/no/such.pt"


def test_too_coarse_image_gets_no_classical_tesserae_and_is_counted() -> None:
    """A whole panel at 5 px per tessera: the classical pre-label is empty (no figure-sized
    regions), the estimate is made once per image and /metrics counts it as coarse."""
    from mosaic_backend.metrics import Metrics
    from mosaic_backend.predict import Predictor
    from mosaic_toolkit.classical import ClassicalEngine

    panel, _ = synth_mosaic(np.random.default_rng(2), 700, 560, style="opus", tessera_size=5,
                            realism=1.0, weathering=1.0)
    metrics = Metrics()
    predictor = Predictor(64 * 2**20)
    predictor.on_scale = metrics.scale
    index = predictor.classical_index(ClassicalEngine(), panel, "panel")
    assert index.instances.shape == panel.shape[:2] and not index.instances.any()
    assert predictor.scale(panel, "panel").coarse  # cached: not estimated twice
    summary = metrics.summary()["scale"]
    assert summary["coarse"] == 1 and summary["confident"] == summary["uncertain"] == 0
    assert "too coarse" in summary["last"]["warning"]
    assert 'mosaic_backend_scale_estimates_total{outcome="coarse"} 1' in metrics.prometheus({})


def test_prelabel_worker_engine_keeps_the_embedding_cache(sam, tmp_path) -> None:
    """A SAM 2 pre-label job's worker opens its engine with MOSAIC_BACKEND_EMBEDDING_CACHE_MB:
    the guided method's second round reads its tiles' features from that cache (with none it
    would encode every tile again)."""
    from mosaic_backend import prelabel_job

    backend: Backend = sam.app.state.backend
    job = backend.prelabels._job(tmp_path, 1, None, "http://label-studio.invalid")
    assert job["engine"] == "sam2"
    assert job["cache_bytes"] == backend.settings.embedding_cache_mb * 2**20 > 0
    engine = prelabel_job._engine(json.loads(json.dumps(job)))  # as the worker reads it from disk
    assert engine.cache_bytes == job["cache_bytes"]
    assert engine.model_version == job["model_version"] and engine.params.to_dict() == job["params"]
