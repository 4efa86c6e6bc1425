"""The Prometheus exposition (prometheus_client): the names, labels and values scrapers and the
reliability probes read, on the page and over HTTP."""

from __future__ import annotations

import urllib.request

from loradock.runtime.metrics import Metrics, start_metrics_http
from loradock.runtime.types import FinishReason, GenerationResult, ResolvedAdapter, Timings
from prometheus_client.parser import text_string_to_metric_families


def _result(adapter: str | None, ttft_ms: float, total_ms: float) -> GenerationResult:
    resolved = ResolvedAdapter(adapter, 1, "0" * 64) if adapter else None
    return GenerationResult("r", "x", (1, 2), FinishReason.LENGTH, resolved, 4, 2, Timings(0.0, ttft_ms, total_ms))


def _samples(text: str) -> dict[str, float]:
    """{'name{labels}': value} as the reliability probes read the page (line by line)."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_names_labels_and_values_are_kept():
    """Guards the move to prometheus_client: every family name and label the gRPC tests, the
    reliability probes and dashboards read is unchanged, histograms are cumulative, label
    values are escaped, engine stats appear per adapter version, and nothing unparseable is
    written (prometheus_client's own parser reads the page back)."""
    stats = {"adapters": {"med@1": {"loads": 1}, "<base>": {"loads": 0}}, "running": 2, "waiting": 0}
    metrics = Metrics(lambda: stats)
    metrics.observe("med", "Generate", "OK", _result("med", 7, 30))
    metrics.observe("med", "ChatCompletionsStream", "OK", _result("med", 300, 3000))
    metrics.observe('we"ird\\', "Generate", "NOT_FOUND")
    metrics.observe_http("/v1/chat/completions", "POST", 200, 0.2)
    text = metrics.render().decode()
    s = _samples(text)  # prometheus_client writes labels sorted by name

    buckets = [v for k, v in s.items() if k.startswith('loradock_time_to_first_token_seconds_bucket{adapter="med"')]
    assert buckets == sorted(buckets) and buckets[0] == 0 and buckets[-1] == 2
    assert s['loradock_time_to_first_token_seconds_bucket{adapter="med",le="0.01"}'] == 1
    assert s['loradock_request_duration_seconds_sum{adapter="med"}'] == 3.03
    assert s['loradock_requests_total{adapter="med",code="OK",method="Generate"}'] == 1
    assert s['loradock_requests_total{adapter="med",code="OK",method="ChatCompletionsStream"}'] == 1
    assert s['loradock_tokens_total{adapter="med",kind="completion"}'] == 4
    assert s['loradock_request_errors_total{adapter="we\\"ird\\\\",code="NOT_FOUND"}'] == 1
    assert s['loradock_engine_loads_total{adapter="med",version="1"}'] == 1
    assert s['loradock_engine_loads_total{adapter="",version=""}'] == 0
    assert s["loradock_engine_running"] == 2
    assert s['loradock_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}'] == 1
    assert "# TYPE loradock_time_to_first_token_seconds histogram" in text
    assert not any("_created" in k for k in s), "no *_created series: they were never part of the page"
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["loradock_requests"] == "counter" and families["loradock_engine_running"] == "gauge"


def test_every_mixture_shares_one_series_so_clients_cannot_grow_the_page():
    """Each per-request mixture recipe is its own cache entry ("mixture-<digest>"), chosen by the
    client: counted under one `adapter="mixture"` series, the engine's counters summed."""
    stats = {"adapters": {f"mixture-{i:012x}@0": {"requests": 1, "loads": 1} for i in range(20)}
             | {"med@1": {"requests": 2, "loads": 1}}}
    metrics = Metrics(lambda: stats)
    for i in range(20):
        metrics.observe(f"mixture-{i:012x}", "Generate", "OK", _result(f"mixture-{i:012x}", 7, 30))
    lines = [line for line in metrics.render().decode().splitlines() if line and not line.startswith("#")]
    s = _samples("\n".join(lines))
    assert s['loradock_requests_total{adapter="mixture",code="OK",method="Generate"}'] == 20
    assert s['loradock_engine_requests_total{adapter="mixture",version=""}'] == 20
    assert s['loradock_engine_requests_total{adapter="med",version="1"}'] == 2
    assert not any("mixture-" in line for line in lines)
    few = Metrics(lambda: {"adapters": {"mixture-000000000000@0": {"requests": 1, "loads": 1}}})
    few.observe("mixture-000000000000", "Generate", "OK", _result("mixture-000000000000", 7, 30))
    # as many lines as with one mixture, plus med@1's two engine counters
    assert len(lines) <= len([x for x in few.render().decode().splitlines() if x and not x.startswith("#")]) + 2


def test_engine_stats_failing_does_not_break_the_page():
    """A scrape while the engine starts or stops still answers with the edge's own metrics."""
    def broken() -> dict:
        raise AttributeError("engine not started")

    text = Metrics(broken).render().decode()
    assert "# TYPE loradock_requests_total counter" in text
    assert "loradock_engine_" not in text


def test_http_endpoint_serves_the_page():
    metrics = Metrics(lambda: {"running": 3})
    server = start_metrics_http(metrics, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert _samples(response.read().decode())["loradock_engine_running"] == 3
    finally:
        server.shutdown()
        server.server_close()
