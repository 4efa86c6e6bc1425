"""Probes of a running server from the outside: Prometheus gauges, process memory, waiting."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable


def scrape(url: str) -> dict[str, float]:
    """Every sample of a Prometheus text page: {'name{labels}': value}."""
    samples = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def engine_load(url: str) -> tuple[float, float, float]:
    """(running sequences, waiting requests, reserved KV tokens) of the server's engine."""
    s = scrape(url)
    return s["loradock_engine_running"], s["loradock_engine_waiting"], s["loradock_engine_kv_tokens_reserved"]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> float:
    """Poll `predicate` until true; return the seconds it took (AssertionError after `timeout`)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what} not reached within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20
