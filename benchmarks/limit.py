"""The throughput limit every system is measured against.

One decode step of a batch of B sequences pushes B token vectors through every
linear layer of the base (q/k/v/o, gate/up/down per layer, then lm_head). Timed as
bare matmuls in the compute dtype, with one weight matrix per layer as in the model
(so weights stream from memory as they do in a real step) and no attention, no
sampling, no Python model code, that step time gives B / t tokens/s: no system
decoding this model on this machine with this dtype should beat it. The machine limit is
the better of float32 and bfloat16 (CPUs with bf16 matrix units run bf16 several times
faster, and unquantized bf16 is a real serving mode).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from transformers import AutoConfig

from .timing import device_seconds


def linear_shapes(config) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear layer one forward pass runs, in order."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = config.intermediate_size
    per_layer = [
        (hidden, heads * head_dim),  # q_proj
        (hidden, kv * head_dim),  # k_proj
        (hidden, kv * head_dim),  # v_proj
        (heads * head_dim, hidden),  # o_proj
        (hidden, inter),  # gate_proj
        (hidden, inter),  # up_proj
        (inter, hidden),  # down_proj
    ]
    return per_layer * config.num_hidden_layers + [(hidden, config.vocab_size)]  # + lm_head


def time_linear_step(
    shapes: list[tuple[int, int]], batch: int, dtype: torch.dtype, repeats: int = 10
) -> float:
    """Median seconds of one pass of `batch` rows through all `shapes` as x @ W.T, on the
    engine's default device (CUDA when there is one)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn((out, inp), generator=gen).to(device, dtype) for inp, out in shapes]
    inputs = {inp: torch.randn((batch, inp), generator=gen).to(device, dtype) for inp, _ in shapes}

    def step() -> None:
        for (inp, _), w in zip(shapes, weights, strict=True):
            torch.nn.functional.linear(inputs[inp], w)

    with torch.inference_mode():  # the first pass warms caches and allocators
        times = [device_seconds(step, device) for _ in range(repeats + 1)]
    return statistics.median(times[1:])


def decode_limit(base_path: Path, batch: int, dtype: torch.dtype, threads: int, repeats: int = 10) -> dict:
    """The limit for `batch` sequences with `threads` torch threads (as the systems get):
    step time and tokens/s of the bare linear layers."""
    shapes = linear_shapes(AutoConfig.from_pretrained(base_path))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step_s = time_linear_step(shapes, batch, dtype, repeats)
    finally:
        torch.set_num_threads(previous)
    return {
        "batch": batch,
        "threads": threads,
        "dtype": str(dtype).removeprefix("torch."),
        "linear_layers": len(shapes),
        "flops_per_step": 2 * batch * sum(i * o for i, o in shapes),
        "step_ms": step_s * 1e3,
        "tokens_per_s": batch / step_s,
    }



LIMIT_DTYPES = (torch.float32, torch.bfloat16)


def machine_limit(base_path: Path, batch: int, threads: int, repeats: int = 10) -> dict:
    """`decode_limit` in each of LIMIT_DTYPES; the fastest one's figures, plus all of them."""
    by_dtype = {str(d).removeprefix("torch."): decode_limit(base_path, batch, d, threads, repeats)
                for d in LIMIT_DTYPES}
    best = max(by_dtype.values(), key=lambda r: r["tokens_per_s"])
    return {**best, "by_dtype": by_dtype}
