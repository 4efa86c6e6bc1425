"""Harness mechanics without a model: the limit's layer list, left padding, FCFS static
batching (open and closed loop) and the threaded load drivers."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch
from loradock.benchmarks.hf_generate import left_padded, serve_static_batches
from loradock.benchmarks.limit import linear_shapes, time_linear_step
from loradock.benchmarks.load import closed_loop, open_loop, timed_stream
from loradock.benchmarks.metrics import RequestRecord
from loradock.benchmarks.workload import BenchRequest
from transformers import LlamaConfig


def req(i, arrival=None, tokens=3, adapter=0):
    return BenchRequest(i, adapter, (101, 102, 103)[: 1 + i % 3], tokens, arrival)


def test_linear_shapes_of_a_llama():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    shapes = linear_shapes(config)
    assert len(shapes) == 2 * 7 + 1
    assert shapes[:7] == [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert shapes[-1] == (64, 1000)
    assert time_linear_step(shapes, batch=2, dtype=torch.float32, repeats=2) > 0


def test_left_padding():
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def fake_batch_runner(log, step_s=0.01):
    """Stands in for generate(): one step per token of the longest request in the batch."""

    def run(batch):
        log.append([r.index for r, _ in batch])
        t0 = time.perf_counter()
        longest = max(r.max_new_tokens for r, _ in batch)
        time.sleep(step_s * longest)
        return [RequestRecord(r.index, r.adapter, len(r.prompt_token_ids), r.max_new_tokens, issued,
                              t0 + step_s, t0 + step_s * r.max_new_tokens) for r, issued in batch]

    return run


def test_static_batches_closed_loop_are_fcfs_and_bounded():
    log = []
    requests = [req(i) for i in range(7)]
    records = serve_static_batches(requests, batch_size=3, clients=3, run_batch=fake_batch_runner(log))
    assert log == [[0, 1, 2], [3, 4, 5], [6]]
    assert sorted(r.index for r in records) == list(range(7))
    by_index = {r.index: r for r in records}
    # request 3 is issued when its client's previous request (0) finished, not at the start
    assert by_index[3].start_s == pytest.approx(by_index[0].end_s)


def test_static_batches_open_loop_wait_for_arrivals():
    log = []
    requests = [req(0, 0.0), req(1, 0.0), req(2, 0.15), req(3, 0.16)]
    start = time.perf_counter()
    records = serve_static_batches(requests, batch_size=4, clients=1, run_batch=fake_batch_runner(log))
    assert log == [[0, 1], [2, 3]] or log == [[0, 1], [2], [3]]
    late = next(r for r in records if r.index == 2)
    assert late.start_s == pytest.approx(start + 0.15, abs=0.02)  # clock starts at arrival


def streaming_sender(step_s=0.005, fail_on=None):
    active = []
    lock = threading.Lock()
    peak = [0]

    def send(request):
        if request.index == fail_on:
            raise RuntimeError("adapter exploded")
        with lock:
            active.append(request.index)
            peak[0] = max(peak[0], len(active))
        try:
            for _ in range(request.max_new_tokens):
                time.sleep(step_s)
                yield object()
        finally:
            with lock:
                active.remove(request.index)

    return send, peak


def test_closed_loop_keeps_c_requests_in_flight():
    send, peak = streaming_sender()
    done = []
    records = closed_loop([req(i, tokens=4) for i in range(12)], clients=3, send=send, progress=done.append)
    assert [r.index for r in records] == list(range(12))
    assert peak[0] == 3 and sum(done) == 12
    assert all(r.error is None and r.output_tokens == 4 and r.ttft_s > 0 for r in records)


def test_open_loop_issues_at_arrival_times():
    send, peak = streaming_sender(step_s=0.02)
    requests = [req(i, arrival=0.01 * i, tokens=5) for i in range(6)]
    records = open_loop(requests, send)
    assert peak[0] > 1  # later arrivals do not wait for earlier ones
    starts = [r.start_s for r in records]
    assert [round(b - a, 3) for a, b in itertools.pairwise(starts)] == [0.01] * 5


def test_failures_and_short_streams_are_errors_not_crashes():
    send, _ = streaming_sender(fail_on=1)
    failed = timed_stream(req(1), time.perf_counter(), send)
    assert failed.error == "RuntimeError: adapter exploded" and failed.first_token_s is None

    def short(request):
        yield object()

    record = timed_stream(req(2, tokens=3), time.perf_counter(), short)
    assert record.error == "expected 3 tokens (EOS ignored), got 1"


def test_cpu_meter_counts_work_not_sleep():
    from loradock.benchmarks.cputime import CpuMeter

    with CpuMeter() as idle:
        time.sleep(0.2)
    with CpuMeter() as busy:
        end = time.perf_counter() + 0.2
        while time.perf_counter() < end:
            pass
    assert idle.seconds < 0.05
    assert busy.seconds > 0.05
