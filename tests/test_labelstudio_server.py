"""Smoke tests of the real Label Studio server the end-to-end tests run against.

They check what the other end-to-end tests rely on: the project's label config is accepted and parsed,
tasks whose images live in the document root are imported and served back byte for byte with the
API token, a brush (RLE) annotation survives the JSON export unchanged, and an ML backend on
127.0.0.1 is reached (not refused as a reserved address) and is handed the server URL and token.
"""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from labelstudio_server import LabelStudioError, LabelStudioServer

LABEL_CONFIG = Path(__file__).resolve().parents[1] / "label_config.xml"


@pytest.fixture(scope="module")
def project_with_image(label_studio: LabelStudioServer) -> dict[str, Any]:
    """A project with the project's label config and one task whose image is a 16x12 PNG on disk."""
    client = label_studio.client()
    project = client.projects.create(title="smoke test", label_config=LABEL_CONFIG.read_text())
    folder = label_studio.document_root / f"project-{project.id}"
    label_studio.add_local_storage(project.id, folder)
    image = folder / "tile 01.png"  # a space, to check the URL quoting
    pixels = np.random.default_rng(0).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    image_url = label_studio.local_file_url(image)
    response = client.projects.import_tasks(id=project.id, request=[{"image": image_url}], return_task_ids=True)
    return {"project": project, "image": image, "image_url": image_url, "task_ids": response.task_ids}


def test_missing_executable_is_a_clear_error(tmp_path: Path) -> None:
    """Starting without an install names the missing executable instead of failing obscurely."""
    with pytest.raises(LabelStudioError, match="label-studio: not found; run ensure_installed"):
        LabelStudioServer(tmp_path / "bin" / "label-studio").start()


@pytest.mark.labelstudio
def test_server_is_up(label_studio: LabelStudioServer) -> None:
    """The server answers with the expected version; the startup time is reported."""
    print(f"Label Studio server start took {label_studio.startup_seconds:.1f} s")
    version = label_studio.client().versions.get()
    assert version.release == "1.23.2"
    assert version.edition == "Community"


@pytest.mark.labelstudio
def test_label_config_is_parsed(label_studio: LabelStudioServer, project_with_image: dict[str, Any]) -> None:
    """The server parses every control of label_config.xml, all pointing at the image."""
    project = label_studio.client().projects.get(id=project_with_image["project"].id)
    parsed = project.parsed_label_config
    assert {name: control["type"] for name, control in parsed.items()} == {
        "brush": "BrushLabels", "keypoint": "KeyPointLabels", "box": "RectangleLabels", "polygon": "PolygonLabels"}
    for control in parsed.values():
        assert control["to_name"] == ["image"]
        assert control["labels"] == ["Tessera"]


@pytest.mark.labelstudio
def test_task_image_is_served(label_studio: LabelStudioServer, project_with_image: dict[str, Any]) -> None:
    """The imported task reads back with its image URL, which serves the file's exact bytes."""
    project_id = project_with_image["project"].id
    tasks = list(label_studio.client().tasks.list(project=project_id))
    assert [task.id for task in tasks] == project_with_image["task_ids"]
    assert tasks[0].data == {"image": project_with_image["image_url"]}
    assert label_studio.download(tasks[0].data["image"]) == project_with_image["image"].read_bytes()
    with pytest.raises(urllib.error.HTTPError) as refused:  # the token is what grants access
        urllib.request.urlopen(label_studio.url + project_with_image["image_url"], timeout=30)
    assert refused.value.code == 401


@pytest.mark.labelstudio
def test_local_storage_must_be_a_subfolder(label_studio: LabelStudioServer,
                                           project_with_image: dict[str, Any]) -> None:
    """Label Studio refuses the document root itself as a storage path; the helper says so first."""
    with pytest.raises(LabelStudioError, match="must be a subfolder of"):
        label_studio.add_local_storage(project_with_image["project"].id, label_studio.document_root)


@pytest.mark.labelstudio
def test_brush_annotation_survives_export(label_studio: LabelStudioServer,
                                          project_with_image: dict[str, Any]) -> None:
    """A BrushLabels RLE annotation made through the SDK comes back identical in the JSON export."""
    client = label_studio.client()
    project_id, task_id = project_with_image["project"].id, project_with_image["task_ids"][0]
    mask = np.zeros((12, 16), np.uint8)
    mask[2:7, 3:11] = 255
    region = {"id": "tessera1", "type": "brushlabels", "from_name": "brush", "to_name": "image",
              "original_width": 16, "original_height": 12, "image_rotation": 0,
              "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["Tessera"]}}
    annotation = client.annotations.create(id=task_id, result=[region])
    assert annotation.task == task_id

    exported = client.projects.exports.as_json(project_id)
    [task] = [t for t in exported if t["id"] == task_id]
    [result] = [a["result"] for a in task["annotations"] if a["id"] == annotation.id]
    assert result == [region]
    alpha = decode_rle(result[0]["value"]["rle"]).reshape(12, 16, 4)[:, :, 3]
    np.testing.assert_array_equal(alpha, mask)


class _RecordingBackend(BaseHTTPRequestHandler):
    """A stand-in ML backend that records what Label Studio sends and answers like a real one."""

    requests: list[tuple[str, str, Any]] = []

    def _reply(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.requests.append(("GET", self.path, None))
        self._reply({"status": "UP"})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
        self.requests.append(("POST", self.path, body))
        self._reply({"model_version": "recorder"} if self.path == "/setup" else {"results": []})

    def log_message(self, *args: Any) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def recording_backend() -> Iterator[tuple[str, list[tuple[str, str, Any]]]]:
    """(url, recorded requests) of a stand-in ML backend on 127.0.0.1."""
    handler = type("Handler", (_RecordingBackend,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler.requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.labelstudio
def test_ml_backend_on_localhost_is_connected(label_studio: LabelStudioServer,
                                              project_with_image: dict[str, Any],
                                              recording_backend: tuple[str, list[tuple[str, str, Any]]]) -> None:
    """ml.create reaches a backend on 127.0.0.1 and hands it the server URL and the API token."""
    url, requests = recording_backend
    project_id = project_with_image["project"].id
    backend = label_studio.client().ml.create(url=url, project=project_id, is_interactive=True, title="recorder")
    assert backend.state == "CO", backend.error_message  # "Connected"
    assert backend.model_version == "recorder"
    setups = [body for method, path, body in requests if (method, path) == ("POST", "/setup")]
    assert setups, requests
    assert setups[0]["hostname"] == label_studio.url
    assert setups[0]["access_token"] == label_studio.token
    assert setups[0]["project"].startswith(f"{project_id}.")
