"""Prometheus metrics for the gRPC edge, in the text exposition format (version 0.0.4),
served by a stdlib HTTP server on `--metrics-port`.

Request counters and latency histograms (`loradock_*`) are counted here as RPCs finish,
labelled by adapter name (`""` for the base model, `"(unresolved)"` when the reference
named nothing servable, so garbage references cannot flood the metrics). Engine counters
(`loradock_engine_*`: cache hits, loads, slot loads, evictions, ...) are read from
`engine.stats()` at scrape time, labelled by adapter name and version.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loradock.runtime.stats import BASE_KEY
from loradock.runtime.types import GenerationResult

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; CPU decoding of a long answer can take tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UNRESOLVED = "(unresolved)"


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.count += 1
        self.total += value


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


class Metrics:
    """Thread-safe counters for finished RPCs, rendered in Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()  # (adapter, method, code)
        self._tokens: Counter[tuple[str, str]] = Counter()  # (adapter, kind)
        self._ttft: dict[str, Histogram] = {}
        self._total: dict[str, Histogram] = {}

    def observe(self, adapter: str, method: str, code: str, result: GenerationResult | None = None) -> None:
        """Count one finished generation RPC; `result` is given when it completed."""
        with self._lock:
            self._requests[(adapter, method, code)] += 1
            if result is None:
                return
            self._tokens[(adapter, "prompt")] += result.prompt_tokens
            self._tokens[(adapter, "completion")] += result.completion_tokens
            self._ttft.setdefault(adapter, Histogram()).observe(result.timings.ttft_ms / 1000)
            self._total.setdefault(adapter, Histogram()).observe(result.timings.total_ms / 1000)

    def render(self, engine_stats: Mapping[str, Any] | None = None) -> str:
        """The exposition text. `engine_stats` is `engine.stats()`: per-adapter counters
        under "adapters" ({"name@version": {counter: value}}), other numbers are gauges."""
        with self._lock:
            lines = [
                *_family(
                    "loradock_requests_total", "counter",
                    "Generation RPCs finished, by adapter, method and gRPC status code.",
                    [f"loradock_requests_total{_labels(zip(('adapter', 'method', 'code'), key, strict=True))} {n}"
                     for key, n in sorted(self._requests.items())],
                ),
                *_family(
                    "loradock_request_errors_total", "counter",
                    "Generation RPCs that ended with a status other than OK, by adapter and code.",
                    [f"loradock_request_errors_total{_labels([('adapter', a), ('code', c)])} {n}"
                     for (a, c), n in sorted(self._errors().items())],
                ),
                *_family(
                    "loradock_tokens_total", "counter",
                    "Tokens processed, by adapter and kind (prompt or completion).",
                    [f"loradock_tokens_total{_labels(zip(('adapter', 'kind'), key, strict=True))} {n}"
                     for key, n in sorted(self._tokens.items())],
                ),
                *self._histogram("loradock_time_to_first_token_seconds",
                                 "Submit to first generated token.", self._ttft),
                *self._histogram("loradock_request_duration_seconds",
                                 "Submit to finished generation.", self._total),
            ]
        engine_stats = engine_stats or {}
        lines += _engine_families(engine_stats.get("adapters", {}))
        lines += _engine_gauges(engine_stats)
        return "\n".join(lines) + "\n"

    def _errors(self) -> Counter[tuple[str, str]]:
        errors: Counter[tuple[str, str]] = Counter()
        for (adapter, _method, code), n in self._requests.items():
            if code != "OK":
                errors[(adapter, code)] += n
        return errors

    @staticmethod
    def _histogram(name: str, help_text: str, by_adapter: dict[str, Histogram]) -> list[str]:
        samples: list[str] = []
        for adapter, hist in sorted(by_adapter.items()):
            for bound, n in zip((*hist.buckets, math.inf), (*hist.counts, hist.count), strict=True):
                samples.append(f"{name}_bucket{_labels([('adapter', adapter), ('le', _number(bound))])} {n}")
            samples.append(f"{name}_sum{_labels([('adapter', adapter)])} {_number(hist.total)}")
            samples.append(f"{name}_count{_labels([('adapter', adapter)])} {hist.count}")
        return _family(name, "histogram", help_text + " Seconds.", samples)


def _split_key(key: str) -> list[tuple[str, str]]:
    """Engine stats keys are "name@version" or BASE_KEY; as `adapter` and `version` labels."""
    if key == BASE_KEY:
        return [("adapter", ""), ("version", "")]
    name, _, version = key.rpartition("@")
    return [("adapter", name or key), ("version", version if name else "")]


def _engine_families(stats: Mapping[str, Mapping[str, float]]) -> list[str]:
    """One counter family per engine statistic (`loradock_engine_<name>_total`), by adapter version."""
    names = sorted({key for per_adapter in stats.values() for key in per_adapter})
    lines: list[str] = []
    for stat in names:
        metric = f"loradock_engine_{stat}_total"
        samples = [
            f"{metric}{_labels(_split_key(key))} {_number(values[stat])}"
            for key, values in sorted(stats.items())
            if stat in values
        ]
        lines += _family(metric, "counter", f"Engine counter '{stat}', by adapter version.", samples)
    return lines


def _engine_gauges(stats: Mapping[str, Any]) -> list[str]:
    """The engine's current numbers (running, waiting, KV tokens reserved, ...)."""
    lines: list[str] = []
    for key, value in sorted(stats.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metric = f"loradock_engine_{key}"
            lines += _family(metric, "gauge", f"Engine '{key}' when scraped.", [f"{metric} {_number(value)}"])
    return lines


def start_metrics_http(render: Callable[[], str], host: str, port: int) -> ThreadingHTTPServer:
    """Serve `render()` at GET /metrics on host:port (0 = any free port) from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            try:
                body = render().encode()
            except Exception:
                log.exception("rendering metrics failed")
                self.send_error(500, "rendering metrics failed; see the server log")
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
            log.debug("metrics: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="loradock-metrics", daemon=True).start()
    return server
