"""Percentiles, ratios and per-system summaries on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from loradock.benchmarks.metrics import RequestRecord, percentile, ratio, summarize


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([1, 2, 3, 4], 50, 2.5),
    ([1, 2, 3, 4], 0, 1),
    ([1, 2, 3, 4], 100, 4),
    ([10], 99, 10),
    (list(range(1, 101)), 99, 99.01),
    ([5, 1, 3], 50, 3),  # unsorted input
])
def test_percentile_known_values(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_percentile_edges():
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0], 101)


def test_ratio():
    assert ratio(6.0, 2.0) == 3.0
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 2.0))
    assert math.isnan(ratio(2.0, math.nan))


def rec(index, start, first, end, tokens, error=None):
    return RequestRecord(index, 0, 10, tokens, start, first, end, error)


def test_record_latencies():
    r = rec(0, start=1.0, first=1.5, end=3.5, tokens=5)
    assert r.ttft_s == pytest.approx(0.5)
    assert r.tpot_s == pytest.approx(0.5)  # 2 s over the 4 tokens after the first
    assert rec(1, 0, 0.2, 0.2, 1).tpot_s is None
    assert rec(2, 0, None, 1.0, 0, "boom").ttft_s is None


def test_summarize_known_records():
    records = [
        rec(0, start=0.0, first=1.0, end=3.0, tokens=3),  # ttft 1000 ms, tpot 1000 ms
        rec(1, start=1.0, first=1.5, end=2.5, tokens=5),  # ttft 500 ms, tpot 250 ms
        rec(2, start=2.0, first=None, end=4.0, tokens=0, error="QueueFullError: full"),
    ]
    s = summarize("x", records, peak_rss_mb=123.0)
    assert (s.n_requests, s.errors, s.output_tokens) == (3, 1, 8)
    assert s.wall_s == pytest.approx(4.0)  # first issue 0.0 -> last finish 4.0
    assert s.tokens_per_s == pytest.approx(2.0)
    assert s.ttft_p50_ms == pytest.approx(750.0)
    assert s.tpot_p50_ms == pytest.approx(625.0)
    assert s.ttft_p99_ms == pytest.approx(995.0)
    assert s.peak_rss_mb == 123.0


def test_summarize_nothing_succeeded():
    s = summarize("x", [rec(0, 0.0, None, 1.0, 0, "boom")], 1.0)
    assert s.errors == 1 and s.output_tokens == 0 and s.tokens_per_s == 0.0
    assert math.isnan(s.ttft_p50_ms)


def test_record_json_round_trip():
    r = rec(3, 0.5, 0.7, 1.9, 4)
    assert RequestRecord.from_json(r.to_json()) == r
