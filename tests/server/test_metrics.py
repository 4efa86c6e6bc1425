"""The Prometheus exposition written by hand: format details a scraper relies on."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from loradock.runtime.server.metrics import Metrics, start_metrics_http
from loradock.runtime.types import FinishReason, GenerationResult, ResolvedAdapter, Timings


def _result(adapter: str | None, ttft_ms: float, total_ms: float) -> GenerationResult:
    resolved = ResolvedAdapter(adapter, 1, "0" * 64) if adapter else None
    return GenerationResult("r", "x", (1, 2), FinishReason.LENGTH, resolved, 4, 2, Timings(0.0, ttft_ms, total_ms))


def test_histograms_are_cumulative_and_labels_escaped():
    metrics = Metrics()
    metrics.observe("med", "Generate", "OK", _result("med", 7, 30))
    metrics.observe("med", "Generate", "OK", _result("med", 300, 3000))
    metrics.observe('we"ird\\', "Generate", "NOT_FOUND")
    text = metrics.render({"adapters": {"med@1": {"loads": 1}, "<base>": {"loads": 0}}, "running": 2})
    lines = text.splitlines()
    buckets = [float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith('loradock_time_to_first_token_seconds_bucket{adapter="med"')]
    assert buckets == sorted(buckets) and buckets[0] == 0 and buckets[-1] == 2
    assert 'loradock_time_to_first_token_seconds_bucket{adapter="med",le="0.01"} 1' in lines
    assert 'loradock_request_duration_seconds_sum{adapter="med"} 3.03' in lines
    assert 'loradock_tokens_total{adapter="med",kind="completion"} 4' in lines
    assert 'loradock_request_errors_total{adapter="we\\"ird\\\\",code="NOT_FOUND"} 1' in lines
    assert 'loradock_engine_loads_total{adapter="med",version="1"} 1' in lines
    assert 'loradock_engine_loads_total{adapter="",version=""} 0' in lines
    assert "loradock_engine_running 2" in lines
    assert "# TYPE loradock_time_to_first_token_seconds histogram" in lines
    assert text.endswith("\n")


def test_http_endpoint_serves_metrics_only():
    server = start_metrics_http(lambda: "up 1\n", "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            assert response.read() == b"up 1\n"
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url + "/other", timeout=10)
        assert info.value.code == 404
    finally:
        server.shutdown()
        server.server_close()
