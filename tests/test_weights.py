"""Checkpoint registry and downloads, against a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import logging
import os
import re
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import platformdirs
import pytest
from click.testing import CliRunner

from mosaic_toolkit.sam import weights
from mosaic_toolkit.cli import main
from mosaic_toolkit.core.errors import MosaicError

FILENAME = "fake_hiera_tiny.pt"


class FileServer:
    """Serves ``data`` at every path; ``mode`` picks how it answers Range requests."""

    def __init__(self, data: bytes):
        self.data = data
        self.mode = "range"  # "range": 206 on Range; "ignore-range": always 200; "truncate": half
        self.requests: list[dict] = []  # {"path", "range", "status"} per request
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body, status, headers = server.data, 200, {}
                range_header = self.headers.get("Range")
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                if match and server.mode == "range":
                    start = int(match.group(1))
                    if start >= len(server.data):
                        status, body = 416, b""
                        headers["Content-Range"] = f"bytes */{len(server.data)}"
                    else:
                        status, body = 206, server.data[start:]
                        headers["Content-Range"] = f"bytes {start}-{len(server.data) - 1}/{len(server.data)}"
                server.requests.append({"path": self.path, "range": range_header, "status": status})
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if server.mode == "truncate":
                    body = body[: len(body) // 2]  # then the connection closes early
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, filename: str = FILENAME) -> str:
        return f"{self.base}/{filename}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def data() -> bytes:
    return os.urandom(6000)


@pytest.fixture
def server(data):
    srv = FileServer(data)
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "cache"
    monkeypatch.setenv(weights.HOME_ENV, str(home))
    monkeypatch.delenv(weights.BASE_URL_ENV, raising=False)
    return home


def fake_model(url: str, data: bytes, **changes) -> weights.ModelInfo:
    info = weights.ModelInfo(
        name="fake-tiny", config="configs/sam2.1/sam2.1_hiera_t.yaml", filename=FILENAME,
        url=url, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
        family="sam2.1", variant="tiny",
    )
    return replace(info, **changes)


def registry_for(info: weights.ModelInfo) -> dict[str, weights.ModelInfo]:
    return {info.name: info}


# --- downloads ---------------------------------------------------------------------------

def test_fetch_downloads_verifies_and_caches(server, data, cache):
    reg = registry_for(fake_model(server.url(), data))
    path = weights.fetch("fake-tiny", progress=False, registry=reg)
    assert path == cache / FILENAME
    assert path.read_bytes() == data
    assert not (cache / (FILENAME + ".part")).exists()
    sidecar = (cache / (FILENAME + ".sha256")).read_text()
    assert sidecar.split() == [hashlib.sha256(data).hexdigest(), FILENAME]
    assert [r["status"] for r in server.requests] == [200]

    # Cached and verified: no second request.
    assert weights.fetch("fake-tiny", progress=False, registry=reg) == path
    assert len(server.requests) == 1
    assert weights.model_status(reg)[0].verified


def test_corrupt_cached_file_is_downloaded_again(server, data, cache):
    reg = registry_for(fake_model(server.url(), data))
    cache.mkdir()
    (cache / FILENAME).write_bytes(b"x" * len(data))  # right size, wrong bytes, no sidecar
    assert not weights.model_status(reg)[0].verified
    path = weights.fetch("fake-tiny", progress=False, registry=reg)
    assert path.read_bytes() == data
    assert len(server.requests) == 1


def test_cached_file_without_sidecar_is_hashed_not_downloaded(server, data, cache):
    reg = registry_for(fake_model(server.url(), data))
    cache.mkdir()
    (cache / FILENAME).write_bytes(data)  # e.g. copied in by hand
    assert weights.fetch("fake-tiny", progress=False, registry=reg) == cache / FILENAME
    assert server.requests == []
    assert (cache / (FILENAME + ".sha256")).exists()


def test_force_downloads_again(server, data, cache):
    reg = registry_for(fake_model(server.url(), data))
    weights.fetch("fake-tiny", progress=False, registry=reg)
    weights.fetch("fake-tiny", force=True, progress=False, registry=reg)
    assert len(server.requests) == 2
    assert (cache / FILENAME).read_bytes() == data


def test_checksum_mismatch_raises_and_leaves_nothing(server, data, cache):
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    reg = registry_for(fake_model(server.url(), data, sha256=wrong))
    with pytest.raises(MosaicError) as err:
        weights.fetch("fake-tiny", progress=False, registry=reg)
    message = str(err.value)
    assert FILENAME in message and wrong in message
    assert hashlib.sha256(data).hexdigest() in message
    assert not (cache / FILENAME).exists()
    assert not (cache / (FILENAME + ".part")).exists()
    assert not (cache / (FILENAME + ".sha256")).exists()


def test_no_published_checksum_checks_size_only(server, data, cache, caplog):
    reg = registry_for(fake_model(server.url(), data, sha256=None))
    with caplog.at_level(logging.WARNING, logger="mosaic_toolkit.sam.weights"):
        path = weights.fetch("fake-tiny", progress=False, registry=reg)
    assert path.read_bytes() == data
    assert "fake-tiny: no published checksum; size checked only" in caplog.text


def test_file_larger_than_registered_size_is_rejected(server, data, cache):
    reg = registry_for(fake_model(server.url(), data, sha256=None, size=len(data) - 10))
    with pytest.raises(MosaicError, match=f"downloaded {len(data)} bytes.*expected {len(data) - 10}"):
        weights.fetch("fake-tiny", progress=False, registry=reg)
    assert not (cache / FILENAME).exists()
    assert not (cache / (FILENAME + ".part")).exists()


def test_resume_sends_range_and_completes(server, data, cache):
    reg = registry_for(fake_model(server.url(), data))
    cache.mkdir()
    half = len(data) // 2
    (cache / (FILENAME + ".part")).write_bytes(data[:half])
    path = weights.fetch("fake-tiny", progress=False, registry=reg)
    assert server.requests == [{"path": f"/{FILENAME}", "range": f"bytes={half}-", "status": 206}]
    assert path.read_bytes() == data
    assert not (cache / (FILENAME + ".part")).exists()


def test_server_ignoring_range_still_gives_the_right_file(server, data, cache):
    server.mode = "ignore-range"
    reg = registry_for(fake_model(server.url(), data))
    cache.mkdir()
    half = len(data) // 2
    (cache / (FILENAME + ".part")).write_bytes(data[:half])
    path = weights.fetch("fake-tiny", progress=False, registry=reg)
    assert server.requests[0]["range"] == f"bytes={half}-"
    assert server.requests[0]["status"] == 200
    assert path.read_bytes() == data  # not the first half twice


def test_part_not_matching_the_server_restarts_after_416(server, data, cache):
    reg = registry_for(fake_model(server.url(), data, size=None))  # size unknown: must ask
    cache.mkdir()
    (cache / (FILENAME + ".part")).write_bytes(b"z" * (len(data) + 5))
    path = weights.fetch("fake-tiny", progress=False, registry=reg)
    assert [r["status"] for r in server.requests] == [416, 200]
    assert path.read_bytes() == data


def test_interrupted_download_leaves_no_final_file_and_resumes(server, data, cache):
    server.mode = "truncate"
    reg = registry_for(fake_model(server.url(), data))
    with pytest.raises(MosaicError, match="interrupted.*run the command again to resume"):
        weights.fetch("fake-tiny", progress=False, registry=reg)
    assert not (cache / FILENAME).exists()
    part = cache / (FILENAME + ".part")
    assert part.read_bytes() == data[: len(data) // 2]

    server.mode = "range"
    path = weights.fetch("fake-tiny", progress=False, registry=reg)
    assert server.requests[-1]["range"] == f"bytes={len(data) // 2}-"
    assert path.read_bytes() == data
    assert not part.exists()


def test_mirror_base_url_from_environment(server, data, cache, monkeypatch):
    info = fake_model("http://127.0.0.1:9/unreachable/" + FILENAME, data)
    monkeypatch.setenv(weights.BASE_URL_ENV, server.base + "/mirror/")
    path = weights.fetch("fake-tiny", progress=False, registry=registry_for(info))
    assert server.requests[0]["path"] == f"/mirror/{FILENAME}"
    assert path.read_bytes() == data


def test_http_error_and_unreachable_server(server, data, cache):
    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{FILENAME}"
        reg = registry_for(fake_model(url, data))
        with pytest.raises(MosaicError, match=f"{re.escape(url)}: HTTP 404"):
            weights.fetch("fake-tiny", progress=False, registry=reg)
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(MosaicError, match="cannot download .*weights import"):
        weights.fetch("fake-tiny", url=url, progress=False, registry=reg)  # server now closed
    assert not (cache / FILENAME).exists()


# --- cache folder and lookup ---------------------------------------------------------------

def test_home_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.HOME_ENV, str(tmp_path / "w"))
    assert weights.home() == tmp_path / "w"
    assert weights.checkpoint_path("sam2.1-tiny") == tmp_path / "w" / "sam2.1_hiera_tiny.pt"
    monkeypatch.delenv(weights.HOME_ENV)
    assert weights.home() == Path(platformdirs.user_cache_dir("mosaic-sam"))


def test_resolve_checkpoint(cache, tmp_path):
    with pytest.raises(MosaicError) as err:
        weights.resolve_checkpoint("sam2.1-tiny")
    assert str(err.value) == (
        f"sam2.1-tiny: checkpoint not found in {cache}; run `mosaic-toolkit weights fetch sam2.1-tiny`"
    )
    with pytest.raises(MosaicError, match="known: sam2-tiny, sam2-small"):
        weights.resolve_checkpoint("sam3-huge")

    cache.mkdir()
    installed = cache / "sam2.1_hiera_tiny.pt"
    installed.write_bytes(b"weights")
    assert weights.resolve_checkpoint("sam2.1-tiny") == (installed, weights.MODELS["sam2.1-tiny"])

    elsewhere = tmp_path / "sam2_hiera_large.pt"
    elsewhere.write_bytes(b"weights")
    assert weights.resolve_checkpoint(str(elsewhere)) == (elsewhere, weights.MODELS["sam2-large"])
    tuned = tmp_path / "finetuned.pt"
    tuned.write_bytes(b"weights")
    assert weights.resolve_checkpoint(str(tuned)) == (tuned, None)


def test_default_model_prefers_newest_largest(cache):
    assert weights.default_model() is None
    cache.mkdir()
    (cache / "sam2_hiera_large.pt").write_bytes(b"w")
    assert weights.default_model() == "sam2-large"
    (cache / "sam2.1_hiera_small.pt").write_bytes(b"w")
    assert weights.default_model() == "sam2.1-small"


def test_unknown_model_lists_names(cache):
    with pytest.raises(MosaicError, match="nope: unknown SAM 2 model .*sam2.1-large"):
        weights.fetch("nope", progress=False)


# --- the production registry ------------------------------------------------------------------

def _sam2_package() -> Path:
    spec = importlib.util.find_spec("sam2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sam2 package not installed")
    return Path(list(spec.submodule_search_locations)[0])


def test_registry_matches_sam2_package_and_official_urls():
    assert set(weights.MODELS) == {
        f"{family}-{variant}" for family in ("sam2", "sam2.1")
        for variant in ("tiny", "small", "base-plus", "large")
    }
    assert set(weights.PREFERENCE) == set(weights.MODELS)
    package = _sam2_package()
    # sam2's own name -> (config, file name) table, read without importing torch.
    tree = ast.parse((package / "build_sam.py").read_text())
    table = next(
        ast.literal_eval(node.value) for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "HF_MODEL_ID_TO_FILENAMES"
    )
    official = set(table.values())
    for name, info in weights.MODELS.items():
        assert info.name == name
        assert (package / info.config).is_file(), info.config
        assert (info.config, info.filename) in official
        folder = "072824" if info.family == "sam2" else "092824"
        assert info.url == f"https://dl.fbaipublicfiles.com/segment_anything_2/{folder}/{info.filename}"
        assert info.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", info.sha256)
        assert info.size is None or info.size > 100_000_000
        assert info.variant in info.filename
    assert len({info.sha256 for info in weights.MODELS.values()}) == len(weights.MODELS)


# --- command line -------------------------------------------------------------------------

def test_cli_list_path_and_fetch(server, data, cache, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(main, ["weights", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["NAME", "INSTALLED", "SIZE", "PATH"]
    assert len(lines) == 1 + len(weights.MODELS)
    assert all(" no " in line for line in lines[1:])
    assert str(cache / "sam2.1_hiera_large.pt") in result.output

    result = runner.invoke(main, ["weights", "path", "sam2.1-tiny"])
    assert result.exit_code == 1
    assert "run `mosaic-toolkit weights fetch sam2.1-tiny`" in result.output

    monkeypatch.setitem(weights.MODELS, "fake-tiny", fake_model("http://127.0.0.1:9/x", data))
    result = runner.invoke(main, ["weights", "fetch", "fake-tiny", "--url", server.url()])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(str(cache / FILENAME))
    assert (cache / FILENAME).read_bytes() == data

    result = runner.invoke(main, ["weights", "path", "fake-tiny"])
    assert result.exit_code == 0
    assert result.output.strip() == str(cache / FILENAME)
    result = runner.invoke(main, ["weights", "list"])
    assert re.search(r"fake-tiny\s+yes\s", result.output)

    result = runner.invoke(main, ["weights", "fetch", "nope"])
    assert result.exit_code == 1
    assert "nope: unknown SAM 2 model" in result.output
