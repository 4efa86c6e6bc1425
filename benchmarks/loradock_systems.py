"""loradock under test, run by a worker process:

- `loradock`: the engine in this process, requests submitted from client threads;
  also the probes that need the engine (cold load, decode-step overhead, alias move).
- `loradock-grpc`: `loradock serve` in a child process, requests streamed over gRPC by
  concurrent client threads; the reported peak RSS is the server's.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from loradock.registry import Registry
from loradock.runtime.config import EngineConfig
from loradock.runtime.engine import Engine
from loradock.runtime.types import GenerationRequest, SamplingParams

from loradock.client import Client
from loradock.server_process import ServerProcess

from .cputime import CpuMeter
from .job import Job
from .kv_concurrency import kv_concurrency
from .load import Progress, drive, timed_stream
from .metrics import RequestRecord, percentile
from .prefix_cache import prefix_cache_probe
from .step_ops import ops_per_decode_step
from .workload import RANKS, BenchRequest

log = logging.getLogger(__name__)

PROBE_PROMPT_TOKENS = 16
ALIAS = "bench-live"


def engine_settings(job: Job) -> dict:
    """EngineConfig fields for this job, shared by the in-process engine and the server's flags."""
    settings = {
        "base": job.base,
        "quantize": job.quantize,
        "dtype": job.dtype,
        "max_running": job.max_running,
        "max_slots": job.max_slots,
        "max_rank": max(RANKS),  # slot buffers sized to the workload, as an operator would
        "max_batch_tokens": max(512, job.max_running),
        "max_queue": len(job.requests) + 2 * job.max_running,
    }
    if "registry_poll_s" in job.probes:  # else the engine's default
        settings["registry_poll_s"] = float(job.probes["registry_poll_s"])
    return settings


def engine_request(job: Job, request: BenchRequest) -> GenerationRequest:
    ref = None if request.adapter is None else job.adapter_refs[request.adapter]
    return GenerationRequest(
        adapter=ref,
        prompt_token_ids=tuple(request.prompt_token_ids),
        sampling=SamplingParams(max_new_tokens=request.max_new_tokens, ignore_eos=True),
    )


def probe_request(job: Job, adapter: int | None, max_new_tokens: int) -> BenchRequest:
    """A short fixed request used by the probes (the workload's first prompt, cut to 16 tokens)."""
    prompt = job.requests[0].prompt_token_ids[:PROBE_PROMPT_TOKENS]
    return BenchRequest(-1, adapter, prompt, max_new_tokens)


# ---- in-process engine ----------------------------------------------------------------------


