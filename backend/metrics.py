"""Request counters and latencies, exposed by ``GET /metrics`` in Prometheus' text format.

Kept in memory per server process (no extra dependency): requests by endpoint and status, and
for the prediction kinds (``click``, ``prelabel``) the count, total seconds and the 50th/95th
percentiles of the last ``WINDOW`` durations; and the vertices of the polygon regions answered
(count, total and percentiles of the last ``VERTEX_WINDOW`` regions), which tell how light the
regions are that the editor has to draw; and the tessera-scale estimates of the images
segmented by the classical engine (how many were confident, uncertain or too coarse to segment,
and the last one with its confidence and alternatives).
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
        self.scales: Counter[str] = Counter()
        self.last_scale: dict[str, Any] | None = None

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

    def scale(self, estimate: Any) -> None:
        """Record a tessera-scale estimate (``ScaleEstimate``) by outcome."""
        outcome = ("coarse" if estimate.coarse else "uncertain" if estimate.warning()
                   else "confident")
        record = {**estimate.to_json(), "outcome": outcome, "warning": estimate.warning()}
        with self._lock:
            self.scales[outcome] += 1
            self.last_scale = record

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
            if self.scales:
                out["scale"] = {**{k: self.scales[k] for k in ("confident", "uncertain", "coarse")},
                                "last": self.last_scale}
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
            lines += ["# HELP mosaic_backend_scale_estimates_total Tessera-scale estimates by "
                      "outcome (confident, uncertain, coarse: too coarse to segment).",
                      "# TYPE mosaic_backend_scale_estimates_total counter"]
            for outcome in ("confident", "uncertain", "coarse"):
                lines.append(f'mosaic_backend_scale_estimates_total{{outcome="{outcome}"}} '
                             f"{self.scales[outcome]}")
            if self.last_scale is not None:
                lines += ["# HELP mosaic_backend_scale_last The last tessera-scale estimate: "
                          "diameter (px) and confidence (0-1).",
                          "# TYPE mosaic_backend_scale_last gauge",
                          f'mosaic_backend_scale_last{{value="diameter_px"}} {self.last_scale["diameter_px"]}',
                          f'mosaic_backend_scale_last{{value="confidence"}} {self.last_scale["confidence"]}']
        return "\n".join(lines) + "\n"
