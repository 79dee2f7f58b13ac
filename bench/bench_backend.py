"""Benchmark the ML backend through HTTP; prints one JSON object.

The backend runs as its own process (``python -m mosaic_backend``), as it does for Label Studio;
a small HTTP server in this process plays the Label Studio host and serves synthetic mosaics
(toolkit/data/synth.py) as ``/data/upload/...`` files, with the API token check. Per engine:

* clicks: ``POST /predict`` with a keypoint context, as Label Studio sends it. ``cold`` is the
  first click on an image (download, decode, and the image encoder or the classical
  segmentation); ``warm`` are the following clicks on other tesserae of the same image
  (p50/p95 over ``--clicks``), also ``warm_heavy`` with the task carrying about 1 MB of earlier
  regions, as Label Studio sends it on an image with hundreds of tesserae;
* pre-labels: ``POST /predict`` without context on images not seen before: seconds per image
  (download and decode included) and the number of regions. For SAM 2 only with
  ``--sam2-prelabel``: on 2 CPU cores a 1024 px mosaic takes about 36 s with the official tiny
  weights (the guided method), about ten minutes with random ones and the filters opened
  (``RANDOM_PARAMS``).

SAM 2 runs as 2.1 tiny with RANDOM weights unless ``--model`` names real ones (no weights can be
downloaded here): the timings are tiny's, the masks meaningless; the full-image filters are
opened so random masks pass and the pre-label does its full work (as bench_engine.py does).

Run: ``.venv/bin/python bench/bench_backend.py [--engines classical,sam2] [--size 1024]``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from mosaic_backend.labelconfig import parse_label_config
from mosaic_backend.metrics import percentile
from mosaic_backend.regions import instance_regions
from mosaic_toolkit.data.synth import synth_mosaic

TOKEN = "bench-token-0123456789abcdef0123456789abcd"
LABEL_CONFIG = (Path(__file__).resolve().parents[1] / "label_config.xml").read_text()
RANDOM_PARAMS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "stability_score_offset": 0.05,
                 "mask_threshold": 0.05, "points_per_side": 16}  # as bench_engine.py's default grid


class ImageHost(BaseHTTPRequestHandler):
    """Serves PNG files by path to requests carrying the API token."""

    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802
        body = self.files.get(self.path)
        status = 401 if self.headers.get("Authorization") != f"Token {TOKEN}" else 200 if body else 404
        body = body if status == 200 else b"{}"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def random_tiny_checkpoint(folder: Path, seed: int) -> Path:
    """SAM 2.1 tiny with random weights in the official checkpoint format."""
    from random_model import random_checkpoint

    return random_checkpoint(folder, "sam2.1-tiny", seed)


def start_backend(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "mosaic_backend", "--port", str(port)],
                               env={**os.environ, **env}, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the backend exited with status {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the backend did not start within 300 s")


def keypoint(x: float, y: float, width: int, height: int) -> dict:
    return {"id": "k", "type": "keypointlabels", "from_name": "keypoint", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0, "is_positive": True,
            "value": {"x": x / width * 100, "y": y / height * 100, "width": 0.5, "keypointlabels": ["Tessera"]}}


def request(client: httpx.Client, url: str, task: dict, context: dict | None) -> tuple[float, dict]:
    body = json.dumps({"tasks": [task], "project": "1.1700000000", "label_config": LABEL_CONFIG,
                       "params": {"login": None, "password": None, "context": context}}).encode()
    started = time.perf_counter()  # the request as sent, not its serialisation here
    response = client.post(url + "/predict", content=body, headers={"Content-Type": "application/json"})
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"/predict failed: {response.status_code} {response.text[:500]}")
    return seconds, response.json()


def bench_engine(name: str, env: dict[str, str], images: list[tuple[np.ndarray, np.ndarray]], clicks: int,
                 port: int, workdir: Path, prelabel: bool) -> dict[str, Any]:
    process = start_backend(env, port, workdir / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=600) as client:
            image, truth = images[0]
            h, w = truth.shape
            task = {"id": 1, "data": {"image": "/data/upload/1/mosaic-0.png"}}
            rng = np.random.default_rng(0)
            ids = rng.permutation(np.arange(1, int(truth.max()) + 1))[: clicks + 1]
            points = []
            for k in ids:
                rows, cols = np.nonzero(truth == k)
                i = len(rows) // 2
                points.append((cols[i] + 0.5, rows[i] + 0.5))
            cold, _ = request(client, url, task, {"result": [keypoint(*points[0], w, h)]})
            warm = [request(client, url, task, {"result": [keypoint(x, y, w, h)]})[0] for x, y in points[1:]]
            # the same clicks with ~1 MB of earlier regions in the task, as Label Studio sends
            # them: one polygon per true tessera as the prediction, copies as annotations
            config = parse_label_config(LABEL_CONFIG)
            regions = instance_regions(config, config.polygon, truth, "Tessera")
            heavy = dict(task, predictions=[{"result": regions}], annotations=[{"result": []}])
            while len(json.dumps(heavy)) < 1_000_000:
                heavy["annotations"][0]["result"] += regions
            warm_heavy = [request(client, url, heavy, {"result": [keypoint(x, y, w, h)]})[0] for x, y in points[1:]]
            prelabels = []
            for i in range(1, len(images) if prelabel else 1):
                seconds, answer = request(client, url, {"id": i + 1, "data": {"image": f"/data/upload/1/mosaic-{i}.png"}}, None)
                prelabels.append({"seconds": round(seconds, 3), "regions": len(answer["results"][0]["result"]),
                                  "tesserae_truth": int(images[i][1].max())})
            version = client.get(url + "/health").json()["model_version"]
    finally:
        process.terminate()
        process.wait(30)

    def stats(values: list[float]) -> dict[str, float]:
        return {"p50": round(percentile(values, 50), 4), "p95": round(percentile(values, 95), 4),
                "mean": round(statistics.mean(values), 4), "n": len(values)}

    timings = {"seconds_per_image": round(statistics.mean(p["seconds"] for p in prelabels), 3),
               "images": prelabels} if prelabels else "not run (--sam2-prelabel)"
    return {
        "model_version": version,
        "click_cold_seconds": round(cold, 3),
        "click_warm_seconds": stats(warm),
        "click_warm_heavy_seconds": stats(warm_heavy),
        "heavy_task_bytes": len(json.dumps(heavy)),
        "prelabel": timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="classical,sam2", help="comma-separated: classical, sam2")
    parser.add_argument("--model", help="SAM 2 model name, checkpoint or fine-tune (default: random tiny)")
    parser.add_argument("--image-size", type=int, default=1024, help="SAM 2 input resolution")
    parser.add_argument("--size", type=int, default=1024, help="longest side of the synthetic mosaics (px)")
    parser.add_argument("--images", type=int, default=3, help="mosaics: one for clicks, the rest pre-labelled")
    parser.add_argument("--clicks", type=int, default=30, help="warm clicks to time")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mosaics and random weights")
    parser.add_argument("--sam2-prelabel", action="store_true",
                        help="also time SAM 2 pre-labels (about 10 minutes per 1024 px image on 2 CPU cores)")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    images = [synth_mosaic(rng, args.size, args.size * 3 // 4) for _ in range(args.images)]
    files = {}
    for i, (image, _) in enumerate(images):
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG")
        files[f"/data/upload/1/mosaic-{i}.png"] = out.getvalue()
    host = ThreadingHTTPServer(("127.0.0.1", 0), type("Host", (ImageHost,), {"files": files}))
    threading.Thread(target=host.serve_forever, daemon=True).start()

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-backend-") as tmp:
        workdir = Path(tmp)
        common = {"LABEL_STUDIO_URL": f"http://127.0.0.1:{host.server_port}", "LABEL_STUDIO_API_KEY": TOKEN,
                  "MOSAIC_BACKEND_MODELS": str(workdir / "models"), "MOSAIC_BACKEND_LOG_LEVEL": "warning",
                  "MOSAIC_BACKEND_PREDICT_TIMEOUT": "900"}  # measure, do not cut off
        for name in args.engines.split(","):
            env = dict(common, MOSAIC_BACKEND_ENGINE=name)
            if name == "sam2":
                model = args.model or str(random_tiny_checkpoint(workdir, args.seed))
                env.update(MOSAIC_BACKEND_MODEL=model, MOSAIC_BACKEND_IMAGE_SIZE=str(args.image_size))
                if not args.model:
                    env["MOSAIC_BACKEND_GENERATOR_PARAMS"] = json.dumps(RANDOM_PARAMS)
            prelabel = name != "sam2" or args.sam2_prelabel
            results[name] = bench_engine(name, env, images, args.clicks, free_port(), workdir, prelabel)
    host.shutdown()
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "mosaics": {"n": args.images, "width": args.size, "height": args.size * 3 // 4, "seed": args.seed,
                    "tesserae": [int(t.max()) for _, t in images]},
        "sam2": {"model": args.model or "sam2.1-tiny (random weights)", "image_size": args.image_size},
        "engines": results,
    }, indent=1))


if __name__ == "__main__":
    main()
