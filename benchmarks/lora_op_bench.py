"""Which LoRA op, in which buffer dtype, on this device: every op of `runtime.lora_ops` timed on
one layer's shapes with 32 rank-16 adapters, next to the base layer's own matmul in the same
dtype, for a decode step (32 tokens, each on its own adapter) and a mixed step (4 prompt chunks
of 128 tokens next to 28 decode tokens). Medians of interleaved rounds. Run by hand; the table
goes to docs/architecture.md.

    python -m loradock.benchmarks.lora_op_bench [--json PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from loradock.runtime import batching
from loradock.runtime.lora_ops import LORA_OPS
from loradock.runtime.model_runner import lora_batch
from loradock.runtime.triton_lora import available as triton_available

from .timing import device_seconds

ADAPTERS, RANK = 32, 16
# (model, layer, in_features, out_features): SmolLM2-135M and a 1.1B Llama (synthetic-1b)
LAYERS = (("smollm2-135m", "q_proj", 576, 576), ("smollm2-135m", "down_proj", 1536, 576),
          ("synthetic-1b", "q_proj", 2048, 2048), ("synthetic-1b", "gate_proj", 2048, 5632),
          ("synthetic-1b", "down_proj", 5632, 2048))
STEPS = {
    "decode 32": ([*range(1, ADAPTERS + 1)], [1] * ADAPTERS),
    "4x128 prefill + 28 decode": ([*range(1, ADAPTERS + 1)], [128] * 4 + [1] * (ADAPTERS - 4)),
}
DTYPES = (torch.float32, torch.bfloat16)


def op_names(device: torch.device) -> list[str]:
    names = ["segmented", "batched", "auto"]
    if device.type == "cuda" and triton_available():
        names.append("triton")
    return names


def layer_calls(x: torch.Tensor, weight: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor,
                batch, device: torch.device) -> dict[str, Callable[[], object]]:
    """The base layer's matmul and each op's delta, as calls to time."""
    calls: dict[str, Callable[[], object]] = {"base matmul": lambda: torch.nn.functional.linear(x, weight)}
    for name in op_names(device):
        op = LORA_OPS[name]
        calls[name] = lambda op=op: op(x, shrink, expand, batch, batch.slots_present)
    return calls


@torch.inference_mode()
def measure(device: torch.device, rounds: int, inner: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for model, layer, d_in, d_out in LAYERS:
        for step, (seq_slots, chunk_lens) in STEPS.items():
            slot_list = batching.token_slots(seq_slots, chunk_lens)
            batch = lora_batch(slot_list, device)
            for dtype in DTYPES:
                shrink = torch.randn(ADAPTERS + 1, RANK, d_in, generator=gen).to(device, dtype) * 0.01
                expand = torch.randn(ADAPTERS + 1, RANK, d_out, generator=gen).to(device, dtype) * 0.01
                shrink[0], expand[0] = 0, 0
                weight = torch.randn(d_out, d_in, generator=gen).to(device, dtype)
                x = torch.randn(len(slot_list), d_in, generator=gen).to(device, dtype)
                calls = layer_calls(x, weight, shrink, expand, batch, device)
                times: dict[str, list[float]] = {name: [] for name in calls}
                for fn in calls.values():  # warm-up (Triton compiles here)
                    fn()
                for _ in range(rounds):  # interleaved, so drift hits every op alike
                    for name, fn in calls.items():
                        times[name].append(device_seconds(lambda fn=fn: [fn() for _ in range(inner)], device)
                                           / inner)
                medians = {name: statistics.median(t) * 1e6 for name, t in times.items()}
                rows.append({"model": model, "layer": layer, "in": d_in, "out": d_out, "step": step,
                             "tokens": len(slot_list), "dtype": str(dtype).removeprefix("torch."),
                             "us": medians})
    return rows


def markdown(rows: list[dict], device_name: str) -> str:
    names = list(rows[0]["us"])
    lines = [f"LoRA ops on {device_name}, {ADAPTERS} adapters of rank {RANK}, median µs per layer call",
             "", "| layer | step | dtype | " + " | ".join(names) + " |",
             "|---|---|---|" + "---:|" * len(names)]
    for r in rows:
        lines.append(f"| {r['model']} {r['layer']} ({r['in']}->{r['out']}) | {r['step']} | {r['dtype']} | "
                     + " | ".join(f"{r['us'][n]:.1f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to PATH")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default: 1)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inner = 20 if device.type == "cuda" else 2
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    rows = measure(device, args.rounds, inner)
    print(markdown(rows, name))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