def run_engine(job: Job, progress: Progress, extra: dict) -> list[RequestRecord]:
    """The workload through an in-process Engine, plus the probes (into `extra`)."""
    records = serve_workload(job, progress, extra)  # its engine is gone once this returns
    # The system's peak is the serving engine's; the probes below start engines of their own.
    extra["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if job.probes.get("step_ops_sizes"):
        extra["ops_per_decode_step"] = measure_step_ops(job, job.probes["step_ops_sizes"])
    if job.probes.get("kv_concurrency"):
        extra["kv_concurrency"] = measure_kv_concurrency(job)
    if job.probes.get("prefix_cache"):
        extra["prefix_cache"] = measure_prefix_cache(job)
    return records


def serve_workload(job: Job, progress: Progress, extra: dict) -> list[RequestRecord]:
    """The workload and the probes that share its engine (cold load, decode step, alias move)."""
    engine = Engine(EngineConfig(**engine_settings(job)), Registry(job.home))
    engine.start()
    try:

        def send(request: BenchRequest) -> Iterable[object]:
            return engine.submit(engine_request(job, request))

        timed_stream(probe_request(job, None, 2), time.perf_counter(), send)  # warm-up, base only
        # Cold loads before the workload: no adapter has been touched yet.
        extra["cold_load"] = measure_cold_load(job, send, job.probes.get("cold_adapters", []))
        with CpuMeter() as cpu:
            records = drive(job.requests, job.clients, send, progress)
        extra["workload_cpu_s"] = cpu.seconds
        if job.probes.get("step_adapters"):
            extra["decode_step"] = measure_decode_step(job, send, job.probes["step_adapters"],
                                                       rounds=job.probes.get("step_rounds", 3))
        if job.probes.get("alias_adapter") is not None:
            extra["alias_move"] = measure_alias_move(job, engine, job.probes["alias_adapter"])
    finally:
        engine.shutdown()
    return records


def measure_kv_concurrency(job: Job, kv_tokens: int = 2048, max_running: int = 64) -> dict:
    """Sequences run at once on a 2048-token KV budget: paged pool vs per-sequence reservation."""
    settings = {**engine_settings(job), "max_running": max_running, "max_queue": 4 * max_running,
                "max_batch_tokens": max(512, max_running), "kv_cache_tokens": kv_tokens,
                "max_model_len": min(kv_tokens, 2048), "max_prompt_tokens": 256}
    engine = Engine(EngineConfig(**settings), Registry(job.home)).start(run_loop=False)
    try:
        return kv_concurrency(engine, job.requests[0].prompt_token_ids[:PROBE_PROMPT_TOKENS])
    finally:
        engine.shutdown(drain=False)


def measure_prefix_cache(job: Job, adapters: int = 4) -> dict:
    """The prefix cache off and on, over requests that share their adapter's system prompt."""
    settings = {**engine_settings(job), "max_queue": 64, "max_model_len": 512, "max_prompt_tokens": 256}

    def make_engine(prefix_caching: bool) -> Engine:
        config = EngineConfig(**settings, prefix_caching=prefix_caching)
        return Engine(config, Registry(job.home)).start(run_loop=False)

    vocab = json.loads((Path(job.base_path) / "config.json").read_text())["vocab_size"]
    return prefix_cache_probe(make_engine, job.adapter_refs[:adapters], vocab)


def measure_step_ops(job: Job, sizes: list[int]) -> dict[str, int]:
    """Torch ops per decode step at each number of running sequences, on distinct adapters
    (as many as the job has), from an engine driven step by step."""
    largest = max(sizes)
    settings = {**engine_settings(job), "max_running": largest, "max_slots": largest,
                "max_batch_tokens": max(512, largest), "max_queue": largest}
    engine = Engine(EngineConfig(**settings), Registry(job.home)).start(run_loop=False)
    try:
        prompt = job.requests[0].prompt_token_ids[:PROBE_PROMPT_TOKENS]
        return ops_per_decode_step(engine, job.adapter_refs, prompt, sizes)
    finally:
        engine.shutdown(drain=False)


def drive_server(job: Job, server_pid: int, send, progress: Progress, extra: dict) -> list[RequestRecord]:
    """Warm a server child up, then run the workload through `send`, counting the server's CPU
    and the clients' (into `extra["workload_cpu_s"]`)."""
    timed_stream(probe_request(job, None, 2), time.perf_counter(), send)
    with CpuMeter([server_pid]) as cpu:
        records = drive(job.requests, job.clients, send, progress)
    extra["workload_cpu_s"] = cpu.seconds
    return records


def measure_cold_load(job: Job, send, adapters: list[int]) -> dict:
    """Registry -> first token for adapters never used before: cold TTFT minus the warm TTFT
    of the same request right after (the difference is what loading put on the request path)."""
    cold, warm = [], []
    for adapter in adapters:
        request = probe_request(job, adapter, 1)
        first = timed_stream(request, time.perf_counter(), send)
        again = timed_stream(request, time.perf_counter(), send)
        if first.error or again.error:
            log.warning("cold-load probe on %s failed: %s", job.adapter_refs[adapter], first.error or again.error)
            continue
        cold.append(first.ttft_s * 1e3)
        warm.append(again.ttft_s * 1e3)
    extra_ms = [c - w for c, w in zip(cold, warm, strict=True)]
    return {
        "n": len(cold),
        "adapters": [job.adapter_refs[a] for a in adapters],
        "cold_ttft_p50_ms": percentile(cold, 50),
        "warm_ttft_p50_ms": percentile(warm, 50),
        "load_p50_ms": percentile(extra_ms, 50),
        "load_p99_ms": percentile(extra_ms, 99),
    }


def measure_decode_step(job: Job, send, adapters: list[int], new_tokens: int = 24, rounds: int = 3) -> dict:
    """Decode-step time with len(adapters) sequences on distinct adapters vs the same batch on the base.

    All sequences are submitted together with equal prompt and output lengths, so after the
    first step they decode as one batch; the median time per output token is the step time.
    The two batches alternate for `rounds` rounds and the ratio is the median of the rounds'
    ratios, so a noisy neighbour slowing one phase does not decide the result.
    """
    from concurrent.futures import ThreadPoolExecutor

    def step_ms(targets: list[int | None]) -> float:
        requests = [probe_request(job, a, new_tokens) for a in targets]
        with ThreadPoolExecutor(len(requests)) as pool:  # warm: load every adapter first
            list(pool.map(lambda r: timed_stream(BenchRequest(-1, r.adapter, r.prompt_token_ids, 1),
                                                 time.perf_counter(), send), requests))
            records = list(pool.map(lambda r: timed_stream(r, time.perf_counter(), send), requests))
        failed = [r.error for r in records if r.error]
        if failed:
            raise RuntimeError(f"decode-step probe failed: {failed[0]}")
        return statistics.median(r.tpot_s for r in records) * 1e3

    with_adapters, base_only = [], []
    for _ in range(rounds):
        with_adapters.append(step_ms(list(adapters)))
        base_only.append(step_ms([None] * len(adapters)))
    return {
        "batch": len(adapters),
        "distinct_adapters": len(set(adapters)),
        "rounds": rounds,
        "adapters_step_ms": statistics.median(with_adapters),
        "base_step_ms": statistics.median(base_only),
        "ratio": statistics.median(a / b for a, b in zip(with_adapters, base_only, strict=True)),
    }


def measure_alias_move(job: Job, engine: Engine, adapter: int, timeout_s: float = 30.0) -> dict:
    """Move an alias from version 1 to version 2 of an adapter, then time until a request
    through the alias is served by version 2 (the engine notices registry changes by polling)."""
    registry = Registry(job.home)
    name = job.adapter_refs[adapter].split("@")[0]
    registry.tag(f"{name}@1", ALIAS)
    ref = f"{name}@{ALIAS}"
    prompt = tuple(job.requests[0].prompt_token_ids[:PROBE_PROMPT_TOKENS])

    def served_version() -> int:
        request = GenerationRequest(adapter=ref, prompt_token_ids=prompt,
                                    sampling=SamplingParams(max_new_tokens=1, ignore_eos=True))
        return engine.generate(request).adapter.version

    before = served_version()
    registry.tag(f"{name}@2", ALIAS)
    moved = time.perf_counter()
    requests_on_old = 0
    while (version := served_version()) != 2:
        requests_on_old += 1
        if time.perf_counter() - moved > timeout_s:
            raise RuntimeError(f"{ref} still served version {version} {timeout_s:.0f} s after the move")
    return {
        "ref": ref,
        "version_before": before,
        "move_to_served_ms": (time.perf_counter() - moved) * 1e3,
        "requests_on_old_version": requests_on_old,
        "registry_poll_s": engine.config.registry_poll_s,
    }


# ---- gRPC -----------------------------------------------------------------------------------


def server_flags(job: Job) -> list[str]:
    """`loradock serve` flags carrying the same engine settings as the in-process run."""
    flags = []
    for key, value in engine_settings(job).items():
        if key != "base":
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def is_serving(address: str) -> bool:
    try:
        with Client(address, timeout=2.0) as client:
            return client.health() == "SERVING"
    except Exception:  # not listening yet
        return False


def run_grpc(job: Job, progress: Progress, extra: dict) -> list[RequestRecord]:
    """The workload streamed over gRPC to a `loradock serve` child with the same engine settings."""
    with tempfile.TemporaryDirectory(prefix="loradock-bench-serve-") as tmp:
        server = ServerProcess(Path(job.home), job.base, log_path=Path(tmp) / "serve.log",
                               is_serving=is_serving, extra_args=server_flags(job))
        with server, Client(server.address) as client:

            def send(request: BenchRequest) -> Iterable[object]:
                ref = None if request.adapter is None else job.adapter_refs[request.adapter]
                return client.stream(prompt_token_ids=request.prompt_token_ids, adapter=ref,
                                     max_new_tokens=request.max_new_tokens, ignore_eos=True)

            records = drive_server(job, server.pid, send, progress, extra)
        # The server has exited (SIGTERM, drained) and been waited for: its peak RSS is in
        # RUSAGE_CHILDREN, which is what this system costs (the clients are not the server).
        extra["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return records
