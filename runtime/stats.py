"""Per-adapter-version counters (requests, tokens, errors, cache behaviour) and latency
histograms (time to first token, request duration), safe to read from any thread. Keyed by the
concrete version that served ("name@N"), so a canary's versions can be told apart."""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import asdict, dataclass

BASE_KEY = "<base>"  # counters of requests served by the base model alone
# Upper bounds (seconds) of the latency histograms' buckets, shared with the edges' histograms (CPU
# decoding of a long answer can take tens of seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCIES = ("time_to_first_token_seconds", "request_duration_seconds")


@dataclass
class AdapterCounters:
    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # taken from the KV prefix cache instead of prefilled
    generated_tokens: int = 0
    errors: int = 0
    cache_hits: int = 0  # admitted while already in a device slot
    loads: int = 0  # read from the registry into host memory
    slot_loads: int = 0  # copied into a device slot
    evictions: int = 0  # removed from a device slot


class Histogram:
    """Observations counted into LATENCY_BUCKETS (plus one past the last), with their sum."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> dict:
        """{"counts": per bucket (the last: above every bound), "sum": seconds}."""
        return {"counts": list(self.counts), "sum": self.sum}


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a histogram given as (upper bound, cumulative count) pairs, interpolated
    within its bucket as Prometheus' histogram_quantile does; None without observations.

    >>> histogram_quantile([(0.1, 0), (0.5, 10), (math.inf, 10)], 0.25)
    0.2
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # above every finite bound: its lower edge, as Prometheus does
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return None


def cumulative(counts: list[int]) -> list[tuple[float, float]]:
    """A Histogram snapshot's per-bucket counts as (upper bound, cumulative count) pairs."""
    total, out = 0, []
    for bound, count in zip((*LATENCY_BUCKETS, math.inf), counts, strict=True):
        total += count
        out.append((bound, float(total)))
    return out


class EngineStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_adapter: dict[str, AdapterCounters] = {}
        self._latency: dict[str, dict[str, Histogram]] = {}

    def add(self, key: str, **deltas: int) -> None:
        """Increment counters of `key` ("name@version" or BASE_KEY)."""
        with self._lock:
            counters = self._by_adapter.setdefault(key, AdapterCounters())
            for field_name, delta in deltas.items():
                setattr(counters, field_name, getattr(counters, field_name) + delta)

    def observe(self, key: str, **seconds: float) -> None:
        """Record latencies of a finished request of `key` (names from LATENCIES)."""
        with self._lock:
            histograms = self._latency.setdefault(key, {name: Histogram() for name in LATENCIES})
            for name, value in seconds.items():
                histograms[name].observe(value)

    def counters(self, key: str) -> dict[str, int]:
        """The counters of one key (zeros when it has none yet)."""
        with self._lock:
            return asdict(self._by_adapter.get(key, AdapterCounters()))

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {key: asdict(c) for key, c in sorted(self._by_adapter.items())}

    def latency(self) -> dict[str, dict[str, dict]]:
        """{key: {latency name: Histogram.snapshot()}}."""
        with self._lock:
            return {key: {name: h.snapshot() for name, h in hs.items()} for key, hs in sorted(self._latency.items())}
