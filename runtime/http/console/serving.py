"""The console's serving page: what the engine holds now and how each adapter version did over
the last minutes, from the engine's own counters and latency histograms (the ones /metrics
exposes).

`ServingWindow` keeps a sample of `engine.stats()` every `interval_s` (a daemon thread, started
with the HTTP server, or by the first look at an app built without one) and answers with the differences
between now and the sample `window_s` ago: requests, tokens and errors per minute, TTFT and
duration quantiles of the requests that finished in the window, and a requests-per-interval
series for a sparkline.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque

from loradock.runtime.stats import LATENCIES, cumulative, histogram_quantile

log = logging.getLogger(__name__)

INTERVAL_S = 5.0
WINDOW_S = 300.0
COUNTERS = ("requests", "generated_tokens", "prompt_tokens", "errors")


class ServingWindow:
    """Recent samples of one engine's stats."""

    def __init__(self, engine, interval_s: float = INTERVAL_S, window_s: float = WINDOW_S) -> None:
        self._engine = engine
        self.interval_s = interval_s
        self.window_s = window_s
        self._samples: deque[tuple[float, dict]] = deque(maxlen=int(window_s / interval_s) + 2)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _sample(self) -> tuple[float, dict]:
        return time.monotonic(), self._engine.stats()

    def _run(self) -> None:
        while True:
            try:
                if self._engine.ready:
                    sample = self._sample()
                    with self._lock:
                        self._samples.append(sample)
            except Exception:  # a sample missed is a gap in a chart, never a dead thread
                log.exception("the console's serving sample failed")
            time.sleep(self.interval_s)

    def start(self) -> None:
        """Start sampling (once; a server calls it as it starts, a first look otherwise)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="loradock-console-sampler", daemon=True)
                self._thread.start()

    def snapshot(self) -> dict:
        """The page's data now (see the module docstring); {"ready": False} while the base loads."""
        self.start()
        if not self._engine.ready:
            return {"ready": False}
        now, stats = self._sample()
        with self._lock:
            samples = [s for s in self._samples if now - s[0] <= self.window_s + self.interval_s]
        then, old = samples[0] if samples else (now, stats)
        span = max(now - then, 1e-9)
        info = self._engine.info()
        device = sorted({ref for ref, tier in stats["resident"] if tier == "device"})
        host = sorted({ref for ref, tier in stats["resident"] if tier == "host"} - set(device))
        resident = {"device": device, "host": host}  # a version in a slot is shown there only
        adapters = []
        for key, counters in stats["adapters"].items():
            before = old["adapters"].get(key, {})
            delta = {name: counters.get(name, 0) - before.get(name, 0) for name in COUNTERS}
            latency = _latency_delta(stats["latency"].get(key, {}), old["latency"].get(key, {}))
            series = _series(key, [*samples, (now, stats)])
            adapters.append({
                "key": key, "totals": {name: counters.get(name, 0) for name in COUNTERS},
                "window": {**delta, **{f"{name}_per_min": round(delta[name] * 60 / span, 2) for name in COUNTERS}},
                "ttft_p50_ms": _ms(latency, "time_to_first_token_seconds", 0.5),
                "ttft_p99_ms": _ms(latency, "time_to_first_token_seconds", 0.99),
                "duration_p50_ms": _ms(latency, "request_duration_seconds", 0.5),
                "series": series,
            })
        adapters.sort(key=lambda a: (-a["window"]["requests"], -a["totals"]["requests"], a["key"]))
        return {
            "ready": True, "window_s": round(span, 1), "interval_s": self.interval_s,
            "queue": {"running": stats["running"], "waiting": stats["waiting"],
                      "max_running": info.max_running, "max_queue": info.max_queue},
            "kv": {"reserved_tokens": stats["kv_tokens_reserved"], "capacity_tokens": info.kv_cache_tokens,
                   "cached_blocks": stats["kv_cached_blocks"], "preemptions": stats["preemptions"]},
            "slots": {"used": len(resident["device"]), "max": info.max_slots},
            "host_cache": {"used_bytes": stats["host_cache_bytes_used"], "capacity_bytes": info.host_cache_bytes},
            "resident": resident, "promoting": stats["promoting"], "steps": stats["steps"], "adapters": adapters,
        }


def _latency_delta(now: dict, before: dict) -> dict[str, list[int]]:
    """Per latency, the bucket counts of the requests that finished between the two samples."""
    out = {}
    for name in LATENCIES:
        counts = now.get(name, {}).get("counts")
        if counts:
            old = before.get(name, {}).get("counts") or [0] * len(counts)
            out[name] = [a - b for a, b in zip(counts, old, strict=True)]
    return out


def _ms(latency: dict[str, list[int]], name: str, q: float) -> float | None:
    value = histogram_quantile(cumulative(latency[name]), q) if name in latency else None
    return None if value is None else round(value * 1000, 1)


def _series(key: str, samples: list[tuple[float, dict]]) -> list[int]:
    """Requests of `key` finished in each interval between consecutive samples."""
    counts = [s["adapters"].get(key, {}).get("requests", 0) for _, s in samples]
    return [b - a for a, b in itertools.pairwise(counts)]
