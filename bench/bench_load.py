"""Load test of the ML backend on 127.0.0.1; prints one JSON object.

The backend runs as its own process (``python -m mosaic_backend``) against a stand-in Label
Studio host in this process (synthetic mosaics as ``/data/upload/...`` files, the project's JSON
export with one polygon annotation per tessera, ``/api/version``; the API token is checked).
While

* a training run goes on (``START_TRAINING`` webhook: the backend's real worker process
  exports the project from the stand-in host, augments it and fine-tunes; SAM 2 engine only),
* and a pre-label request (``--prelabel-tasks`` tasks, no context) is in flight,

``--clients`` threads click for ``--seconds`` seconds: each sends a keypoint on a random
tessera of one of ``--images`` mosaics (so the first clicks on an image race each other, the
single-flight case, and later ones hit the caches). Reported: clicks, errors (any status but
200), click latency p50/p95/max, the backend's peak RSS and the training worker's, the
pre-label's status and duration, the training run's state at the start and the end of the
clicking window. Everything binds to 127.0.0.1 and every process started here is stopped at
the end (SIGTERM, then SIGKILL after 10 s).

SAM 2 runs as 2.1 tiny with RANDOM weights at ``--image-size`` (no weights can be downloaded
here): latencies are tiny's at that size, masks meaningless.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_load.py [--engine sam2|classical]
[--clients 8] [--seconds 30]``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backend import LABEL_CONFIG, RANDOM_PARAMS, TOKEN, free_port, keypoint, random_tiny_checkpoint  # noqa: E402

from mosaic_backend.labelconfig import parse_label_config  # noqa: E402
from mosaic_backend.metrics import percentile  # noqa: E402
from mosaic_backend.regions import instance_regions  # noqa: E402
from mosaic_toolkit.data.synth import synth_mosaic  # noqa: E402


class StandIn(BaseHTTPRequestHandler):
    """Label Studio as the backend and its training worker see it (module docstring)."""

    files: dict[str, bytes] = {}
    export: bytes = b"[]"
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
        path = urlsplit(self.path).path
        if path in self.files:
            return self._send(200, self.files[path], "image/png")
        if path.rstrip("/") == "/api/version":
            return self._send(200, json.dumps({"release": "1.23.2", "edition": "Community"}).encode())
        if path.rstrip("/") == "/api/projects/1/export":
            return self._send(200, self.export)
        return self._send(404, b'{"detail": "not found"}')

    def log_message(self, *args: Any) -> None:
        """Quiet."""


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def stand_in(images: list[tuple[np.ndarray, np.ndarray]]) -> tuple[ThreadingHTTPServer, list[dict]]:
    """The host and the tasks (with one annotation each: a polygon per tessera)."""
    config = parse_label_config(LABEL_CONFIG)
    control = config.prelabel_control
    files, tasks = {}, []
    for k, (image, truth) in enumerate(images, start=1):
        path = f"/data/upload/1/mosaic{k}.png"
        files[path] = png(image)
        result = instance_regions(config, control, truth, "Tessera")
        tasks.append({"id": k, "project": 1, "data": {"image": path},
                      "annotations": [{"id": k, "result": result, "was_cancelled": False, "ground_truth": False,
                                       "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z"}],
                      "predictions": []})
    handler = type("Host", (StandIn,), {"files": files, "export": json.dumps(tasks).encode()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, tasks


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


class RssSampler(threading.Thread):
    """Peak RSS of the backend process and of its children (the training worker)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.server_peak = 0.0
        self.children_peak = 0.0
        self.seen: set[int] = set()  # child processes (to be sure they are gone at the end)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.server_peak = max(self.server_peak, rss_mb(self.pid))
            found = children(self.pid)
            self.seen.update(found)
            self.children_peak = max(self.children_peak, sum(rss_mb(c) for c in found))


def body(task: dict, context: dict | None) -> bytes:
    return json.dumps({"tasks": task if isinstance(task, list) else [task], "project": "1.1700000000",
                       "label_config": LABEL_CONFIG,
                       "params": {"login": None, "password": None, "context": context}}).encode()


