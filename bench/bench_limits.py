"""The issue-12 probes of bounded work, measured against a running backend; prints one JSON object.

The backend (classical engine) runs as its own process against the stand-in Label Studio host
of bench_load.py, on 127.0.0.1. Measured:

* ``large_click``: the first click on a ``--large`` pixel mosaic with ``--predict-timeout``
  seconds: status and seconds (the timeout covers the classical segmentation of a click);
* ``many_tasks``: a pre-label request naming 1000 tasks: status and seconds (refused before
  any work above MOSAIC_BACKEND_MAX_TASKS);
* ``concurrent_first_clicks``: 4 clients clicking the same new image at once: downloads of it
  seen by the host, and each client's seconds (one download and one segmentation, shared);
* ``big_schemas``: 8 ``/setup`` requests with a ``--schema-mb`` schema each (distinct
  projects), with MOSAIC_BACKEND_MAX_BODY_MB raised above that size: the backend's RSS before
  and after (the schema and parse caches are bounded in bytes), and one above the default cap
  (413);
* ``sigterm``: a pre-label of 20 tasks on the large mosaic in flight, then SIGTERM: seconds
  until the process is gone.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_limits.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backend import LABEL_CONFIG, TOKEN, free_port, keypoint  # noqa: E402
from bench_load import StandIn, png, rss_mb  # noqa: E402

from mosaic_toolkit.data.synth import synth_mosaic  # noqa: E402

HEADERS = {"Content-Type": "application/json"}


def start(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "mosaic_backend", "--port", str(port)],
                               env={**os.environ, **env}, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the backend did not start:\n{log.read_text()[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def body(tasks: list[dict], context: dict | None = None) -> bytes:
    return json.dumps({"tasks": tasks, "label_config": LABEL_CONFIG, "params": {"context": context}}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=2400, help="width of the large mosaic (height 3/4)")
    parser.add_argument("--predict-timeout", type=float, default=5.0, help="MOSAIC_BACKEND_PREDICT_TIMEOUT")
    parser.add_argument("--schema-mb", type=float, default=50.0, help="size of each /setup schema")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    large, _ = synth_mosaic(rng, args.large, args.large * 3 // 4, tessera_size=28)
    small, truth = synth_mosaic(rng, 768, 576, tessera_size=28)
    requests: list[str] = []

    class Host(StandIn):
        files = {"/data/upload/1/large.png": png(large), "/data/upload/1/small.png": png(small)}

        def do_GET(self) -> None:  # noqa: N802
            requests.append(self.path)
            super().do_GET()

    from http.server import ThreadingHTTPServer

    host = ThreadingHTTPServer(("127.0.0.1", 0), Host)
    host.daemon_threads = True
    threading.Thread(target=host.serve_forever, daemon=True).start()
    out: dict[str, Any] = {"bench": "backend limits", "large_px": [args.large, args.large * 3 // 4]}
    with tempfile.TemporaryDirectory(prefix="mosaic-bench-limits-") as tmp:
        env = {"LABEL_STUDIO_URL": f"http://127.0.0.1:{host.server_port}", "LABEL_STUDIO_API_KEY": TOKEN,
               "MOSAIC_BACKEND_ENGINE": "classical", "MOSAIC_BACKEND_MODELS": str(Path(tmp) / "models"),
               "MOSAIC_BACKEND_PREDICT_TIMEOUT": str(args.predict_timeout), "MOSAIC_BACKEND_LOG_LEVEL": "warning",
               "MOSAIC_BACKEND_MAX_BODY_MB": str(args.schema_mb + 8),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        process, url = start(env, Path(tmp) / "backend.log")
        try:
            with httpx.Client(timeout=300) as client:
                h, w = large.shape[:2]
                task = {"id": 1, "data": {"image": "/data/upload/1/large.png"}}
                started = time.perf_counter()
                r = client.post(url + "/predict", content=body([task], {"result": [keypoint(w / 2, h / 2, w, h)]}),
                                headers=HEADERS)
                out["large_click"] = {"status": r.status_code, "seconds": round(time.perf_counter() - started, 2),
                                      "predict_timeout": args.predict_timeout}

                started = time.perf_counter()
                r = client.post(url + "/predict", content=body([task] * 1000), headers=HEADERS)
                out["many_tasks"] = {"tasks": 1000, "status": r.status_code,
                                     "seconds": round(time.perf_counter() - started, 3)}

                sh, sw = truth.shape
                rows, cols = np.nonzero(truth == 5)
                click = body([{"id": 2, "data": {"image": "/data/upload/1/small.png"}}],
                             {"result": [keypoint(cols[0] + 0.5, rows[0] + 0.5, sw, sh)]})
                requests.clear()

                def one(_: int) -> tuple[int, float]:
                    t0 = time.perf_counter()
                    with httpx.Client(timeout=300) as c:
                        status = c.post(url + "/predict", content=click, headers=HEADERS).status_code
                    return status, round(time.perf_counter() - t0, 2)

                with ThreadPoolExecutor(4) as pool:
                    answers = list(pool.map(one, range(4)))
                out["concurrent_first_clicks"] = {
                    "clients": 4, "statuses": [a[0] for a in answers], "seconds": [a[1] for a in answers],
                    "downloads": sum(1 for p in requests if p.startswith("/data/upload/1/small.png"))}

                before = rss_mb(process.pid)
                padding = " " * int(args.schema_mb * 2**20)
                statuses = []
                for i in range(8):
                    schema = LABEL_CONFIG.replace("<View>", f"<View><!-- {i} {padding} -->", 1)
                    statuses.append(client.post(url + "/setup", json={"project": 100 + i, "schema": schema}).status_code)
                    del schema
                time.sleep(1.0)
                out["big_schemas"] = {"requests": 8, "schema_mb": args.schema_mb, "statuses": statuses,
                                      "rss_mb_before": round(before, 1), "rss_mb_after": round(rss_mb(process.pid), 1)}
        finally:
            stop(process)

        env.pop("MOSAIC_BACKEND_MAX_BODY_MB")
        process, url = start(env, Path(tmp) / "backend2.log")
        try:
            padding = " " * int(args.schema_mb * 2**20)
            r = httpx.post(url + "/setup", json={"project": 1, "schema": padding}, timeout=60)
            out["big_schemas"]["default_cap_status"] = r.status_code
            env_timeout = dict(env, MOSAIC_BACKEND_PREDICT_TIMEOUT="300")
        finally:
            stop(process)

        process, url = start(env_timeout, Path(tmp) / "backend3.log")
        answer: dict[str, Any] = {}

        def prelabel() -> None:
            try:
                r = httpx.post(url + "/predict", content=body([{"id": i, "data": {"image": "/data/upload/1/large.png"}}
                                                               for i in range(20)]), headers=HEADERS, timeout=600)
                answer["status"] = r.status_code
            except httpx.HTTPError as exc:
                answer["error"] = type(exc).__name__

        try:
            sender = threading.Thread(target=prelabel, daemon=True)
            sender.start()
            time.sleep(3.0)
            busy = sender.is_alive()
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(120)
            exited = time.monotonic() - sent
            sender.join(10)
            out["sigterm"] = {"request_in_flight": busy, "seconds_to_exit": round(exited, 2),
                              "answer": answer or None}
        finally:
            stop(process)
            host.shutdown()
            host.server_close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
