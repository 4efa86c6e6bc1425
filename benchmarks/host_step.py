"""Host time to build one step's metadata: what a GPU waits for between steps (no model runs).

For decode steps of 8, 32 and 64 sequences with 512 and 2,048 tokens of context each, and a
mixed step (a 300-token prompt chunk beside the decode tokens):
- `captured`: `cuda_graphs.StaticStep.fill`, the persistent inputs of a captured step (paged
  attention), written on the host before the one copy;
- `eager`: `model_runner.lora_batch` + `attention_batch`, an uncaptured step's batch context
  (paged attention).
Medians of `--runs` runs, one torch thread, on this machine's CPU.

    .venv/bin/python -m loradock.benchmarks.host_step [--runs 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from loradock.runtime import batching
from loradock.runtime.cuda_graphs import StaticStep
from loradock.runtime.kv_cache import KVPool
from loradock.runtime.model_runner import StepItem, attention_batch, lora_batch

BLOCK = 16
CPU = torch.device("cpu")


def median_ms(run: Callable[[], object], runs: int) -> float:
    for _ in range(10):
        run()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 4)


def step_items(sequences: int, context: int, prompt: int) -> list[StepItem]:
    """`sequences` decoding at `context` tokens (8 adapters, in slot order), the last one instead
    bringing a `prompt`-token chunk when `prompt`."""
    blocks = -(-context // BLOCK)
    items = [StepItem(list(range(1 + i * blocks, 1 + (i + 1) * blocks)), context - 1, [5], 1 + i % 8, True)
             for i in range(sequences)]
    if prompt:
        items[-1] = StepItem(items[-1].blocks[:-(-prompt // BLOCK)], 0, [5] * prompt, items[-1].slot, True)
    return sorted(items, key=lambda it: it.slot)


def measure(runs: int) -> list[dict]:
    pool = KVPool(1, 1, 4, 64 * 2048 // BLOCK + 1, BLOCK, torch.float32, CPU)
    rows = []
    for sequences in (8, 32, 64):
        for context, prompt in ((512, 0), (2048, 0), (2048, 300)):
            items = step_items(sequences, context, prompt)
            tokens = sum(len(it.tokens) for it in items)
            step = (StaticStep(lambda **_: None, pool, CPU, rows=sequences, context=2048, paged=True) if not prompt
                    else StaticStep(lambda **_: None, pool, CPU, rows=512, context=2048, paged=True,
                                    seqs=sequences + 1))
            chunks = [len(it.tokens) for it in items]
            _, cu_lens = batching.pack_tokens([it.tokens for it in items])

            def eager(items=items, chunks=chunks, cu_lens=cu_lens):
                lora_batch(batching.token_slots([it.slot for it in items], chunks), CPU)
                attention_batch(pool, items, cu_lens, CPU, paged=True)

            rows.append({"sequences": sequences, "context": context, "tokens": tokens,
                         "captured_ms": median_ms(lambda step=step, items=items: step.fill(items, BLOCK), runs),
                         "eager_ms": median_ms(eager, runs)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=200, help="runs per figure (the median is kept)")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    result = {"machine": "this CPU, one torch thread", "steps": measure(args.runs)}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