def run_load(url: str, tasks: list[dict], images: list[tuple[np.ndarray, np.ndarray]], clients: int,
             seconds: float, prelabel_tasks: int, seed: int = 0) -> dict[str, Any]:
    """The clicking window (module docstring): clients threads for ``seconds``, with a
    pre-label request of ``prelabel_tasks`` tasks sent just before."""
    headers = {"Content-Type": "application/json"}
    prelabel: dict[str, Any] = {}

    def send_prelabel() -> None:
        started = time.perf_counter()
        batch = [dict(tasks[i % len(tasks)], id=1000 + i) for i in range(prelabel_tasks)]
        try:
            with httpx.Client(timeout=600) as client:
                response = client.post(url + "/predict", content=body(batch, None), headers=headers)
            prelabel.update(status=response.status_code, regions=sum(
                len(r["result"]) for r in response.json().get("results", [])) if response.status_code == 200
                else response.json().get("error"))
        except httpx.HTTPError as exc:
            prelabel.update(status=None, error=f"{type(exc).__name__}: {exc}")
        prelabel["seconds"] = round(time.perf_counter() - started, 2)

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def clicker(n: int) -> None:
        rng = random.Random(seed + n)
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < stop_at:
                k = rng.randrange(len(images))
                truth = images[k][1]
                h, w = truth.shape
                rows, cols = np.nonzero(truth == rng.randint(1, int(truth.max())))
                i = rng.randrange(len(rows))
                context = {"result": [keypoint(cols[i] + 0.5, rows[i] + 0.5, w, h)]}
                started = time.perf_counter()
                try:
                    response = client.post(url + "/predict", content=body(tasks[k], context), headers=headers)
                    status = response.status_code
                    text = response.text[:200]
                except httpx.HTTPError as exc:
                    status, text = None, f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - started
                with lock:
                    if status == 200:
                        latencies.append(elapsed)
                    else:
                        errors.append(f"{status}: {text}")

    prelabeller = threading.Thread(target=send_prelabel, daemon=True)
    if prelabel_tasks:
        prelabeller.start()
        time.sleep(0.5)  # in flight before the clicks start
    threads = [threading.Thread(target=clicker, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    prelabel_in_flight = prelabeller.is_alive()
    return {
        "clicks": len(latencies), "errors": len(errors), "error_examples": errors[:3],
        "click_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                    "max": max(latencies) if latencies else None},
        "prelabel_in_flight_at_end": prelabel_in_flight, "prelabel": prelabel, "prelabel_thread": prelabeller,
    }


def stop(process: subprocess.Popen, workers: set[int]) -> None:
    """SIGTERM (the backend then stops its training worker), SIGKILL after 45 s; then any
    worker of it still alive is killed by its pid."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(45)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in workers:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().find(b"mosaic_backend.worker") >= 0:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("sam2", "classical"), default="sam2",
                        help="sam2 (random tiny weights; training runs) or classical (no training)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clicking clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the clicking window")
    parser.add_argument("--images", type=int, default=4, help="mosaics clicked on")
    parser.add_argument("--size", type=int, default=512, help="mosaic width (height: 3/4 of it)")
    parser.add_argument("--image-size", type=int, default=256, help="SAM 2 input resolution")
    parser.add_argument("--prelabel-tasks", type=int, default=4, help="tasks of the pre-label request in flight")
    parser.add_argument("--no-training", action="store_true", help="do not start a training run")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = [synth_mosaic(rng, args.size, args.size * 3 // 4, tessera_size=28) for _ in range(args.images)]
    host, tasks = stand_in(images)
    host_url = f"http://127.0.0.1:{host.server_port}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="mosaic-bench-load-") as tmp:
        env = {"LABEL_STUDIO_URL": host_url, "LABEL_STUDIO_API_KEY": TOKEN, "MOSAIC_BACKEND_ENGINE": args.engine,
               "MOSAIC_BACKEND_MODELS": str(Path(tmp) / "models"), "MOSAIC_BACKEND_LOG_LEVEL": "warning",
               "MOSAIC_BACKEND_PREDICT_TIMEOUT": "90", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if args.engine == "sam2":
            env.update({"MOSAIC_BACKEND_MODEL": str(random_tiny_checkpoint(Path(tmp), 0)),
                        "MOSAIC_BACKEND_IMAGE_SIZE": str(args.image_size),
                        "MOSAIC_BACKEND_GENERATOR_PARAMS": json.dumps({**RANDOM_PARAMS, "points_per_side": 8}),
                        "MOSAIC_BACKEND_TRAIN_EPOCHS": "1", "MOSAIC_BACKEND_TRAIN_MAX_SIDE": "256",
                        "MOSAIC_BACKEND_TRAIN_BATCH_SIZE": "2", "MOSAIC_BACKEND_TRAIN_MAX_PROMPTS": "16",
                        "MOSAIC_BACKEND_TRAIN_VAL_PARAMS": json.dumps({**RANDOM_PARAMS, "points_per_side": 4})})
        log = Path(tmp) / "backend.log"
        process = subprocess.Popen([sys.executable, "-m", "mosaic_backend", "--port", str(port)],
                                   env={**os.environ, **env}, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        sampler = RssSampler(process.pid)
        try:
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the backend did not start:\n{log.read_text()[-3000:]}")
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            sampler.start()
            training: dict[str, Any] = {}
            if args.engine == "sam2" and not args.no_training:
                started = httpx.post(url + "/webhook", json={"action": "START_TRAINING", "project": {"id": 1}},
                                     timeout=30).json()
                training["started"] = started
                time.sleep(1.0)
                training["state_at_start"] = httpx.get(url + "/train/status", timeout=10).json().get("stage")
            result = run_load(url, tasks, images, args.clients, args.seconds, args.prelabel_tasks)
            if training:
                status = httpx.get(url + "/train/status", timeout=10).json()
                training["state_at_end"] = status.get("state")
                training["stage_at_end"] = status.get("stage")
                training["error"] = status.get("error")
            result.pop("prelabel_thread").join(600)
            health = httpx.get(url + "/health", timeout=10).json()
        finally:
            sampler.stop.set()
            stop(process, sampler.seen)
            host.shutdown()
            host.server_close()
        print(json.dumps({
            "bench": "backend load", "engine": args.engine, "clients": args.clients, "seconds": args.seconds,
            "images": args.images, "image_px": [args.size, args.size * 3 // 4],
            "sam2_image_size": args.image_size if args.engine == "sam2" else None,
            **result, "training": training or None, "health_after": health.get("status"),
            "rss_mb": {"backend_peak": round(sampler.server_peak, 1), "training_worker_peak": round(sampler.children_peak, 1)},
            "backend_exit_code": process.returncode,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "omp_threads": env["OMP_NUM_THREADS"]},
        }, indent=2))


if __name__ == "__main__":
    main()
