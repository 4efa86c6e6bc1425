"""Which adapter versions get several homes in the cluster (runtime/cluster/hot.py)."""

from __future__ import annotations

import doctest
from collections import Counter

import pytest

pytest.importorskip("ray")
from loradock.runtime.cluster import hot
from loradock.runtime.cluster.hot import HotVersions


def test_only_the_top_k_busy_versions_spread_and_a_caller_keeps_its_home():
    versions = HotVersions(top_k=2, homes=3, window=300, min_requests=30)
    ids: Counter[str] = Counter()
    for i in range(300):  # a: 50%, b: 30%, c: 20% of the traffic
        ref = "a@1" if i % 10 < 5 else "b@1" if i % 10 < 8 else "c@1"
        ids[versions.model_id(ref, f"caller-{i % 50}")] += 1
    assert {m for m in ids if m.startswith("a@1")} == {"a@1", "a@1#1", "a@1#2"}
    assert {m for m in ids if m.startswith("b@1")} == {"b@1", "b@1#1", "b@1#2"}
    assert {m for m in ids if m.startswith("c@1")} == {"c@1"}, "the third busiest keeps one home"
    assert versions.hot() == ["a@1", "b@1"]
    assert len({versions.model_id("a@1", "caller-7") for _ in range(10)}) == 1


def test_the_window_forgets_old_traffic():
    versions = HotVersions(top_k=1, homes=2, window=100, min_requests=20)
    for i in range(100):
        versions.model_id("old@1", str(i))
    assert versions.hot() == ["old@1"]
    for i in range(100):
        versions.model_id("new@1", str(i))
    assert versions.hot() == ["new@1"]
    assert {versions.model_id("old@1", str(i)) for i in range(5)} == {"old@1"}


def test_off_with_no_top_k():
    versions = HotVersions(top_k=0)
    assert {versions.model_id("a@1", str(i)) for i in range(200)} == {"a@1"}


def test_doctests():
    assert doctest.testmod(hot).failed == 0
