"""A personal access token, the kind of API key Label Studio 1.23 hands out by default (legacy
tokens are disabled there unless an administrator enables them), works for `prelabel`, `export`
and the backend's image downloads, against a real Label Studio server."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mosaic_toolkit.cli import main
from mosaic_toolkit.data.synth import synth_mosaic

pytestmark = pytest.mark.labelstudio

LABEL_CONFIG = (Path(__file__).resolve().parents[1] / "label_config.xml").read_text()
WIDTH, HEIGHT = 200, 160


def test_personal_access_token(label_studio, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from mosaic_backend.app import create_app
    from mosaic_backend.config import Settings

    client = label_studio.client()
    token = client.tokens.create().token
    assert token.count(".") == 2, "not a personal access token (JWT)"
    project = client.projects.create(title="personal token", label_config=LABEL_CONFIG)
    folder = label_studio.document_root / f"token-{project.id}"
    label_studio.add_local_storage(project.id, folder)
    image, _ = synth_mosaic(np.random.default_rng(5), WIDTH, HEIGHT, tessera_size=26)
    Image.fromarray(image).save(folder / "m.png")
    url = label_studio.local_file_url(folder / "m.png")
    [task] = client.projects.import_tasks(id=project.id, request=[{"image": url}], return_task_ids=True).task_ids

    prelabel = CliRunner().invoke(main, ["prelabel", "--url", label_studio.url, "--api-key", token,
                                         "--project", str(project.id), "--engine", "classical"])
    assert prelabel.exit_code == 0 and "pre-labelled tasks: 1" in prelabel.output, prelabel.output
    [prediction] = client.predictions.list(project=project.id)
    client.annotations.create(id=task, result=prediction.result)
    export = CliRunner().invoke(main, ["export", "--url", label_studio.url, "--api-key", token,
                                       "--project", str(project.id), "--out", str(tmp_path / "ds")])
    assert export.exit_code == 0, export.output
    assert f"tesserae: {len(prediction.result)}" in export.output

    settings = Settings.from_env({}, engine="classical", models_dir=tmp_path / "models",
                                 label_studio_url=label_studio.url, label_studio_api_key=token)
    click = {"id": "k", "type": "keypointlabels", "from_name": "keypoint", "to_name": "image",
             "original_width": WIDTH, "original_height": HEIGHT,
             "value": {"x": 50, "y": 50, "width": 0.6, "keypointlabels": ["Tessera"]}}
    with TestClient(create_app(settings)) as http:
        answer = http.post("/predict", json={"tasks": [{"id": task, "data": {"image": url}}],
                                             "context": {"result": [click]}, "label_config": LABEL_CONFIG,
                                             "project": f"{project.id}.1"})
    assert answer.status_code == 200, answer.text
    regions = answer.json()["results"][0]["result"]
    assert regions and all(r["type"] == "polygonlabels" for r in regions)
