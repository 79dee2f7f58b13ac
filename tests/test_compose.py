"""docker-compose.yml cannot run here (no Docker engine), so read it and check it against the code."""
import dataclasses
from pathlib import Path

import yaml

from mosaic_backend.config import Settings
from mosaic_toolkit.sam import weights

ROOT = Path(__file__).resolve().parents[1]


def _compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _backend_envs() -> set[str]:
    return {f.metadata["env"] for f in dataclasses.fields(Settings) if "env" in f.metadata}


def test_services_and_ports_match_the_code():
    services = _compose()["services"]
    assert set(services) == {"label-studio", "mosaic-backend"}
    port = next(f.default for f in dataclasses.fields(Settings) if f.name == "port")
    assert f"{port}:{port}" in services["mosaic-backend"]["ports"]
    assert "8080:8080" in services["label-studio"]["ports"]
    assert services["label-studio"]["image"].endswith(":1.23.2")  # the version the tests run against
    # the backend reaches Label Studio by its service name and port
    assert services["mosaic-backend"]["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"


def test_backend_environment_variables_exist_in_the_settings():
    env = _compose()["services"]["mosaic-backend"]["environment"]
    known = _backend_envs()
    for name in env:
        assert name in known, f"docker-compose.yml sets {name}, which the backend does not read"


def test_label_studio_allows_a_backend_on_the_compose_network():
    env = _compose()["services"]["label-studio"]["environment"]
    assert env["USE_DEFAULT_BANNED_SUBNETS"] == "false"
    assert env["LOCAL_FILES_SERVING_ENABLED"] == "true"
    # both services see the same document root, so local-files paths resolve in the backend too
    root = env["LOCAL_FILES_DOCUMENT_ROOT"]
    assert _compose()["services"]["mosaic-backend"]["environment"]["LOCAL_FILES_DOCUMENT_ROOT"] == root


def test_dockerfile_matches_build_and_weights_location():
    build = _compose()["services"]["mosaic-backend"]["build"]
    dockerfile = (ROOT / build["context"] / build["dockerfile"]).read_text()
    assert f"{weights.HOME_ENV}=/models/weights" in dockerfile
    assert "EXPOSE 9090" in dockerfile
    volumes = _compose()["services"]["mosaic-backend"]["volumes"]
    assert any(v.endswith(":/models") for v in volumes)
