"""Measure the engine's decode step time and adapter cold-load time (not a test; run by hand).

    .venv/bin/python -m tests.runtime.measure_step --home /tmp/rt/home --base smollm2-135m-instruct \\
        --quantize nf4 --threads 1

Decode step time: 32 running sequences, each on its own adapter (rank 16, attention + MLP),
against 32 sequences on the base alone, after all prompts are prefilled. Cold load: one new
rank-16 attention+MLP adapter from the registry to a device slot (`Engine.load_adapter`).
With `--dora N`, also the step with N of the 32 adapters DoRA ones (distinct, same shapes) and
the cold load of a DoRA adapter (its weight norms are computed then, against the served base).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from loradock.benchmarks.step_ops import ops_per_decode_step
from loradock.registry import Registry
from loradock.runtime import Engine, EngineConfig, GenerationRequest, SamplingParams
from loradock.runtime.sequence import SeqStatus

from tests.adapters import make_lora_adapter
from tests.runtime.conftest import ATTN_MLP


def decode_step_times(engine: Engine, adapters: list[str | None], steps: int) -> tuple[float, float]:
    """Median wall time and median thread CPU time (ms) of one engine step once every sequence
    is decoding. CPU time is far less disturbed by other processes on a shared machine (with one
    torch thread, the step's maths runs on this thread)."""
    handles = [engine.submit(GenerationRequest(
        adapter=a, prompt=f"Request number {i}: tell me about the sea.",
        sampling=SamplingParams(max_new_tokens=steps + 4, ignore_eos=True))) for i, a in enumerate(adapters)]
    seqs = [engine._seqs[h.request_id] for h in handles]
    while any(s.status is not SeqStatus.RUNNING or s.in_prefill for s in seqs):  # admission + prefill
        if not engine.step():
            time.sleep(0.01)
    wall, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.thread_time()
        engine.step()
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.thread_time() - c) * 1000)
    for h in handles:
        h.cancel()
    engine.step()
    return statistics.median(wall), statistics.median(cpu)


def decode_step_ms(engine: Engine, adapters: list[str | None], steps: int) -> float:
    """Median wall time of one engine step once every sequence is decoding."""
    return decode_step_times(engine, adapters, steps)[0]


def dora_step_cost(engine: Engine, plain: list[str], mixed: list[str], steps: int, rounds: int) -> dict:
    """The decode step on all-plain adapters against the same batch with some of them DoRA, in
    alternating rounds (so both see the same machine load), with the median ratio of the rounds.
    Both batches must span equally many slots (the batched op pads over the slot range): with
    len(plain) + (DoRA count) slots, plain takes 1..32 and the mixed batch 9..40."""
    per_round = [(decode_step_times(engine, plain, steps), decode_step_times(engine, mixed, steps))
                 for _ in range(rounds)]
    median = statistics.median
    return {
        "plain_wall_ms": round(median(p[0] for p, _ in per_round), 1),
        "dora_wall_ms": round(median(d[0] for _, d in per_round), 1),
        "plain_cpu_ms": round(median(p[1] for p, _ in per_round), 1),
        "dora_cpu_ms": round(median(d[1] for _, d in per_round), 1),
        "wall_ratio": round(median(d[0] / p[0] for p, d in per_round), 3),
        "cpu_ratio": round(median(d[1] / p[1] for p, d in per_round), 3),
        "rounds": rounds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", required=True, help="registry root holding the base")
    p.add_argument("--base", required=True, help="registry base name")
    p.add_argument("--quantize", default="nf4", choices=["nf4", "int8", "none"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ops", default="auto,segmented,batched")
    p.add_argument("--attention", default="sdpa", help="attention backends, comma-separated (triton on CPU: "
                   "under TRITON_INTERPRET=1, for op counts only, --steps 0)")
    p.add_argument("--dora", type=int, default=0, help="also measure with this many DoRA adapters")
    p.add_argument("--rounds", type=int, default=3, help="alternating plain / DoRA rounds (with --dora)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    registry = Registry(args.home)
    base = registry.base(args.base)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        src = make_lora_adapter(base.path, Path(tmp) / "a", rank=16, alpha=32, targets=ATTN_MLP, seed=0,
                                scale=0.05)
        dora_src = make_lora_adapter(base.path, Path(tmp) / "d", rank=16, alpha=32, targets=ATTN_MLP, seed=1,
                                     scale=0.05, use_dora=True) if args.dora else None

        def published(prefix: str, source: Path, count: int) -> list[str]:
            names = []
            for i in range(count):  # same weights, distinct adapters (own slot each)
                name = f"{prefix}-{base.name}-{i}"
                try:
                    registry.resolve(name)
                except Exception:
                    registry.publish(source, name, base=base.name)
                names.append(name)
            return names

        names = published("measure", src, args.sequences + 1)
        dora_names = published("measure-dora", dora_src, args.dora + 1) if args.dora else []
        print(f"prepared {len(names)} adapters in {time.perf_counter() - t:.1f} s")

    report: dict = {"base": base.name, "quantize": args.quantize, "threads": torch.get_num_threads(),
                    "sequences": args.sequences}
    for ops, attention in ((o, a) for o in args.ops.split(",") for a in args.attention.split(",")):
        label = ops if attention == "sdpa" else f"{ops}, {attention} attention"
        engine = Engine(EngineConfig(
            base=base.name, quantize=args.quantize, max_slots=args.sequences + args.dora, max_rank=16,
            max_running=args.sequences, max_batch_tokens=max(512, args.sequences), lora_ops=ops,
            max_model_len=256, max_prompt_tokens=128, kv_cache_tokens=args.sequences * 256,
            attention=attention,
        ), registry).start(run_loop=False)
        t = time.perf_counter()
        engine.load_adapter(names[-1])
        report["cold_load_ms"] = round((time.perf_counter() - t) * 1000, 1)
        engine.unload_adapter(names[-1])  # its slot would widen the steps' slot range below
        if args.steps and "base_step_ms" not in report:
            report["base_step_ms"] = round(decode_step_ms(engine, [None] * args.sequences, args.steps), 1)
        if args.steps:
            report[f"adapters_step_ms[{label}]"] = round(
                decode_step_ms(engine, names[:args.sequences], args.steps), 1)
        if args.dora:
            t = time.perf_counter()
            engine.load_adapter(dora_names[-1])
            report["dora_cold_load_ms"] = round((time.perf_counter() - t) * 1000, 1)
            engine.unload_adapter(dora_names[-1])
            mixed = dora_names[:args.dora] + names[args.dora:args.sequences]
            report[f"dora_step[{ops}, {args.dora} of {args.sequences} DoRA]"] = dora_step_cost(
                engine, names[:args.sequences], mixed, args.steps, args.rounds)
        report[f"ops_per_decode_step[{label}]"] = ops_per_decode_step(
            engine, names[:args.sequences], engine.tokenizer.encode("Tell me about the sea."),
            (1, 8, args.sequences))
        engine.shutdown(drain=False)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
