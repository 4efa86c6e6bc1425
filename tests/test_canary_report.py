"""`loradock adapters canary`'s reading of a Prometheus page (the end-to-end run against a real
server is in tests/http/test_canary.py)."""

from __future__ import annotations

import doctest

import pytest
from loradock.runtime import stats

from loradock import canary_report
from loradock.canary_report import rows, version_figures

PAGE = """\
# TYPE loradock_engine_requests counter
loradock_engine_requests_total{adapter="med",version="3"} 90.0
loradock_engine_requests_total{adapter="med",version="4"} 10.0
loradock_engine_requests_total{adapter="law",version="4"} 7.0
# TYPE loradock_engine_errors counter
loradock_engine_errors_total{adapter="med",version="4"} 2.0
# TYPE loradock_engine_time_to_first_token_seconds histogram
loradock_engine_time_to_first_token_seconds_bucket{adapter="med",le="0.1",version="3"} 45.0
loradock_engine_time_to_first_token_seconds_bucket{adapter="med",le="0.5",version="3"} 90.0
loradock_engine_time_to_first_token_seconds_bucket{adapter="med",le="+Inf",version="3"} 90.0
loradock_engine_time_to_first_token_seconds_count{adapter="med",version="3"} 90.0
loradock_engine_time_to_first_token_seconds_sum{adapter="med",version="3"} 12.0
# TYPE loradock_replica_requests counter
loradock_replica_requests_total{adapter="med",replica="r1",version="5"} 3.0
loradock_replica_requests_total{adapter="med",replica="r2",version="5"} 4.0
"""


def test_each_version_gets_its_own_figures():
    figures = version_figures(PAGE, "med")
    assert {v: f.counters.get("requests") for v, f in figures.items()} == {3: 90, 4: 10, 5: 7}  # replicas summed
    assert figures[4].counters["errors"] == 2
    assert figures[3].quantile("time_to_first_token_seconds", 0.5) == pytest.approx(0.1)
    assert figures[4].quantile("time_to_first_token_seconds", 0.5) is None  # no histogram: no latency
    headers, table = rows(figures, {3: 90, 4: 10}, "med")
    by_version = {row[0]: dict(zip(headers, row, strict=True)) for row in table}
    assert by_version["med@4"]["ERROR RATE"] == "20.0%" and by_version["med@4"]["TTFT P50 MS"] == "-"
    assert by_version["med@3"]["TTFT P50 MS"] == "100" and table[0][0] == "med@3"  # the stable first


def test_doctests():
    assert doctest.testmod(canary_report).failed == 0
    assert doctest.testmod(stats).failed == 0  # the histogram quantile the canary report and the console share
