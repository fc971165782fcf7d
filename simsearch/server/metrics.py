"""Prometheus-style metrics in the text exposition format, kept in memory: request counts
and latencies by route, model batch sizes, index size. Written out by hand (the format is
a few lines), so the server needs no client library."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

# Latency buckets in seconds: a search by id takes about a millisecond, one that runs the
# model tens to hundreds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {count}'
            for bound, count in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        plain = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{plain} {self.sum:.6f}")
        out.append(f"{name}_count{plain} {self.total}")
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The server's counters; every method may be called from any thread."""

    def __init__(self, gauges: Callable[[], dict[str, float]] | None = None) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._latency: dict[tuple[str, str], _Histogram] = {}
        self._batches = _Histogram(BATCH_BUCKETS)
        self._gauges = gauges

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(method, route, status)] += 1
            hist = self._latency.get((method, route))
            if hist is None:
                hist = self._latency[(method, route)] = _Histogram(LATENCY_BUCKETS)
            hist.observe(seconds)

    def batch(self, size: int) -> None:
        with self._lock:
            self._batches.observe(size)

    def text(self) -> str:
        """The exposition text (`text/plain; version=0.0.4`)."""
        with self._lock:
            out = [
                "# HELP simsearch_requests_total HTTP requests answered, by route and status.",
                "# TYPE simsearch_requests_total counter",
            ]
            for (method, route, status), n in sorted(self._requests.items()):
                out.append(
                    f'simsearch_requests_total{{method="{method}",route="{_escape(route)}",'
                    f'status="{status}"}} {n}'
                )
            out += [
                "# HELP simsearch_request_seconds Time to answer a request, by route.",
                "# TYPE simsearch_request_seconds histogram",
            ]
            for (method, route), hist in sorted(self._latency.items()):
                labels = f'method="{method}",route="{_escape(route)}"'
                out += hist.lines("simsearch_request_seconds", labels)
            out += [
                "# HELP simsearch_model_batch_images Images per model batch.",
                "# TYPE simsearch_model_batch_images histogram",
                *self._batches.lines("simsearch_model_batch_images", ""),
            ]
        for name, value in (self._gauges() if self._gauges else {}).items():
            out += [f"# TYPE simsearch_{name} gauge", f"simsearch_{name} {value:g}"]
        return "\n".join(out) + "\n"
