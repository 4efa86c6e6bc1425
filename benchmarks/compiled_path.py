"""The compiled model path (`--compile on`, runtime/compiled.py) against the eager one on this
machine: two in-process engines on the same base and adapters, driven step by step here in
interleaved rounds (medians).

Per batch size (sequences decoding at once, spread over the adapters):
- the decode step's wall time, median of `--steps` steps with every sequence decoding;
- the prefill of the batch's prompts (every step until all decode), wall time;
- kernels per decode step: the step's profiler leaves that compute (view, allocation and
  metadata ops left out), each fused kernel inductor generated counted once (inductor's C++
  kernels are profiled for that: TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1). On a GPU each is a
  launch; torch ops dispatched (`step_ops.py`) cannot be counted inside compiled code;
- the greedy tokens of both paths, which must be equal.
Plus the compiled engine's start: cold (an empty inductor cache) and warm (a restart, in a new
process, with the cache the cold start filled).

    .venv/bin/python -m loradock.benchmarks.compiled_path --home DIR [--quantize nf4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Ops that compute nothing (views, allocations, metadata): not kernels.
NOT_KERNELS = {
    "aten::as_strided", "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::slice", "aten::select",
    "aten::transpose", "aten::t", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::permute",
    "aten::alias", "aten::detach", "aten::detach_", "aten::_unsafe_view", "aten::resolve_conj",
    "aten::resolve_neg", "aten::lift_fresh", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::resize_", "aten::split", "aten::chunk", "aten::narrow", "aten::unbind", "aten::scalar_tensor",
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::set_",
}
PROMPT = "Write a short note for patient number {i} about the next appointment and what to bring."


def kernels_in(events) -> int:
    """Profiler leaves that compute: dispatcher ops with no op below them, plus inductor's
    fused C++ kernels (their record names carry "cpp_fused")."""
    def computes(e) -> bool:
        return "::" in e.name and e.name not in NOT_KERNELS and not any("::" in c.name for c in e.cpu_children)

    return sum(1 for e in events if "cpp_fused" in e.name or computes(e))


def start_engine(home: Path, quantize: str, compile_mode: str, max_running: int):
    from loradock.registry import Registry
    from loradock.runtime import Engine, EngineConfig

    registry = Registry(home)
    config = EngineConfig(base=registry.list_bases()[0].name, quantize=quantize, device="cpu", cpu_threads=1,
                          compile=compile_mode, max_running=max_running, max_batch_tokens=max(512, max_running),
                          max_queue=4 * max_running, prefix_caching=False, max_slots=8)
    started = time.perf_counter()
    engine = Engine(config, registry).start(run_loop=False)
    return engine, time.perf_counter() - started


def start_in_new_process(home: Path, quantize: str, max_running: int) -> float:
    """Seconds a compiled engine takes to start in a fresh process (as a restart would)."""
    code = ("import sys, torch; torch.set_num_threads(1); from loradock.benchmarks.compiled_path import start_engine; "
            f"engine, s = start_engine({str(home)!r}, {quantize!r}, 'on', {max_running}); print(s)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def measure(engine, adapters: list[str], n: int, steps: int) -> dict:
    """n requests at once; prefill wall time, then `steps` decode steps (median), one profiled."""
    from loradock.runtime import GenerationRequest, SamplingParams
    from loradock.runtime.sequence import SeqStatus
    from torch.profiler import ProfilerActivity, profile

    handles = [engine.submit(GenerationRequest(
        adapter=adapters[i % len(adapters)], prompt=PROMPT.format(i=i),
        sampling=SamplingParams(max_new_tokens=steps + 8, ignore_eos=True))) for i in range(n)]
    seqs = [engine._seqs[h.request_id] for h in handles]
    started = time.perf_counter()
    while any(s.status is not SeqStatus.RUNNING or s.in_prefill for s in seqs):
        if not engine.step():
            time.sleep(0.001)  # adapters loading
    prefill_s = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    while not all(h.done for h in handles):
        engine.step()
    tokens = [list(h.result().token_ids) for h in handles]
    return {"decode_step_ms": statistics.median(times) * 1e3, "prefill_ms": prefill_s * 1e3,
            "kernels_per_decode_step": kernels_in(prof.events()), "tokens": tokens}


def run(home: Path, quantize: str, sizes: list[int], rounds: int, steps: int, n_adapters: int) -> dict:
    from loradock.registry import Registry

    from .adapters import publish_random_adapters
    from .workload import AdapterSpec

    registry = Registry(home)
    base = registry.list_bases()[0]
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapters = [v.ref for v in publish_random_adapters(registry, base, [
        AdapterSpec(f"compiled-path-{i}", 16, targets) for i in range(n_adapters)])]
    os.environ["TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE"] = "1"
    with tempfile.TemporaryDirectory(prefix="loradock-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold: nothing compiled before
        engines = {}
        engines["eager"], eager_start = start_engine(home, quantize, "off", max(sizes))
        engines["compiled"], cold_start = start_engine(home, quantize, "on", max(sizes))
        warm_start = start_in_new_process(home, quantize, max(sizes))  # a restart: the graphs cached
    runs: dict[str, dict[int, list[dict]]] = {mode: {n: [] for n in sizes} for mode in engines}
    for r in range(rounds):
        for mode in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            for n in sizes:
                runs[mode][n].append(measure(engines[mode], adapters, n, steps))
    for engine in engines.values():
        engine.shutdown(drain=False)
    median = statistics.median
    by_size = {}
    for n in sizes:
        row = {}
        for mode in engines:
            ms = runs[mode][n]
            row[mode] = {k: round(median(m[k] for m in ms), 2) for k in ("decode_step_ms", "prefill_ms",
                                                                          "kernels_per_decode_step")}
        pairs = list(zip(runs["eager"][n], runs["compiled"][n], strict=True))
        row["compiled_over_eager"] = {k: round(median(c[k] / e[k] for e, c in pairs), 3)
                                      for k in ("decode_step_ms", "prefill_ms", "kernels_per_decode_step")}
        row["same_greedy_tokens"] = all(e["tokens"] == c["tokens"] for e, c in pairs)
        by_size[str(n)] = row
    return {"base": base.name, "quantize": quantize, "threads": torch.get_num_threads(), "rounds": rounds,
            "adapters": n_adapters, "start_s": {"eager": round(eager_start, 1), "compiled_cold": round(cold_start, 1),
                                                "compiled_warm": round(warm_start, 1)},
            "by_batch": by_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True, help="registry holding the base (adapters are added)")
    p.add_argument("--quantize", default="nf4", choices=("nf4", "none"), help="the base's weights")
    p.add_argument("--sizes", default="1,8,32", help="sequences decoding at once, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=12, help="decode steps timed per round")
    p.add_argument("--adapters", type=int, default=4, help="random rank-16 adapters the sequences use")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    result = run(args.home, args.quantize, [int(s) for s in args.sizes.split(",")], args.rounds, args.steps,
                 args.adapters)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
