"""Workload generator: reproducible, lengths in range, power-law popularity."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loradock.benchmarks.workload import (
    ATTN_TARGETS,
    FIRST_PLAIN_TOKEN,
    MLP_TARGETS,
    BenchRequest,
    WorkloadSpec,
    adapter_specs,
    make_workload,
    poisson_arrivals,
    power_law_weights,
    sample_adapters,
    without_adapters,
)


def test_same_seed_same_workload_other_seed_differs():
    spec = WorkloadSpec(n_adapters=8, n_requests=50, seed=3)
    assert make_workload(spec) == make_workload(spec)
    assert make_workload(spec) != make_workload(WorkloadSpec(n_adapters=8, n_requests=50, seed=4))


@settings(max_examples=30, deadline=None)
@given(
    n_adapters=st.integers(0, 40),
    n_requests=st.integers(1, 60),
    seed=st.integers(0, 10**6),
    prompt=st.tuples(st.integers(1, 50), st.integers(0, 80)).map(lambda t: (t[0], t[0] + t[1])),
    output=st.tuples(st.integers(1, 30), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1])),
)
def test_requests_respect_the_spec(n_adapters, n_requests, seed, prompt, output):
    spec = WorkloadSpec(n_adapters=n_adapters, n_requests=n_requests, seed=seed,
                        prompt_len=prompt, output_len=output, vocab_size=1000)
    requests = make_workload(spec)
    assert [r.index for r in requests] == list(range(n_requests))
    for r in requests:
        assert prompt[0] <= len(r.prompt_token_ids) <= prompt[1]
        assert output[0] <= r.max_new_tokens <= output[1]
        assert all(FIRST_PLAIN_TOKEN <= t < 1000 for t in r.prompt_token_ids)
        assert r.adapter is None if n_adapters == 0 else 0 <= r.adapter < n_adapters
        assert r.arrival_s is None


def test_default_lengths_cover_their_ranges():
    requests = make_workload(WorkloadSpec(n_adapters=4, n_requests=2000, seed=1))
    prompts = [len(r.prompt_token_ids) for r in requests]
    outputs = [r.max_new_tokens for r in requests]
    assert (min(prompts), max(prompts)) == (16, 128)
    assert (min(outputs), max(outputs)) == (16, 64)


def test_prompts_do_not_depend_on_the_number_of_adapters():
    few = make_workload(WorkloadSpec(n_adapters=1, n_requests=20, seed=5))
    many = make_workload(WorkloadSpec(n_adapters=1000, n_requests=20, seed=5))
    assert [r.prompt_token_ids for r in few] == [r.prompt_token_ids for r in many]
    assert [r.max_new_tokens for r in few] == [r.max_new_tokens for r in many]
    assert without_adapters(many) == [BenchRequest(r.index, None, r.prompt_token_ids, r.max_new_tokens)
                                      for r in few]


def test_power_law_weights_follow_one_over_rank():
    w = power_law_weights(4, alpha=1.0)
    assert sum(w) == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2.0)
    assert w[0] / w[3] == pytest.approx(4.0)
    assert power_law_weights(3, alpha=0.0) == pytest.approx([1 / 3] * 3)


def test_sampled_popularity_has_the_power_law_shape():
    n, count = 16, 40_000
    picks = sample_adapters(n, count, 1.0, random.Random(0))
    freq = sorted(Counter(picks).values(), reverse=True)
    expected = [w * count for w in power_law_weights(n)]
    # the k-th most requested adapter gets about 1/k of the top one's requests
    for got, want in zip(freq, expected, strict=True):
        assert got == pytest.approx(want, rel=0.1)
    assert len(freq) == n


def test_popularity_ranks_are_shuffled_over_adapters():
    tops = {Counter(sample_adapters(32, 2000, 1.0, random.Random(s))).most_common(1)[0][0] for s in range(8)}
    assert len(tops) > 1


def test_poisson_arrivals_have_the_requested_rate():
    arrivals = poisson_arrivals(rate=5.0, count=5000, rng=random.Random(2))
    assert arrivals[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(arrivals))
    assert len(arrivals) / arrivals[-1] == pytest.approx(5.0, rel=0.05)
    spec = WorkloadSpec(n_adapters=2, n_requests=10, rate=5.0)
    assert all(r.arrival_s is not None for r in make_workload(spec))


def test_adapter_specs_mix_ranks_and_targets():
    specs = adapter_specs(8)
    assert {s.rank for s in specs} == {8, 16}
    assert {s.targets for s in specs} == {ATTN_TARGETS, ATTN_TARGETS + MLP_TARGETS}
    assert len({s.name for s in specs}) == 8
    assert all(s.alpha == 2 * s.rank for s in specs)
    assert {(s.rank, s.has_mlp) for s in specs} == {(8, True), (16, True), (8, False), (16, False)}


@pytest.mark.parametrize("bad", [
    dict(n_requests=0), dict(prompt_len=(10, 5)), dict(output_len=(0, 4)), dict(rate=0.0), dict(vocab_size=50),
])
def test_bad_specs_are_refused(bad):
    with pytest.raises(ValueError):
        WorkloadSpec(**bad)


def test_requests_round_trip_through_json():
    requests = make_workload(WorkloadSpec(n_adapters=3, n_requests=5, rate=2.0))
    assert [BenchRequest.from_json(r.to_json()) for r in requests] == requests
