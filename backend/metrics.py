"""Request counters and latencies, exposed by ``GET /metrics`` in Prometheus' text format.

Kept in memory per server process (no extra dependency): requests by endpoint and status, and
for the prediction kinds (``click``, ``prelabel``) the count, total seconds and the 50th/95th
percentiles of the last ``WINDOW`` durations; and the vertices of the polygon regions answered
(count, total and percentiles of the last ``VERTEX_WINDOW`` regions), which tell how light the
regions are that the editor has to draw.
"""
from __future__ import annotations

import threading
from collections import Counter, defaultdict, deque
from typing import Any, Iterable

WINDOW = 1000  # recent durations kept per kind for the percentiles
VERTEX_WINDOW = 10000  # recent polygon regions kept for the vertex percentiles


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation) of ``values``; None when empty."""
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


class Metrics:
    """Thread-safe counters and duration windows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.events: Counter[tuple[str, str]] = Counter()
        self.durations: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=WINDOW))
        self.totals: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.region_vertices: deque[int] = deque(maxlen=VERTEX_WINDOW)
        self.polygons = 0
        self.vertices_total = 0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, int(status))] += 1

    def event(self, name: str, outcome: str) -> None:
        """Count an event (e.g. a training run ending) by outcome."""
        with self._lock:
            self.events[(name, outcome)] += 1

    def observe(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.durations[kind].append(seconds)
            self.totals[kind] += seconds
            self.counts[kind] += 1

    def vertices(self, counts: Iterable[int]) -> None:
        """Record the vertices of polygon regions sent to Label Studio."""
        counts = [int(c) for c in counts]
        if not counts:
            return
        with self._lock:
            self.region_vertices.extend(counts)
            self.polygons += len(counts)
            self.vertices_total += sum(counts)

    def summary(self) -> dict[str, Any]:
        """JSON view: per kind count, total, p50 and p95 seconds; ``polygon_vertices``: regions,
        total vertices, p50 and p95 vertices per region."""
        with self._lock:
            out: dict[str, Any] = {
                kind: {"count": self.counts[kind], "seconds_total": round(self.totals[kind], 6),
                       "p50": percentile(self.durations[kind], 50),
                       "p95": percentile(self.durations[kind], 95)}
                for kind in sorted(self.counts)}
            if self.polygons:
                out["polygon_vertices"] = {
                    "regions": self.polygons, "vertices_total": self.vertices_total,
                    "p50": percentile(self.region_vertices, 50),
                    "p95": percentile(self.region_vertices, 95)}
            return out

    def prometheus(self, info: dict[str, str]) -> str:
        """The text exposition format; ``info`` labels the ``mosaic_backend_info`` gauge."""
        esc = lambda s: str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")  # noqa: E731
        lines = ["# HELP mosaic_backend_info The engine and model version being served.",
                 "# TYPE mosaic_backend_info gauge",
                 "mosaic_backend_info{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(info.items())) + "} 1",
                 "# HELP mosaic_backend_requests_total HTTP requests by endpoint and status.",
                 "# TYPE mosaic_backend_requests_total counter"]
        with self._lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'mosaic_backend_requests_total{{endpoint="{esc(endpoint)}",status="{status}"}} {n}')
            lines += ["# HELP mosaic_backend_events_total Training runs and other events by outcome.",
                      "# TYPE mosaic_backend_events_total counter"]
            for (name, outcome), n in sorted(self.events.items()):
                lines.append(f'mosaic_backend_events_total{{event="{esc(name)}",outcome="{esc(outcome)}"}} {n}')
            lines += ["# HELP mosaic_backend_predict_seconds Time per prediction (click or pre-label).",
                      "# TYPE mosaic_backend_predict_seconds summary"]
            for kind in sorted(self.counts):
                for q in (50, 95):
                    value = percentile(self.durations[kind], q)
                    lines.append(f'mosaic_backend_predict_seconds{{kind="{kind}",quantile="{q / 100}"}} {value}')
                lines.append(f'mosaic_backend_predict_seconds_sum{{kind="{kind}"}} {self.totals[kind]:.6f}')
                lines.append(f'mosaic_backend_predict_seconds_count{{kind="{kind}"}} {self.counts[kind]}')
            lines += ["# HELP mosaic_backend_polygon_vertices Vertices per polygon region answered.",
                      "# TYPE mosaic_backend_polygon_vertices summary"]
            for q in (50, 95):
                lines.append(f'mosaic_backend_polygon_vertices{{quantile="{q / 100}"}} '
                             f'{percentile(self.region_vertices, q)}')
            lines.append(f"mosaic_backend_polygon_vertices_sum {self.vertices_total}")
            lines.append(f"mosaic_backend_polygon_vertices_count {self.polygons}")
        return "\n".join(lines) + "\n"
