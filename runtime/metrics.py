"""Prometheus metrics of the serving edges (gRPC and HTTP), exposed with `prometheus_client`.

One `Metrics` object per server process, shared by both edges and served at `--metrics-port`
and at `GET /metrics` on the HTTP port. Request counters and latency histograms
(`loradock_*`) are counted by the edges as generation requests finish, labelled by adapter
name (`""` for the base model, `"(unresolved)"` when the reference named nothing servable, so
garbage references cannot flood the metrics), the edge's method (`Generate`, `GenerateStream`,
`ChatCompletions`, `CompletionsStream`, ...) and a status code name from one vocabulary for
both edges (gRPC's canonical names: `OK`, `NOT_FOUND`, `INVALID_ARGUMENT`, ...). The HTTP edge
also counts every HTTP request by route and status (`loradock_http_*`). Engine counters
(`loradock_engine_*`: cache hits, loads, slot loads, evictions, ...) are read from
`engine.stats()` at scrape time, labelled by adapter name and version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from itertools import accumulate
from typing import Any

import prometheus_client
from loradock.runtime.stats import BASE_KEY, LATENCY_BUCKETS
from loradock.runtime.types import MIXTURE_PREFIX, GenerationResult
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# `*_created` timestamp series double the page and were never part of loradock's metrics.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
UNRESOLVED = "(unresolved)"

EngineStats = Callable[[], Mapping[str, Any]]
# {replica: {"name@N" or BASE_KEY: {stat: value}}}, as the cluster's ingress collects them.
ReplicaStats = Callable[[], Mapping[str, Mapping[str, Mapping[str, float]]]]


class Metrics:
    """Thread-safe counters for finished requests, on a registry of their own (so several
    servers in one process, as in tests, do not collide)."""

    def __init__(self, engine_stats: EngineStats | None = None,
                 replica_stats: ReplicaStats | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("loradock_requests", "Generation requests finished, by adapter, "
                                 "method and status code.", ("adapter", "method", "code"), registry=r)
        self._errors = Counter("loradock_request_errors", "Generation requests that ended with a "
                               "status other than OK, by adapter and code.", ("adapter", "code"), registry=r)
        self._tokens = Counter("loradock_tokens", "Tokens processed, by adapter and kind (prompt or "
                               "completion).", ("adapter", "kind"), registry=r)
        self._ttft = Histogram("loradock_time_to_first_token_seconds", "Submit to first generated "
                               "token. Seconds.", ("adapter",), buckets=LATENCY_BUCKETS, registry=r)
        self._duration = Histogram("loradock_request_duration_seconds", "Submit to finished "
                                   "generation. Seconds.", ("adapter",), buckets=LATENCY_BUCKETS, registry=r)
        self._http = Counter("loradock_http_requests", "HTTP requests answered, by route template, "
                             "HTTP method and status.", ("route", "method", "status"), registry=r)
        self._http_duration = Histogram("loradock_http_request_duration_seconds", "HTTP request "
                                        "received to response finished (streams included). Seconds.",
                                        ("route",), buckets=LATENCY_BUCKETS, registry=r)
        if engine_stats is not None:
            r.register(EngineCollector(engine_stats))
        if replica_stats is not None:
            r.register(ReplicaCollector(replica_stats))

    def observe(self, adapter: str, method: str, code: str, result: GenerationResult | None = None) -> None:
        """Count one finished generation request; `result` is given when it completed."""
        adapter = series_name(adapter)
        self._requests.labels(adapter, method, code).inc()
        if code != "OK":
            self._errors.labels(adapter, code).inc()
        if result is None:
            return
        self.add_tokens(adapter, result.prompt_tokens, result.completion_tokens)
        self._ttft.labels(adapter).observe(result.timings.ttft_ms / 1000)
        self._duration.labels(adapter).observe(result.timings.total_ms / 1000)

    def add_tokens(self, adapter: str, prompt: int, completion: int) -> None:
        """Tokens of a request's further choices (an HTTP request with n > 1 counts once)."""
        adapter = series_name(adapter)
        self._tokens.labels(adapter, "prompt").inc(prompt)
        self._tokens.labels(adapter, "completion").inc(completion)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request of the HTTP edge (`route` is the route template)."""
        self._http.labels(route, method, str(status)).inc()
        self._http_duration.labels(route).observe(seconds)

    def render(self) -> bytes:
        """The exposition text (Prometheus text format 0.0.4)."""
        return prometheus_client.generate_latest(self.registry)


def series_name(adapter: str) -> str:
    """The `adapter` label of a served name: every per-request mixture shares one ("mixture"),
    since clients choose their recipes and a series each would grow /metrics without bound."""
    return "mixture" if adapter.startswith(MIXTURE_PREFIX) else adapter


def _split_key(key: str) -> tuple[str, str]:
    """Engine stats keys are "name@version" or BASE_KEY; as `adapter` and `version` labels
    (mixtures: "mixture" and no version)."""
    if key == BASE_KEY:
        return "", ""
    name, _, version = key.rpartition("@")
    if name.startswith(MIXTURE_PREFIX):
        return series_name(name), ""
    return (name, version) if name else (key, "")


def _by_series(per_key: Mapping[str, Mapping[str, float]]) -> dict[tuple[str, str], dict[str, float]]:
    """Engine counters summed by their labels (all mixtures into one series)."""
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for key, values in per_key.items():
        series = totals.setdefault(_split_key(key), {})
        for stat, value in values.items():
            series[stat] = series.get(stat, 0) + value
    return totals


class EngineCollector(Collector):
    """The engine's counters (`loradock_engine_<stat>_total{adapter,version}`) and gauges
    (`loradock_engine_<name>`), read from `engine.stats()` when scraped."""

    def __init__(self, engine_stats: EngineStats) -> None:
        self._stats = engine_stats

    def describe(self) -> list[Metric]:
        return []  # the families depend on what the engine reports; nothing to check up front

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats() or {}
        except Exception:  # a scrape must not fail because the engine is starting or stopping
            log.exception("reading engine stats for /metrics failed")
            return
        per_series = _by_series(stats.get("adapters", {}))
        for stat in sorted({k for values in per_series.values() for k in values}):
            family = CounterMetricFamily(f"loradock_engine_{stat}", f"Engine counter '{stat}', by "
                                         "adapter version.", labels=("adapter", "version"))
            for labels, values in sorted(per_series.items()):
                if stat in values:
                    family.add_metric(labels, values[stat])
            yield family
        yield from latency_families(stats.get("latency", {}))
        resident = GaugeMetricFamily("loradock_engine_adapter_resident", "Adapter versions held now, by tier "
                                     "(device: a slot; host: host memory), 1 each.",
                                     labels=("adapter", "version", "tier"))
        for ref, tier in stats.get("resident", []):
            resident.add_metric((*_split_key(ref), tier), 1)
        yield resident
        promoting = GaugeMetricFamily("loradock_engine_alias_promoting", "Aliases whose new target is still "
                                      "loading here (their requests stay on the previous one), 1 each.",
                                      labels=("alias",))
        for alias in stats.get("promoting", []):
            promoting.add_metric((alias,), 1)
        yield promoting
        for key, value in sorted(stats.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield GaugeMetricFamily(f"loradock_engine_{key}", f"Engine '{key}' when scraped.", value=value)


def latency_families(per_key: Mapping[str, Mapping[str, dict]]) -> Iterator[Metric]:
    """`loradock_engine_<latency>{adapter,version}` histograms (stats.LATENCIES) from the engine's
    per-version latency snapshots (mixtures summed into one series)."""
    merged: dict[str, dict[tuple[str, str], dict]] = {}
    for key, histograms in per_key.items():
        for name, h in histograms.items():
            into = merged.setdefault(name, {}).setdefault(_split_key(key), {"counts": [0] * len(h["counts"]), "sum": 0.0})
            into["counts"] = [a + b for a, b in zip(into["counts"], h["counts"], strict=True)]
            into["sum"] += h["sum"]
    for name, series in sorted(merged.items()):
        family = HistogramMetricFamily(f"loradock_engine_{name}", f"Engine '{name}' of finished requests, by "
                                       "the adapter version that served them.", labels=("adapter", "version"))
        for labels, h in sorted(series.items()):
            cumulative = list(accumulate(h["counts"]))
            bounds = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
            family.add_metric(labels, list(zip(bounds, cumulative, strict=True)), sum_value=h["sum"])
        yield family


class ReplicaCollector(Collector):
    """Each cluster replica's engine counters, `loradock_replica_<stat>_total{replica,adapter,
    version}`, as the replicas last reported them to the ingress."""

    def __init__(self, replica_stats: ReplicaStats) -> None:
        self._stats = replica_stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        by_replica = self._stats()
        stats = sorted({s for by_key in by_replica.values() for values in by_key.values() for s in values})
        for stat in stats:
            family = CounterMetricFamily(f"loradock_replica_{stat}", f"Engine counter '{stat}' of "
                                         "each replica, by adapter version.",
                                         labels=("replica", "adapter", "version"))
            for replica, by_key in sorted(by_replica.items()):
                for labels, values in sorted(_by_series(by_key).items()):
                    if stat in values:
                        family.add_metric((replica, *labels), values[stat])
            yield family


def start_metrics_http(metrics: Metrics, host: str, port: int):
    """Serve `metrics` at http://host:port/metrics (0 = any free port) from a daemon thread.
    Returns the server; `server.server_address[1]` is the bound port, `shutdown()` stops it."""
    server, _thread = prometheus_client.start_http_server(port, addr=host, registry=metrics.registry)
    return server
