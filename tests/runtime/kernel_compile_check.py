"""Compile every variant of loradock's Triton kernels that the launchers produce, for Hopper
(sm_90) and Ampere (sm_80), on a machine without a GPU: Triton's NVIDIA backend compiles to a
cubin without a driver. The interpreter (the kernels' numerical tests) runs them as Python and
cannot see what only the compiler rejects: types that differ between branches, constructs the
frontend does not support, shapes tl.dot refuses. Run by tests/runtime/test_kernel_compile.py
in a process of its own (the test session runs Triton in interpreter mode).

    .venv/bin/python tests/runtime/kernel_compile_check.py [--quick]

Prints each variant; exits 1 if any fails to compile. `--quick` (the test suite's): bf16, the
CUDA default, for sm_90 only; without it also float32 (the CUDA tests' exact path) and sm_80.

The launchers run here on CPU tensors up to the launch, which is recorded instead of made.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET: this compiles the kernels"

import triton  # noqa: E402
from loradock.runtime import triton_attention, triton_lora  # noqa: E402
from loradock.runtime.batch_context import static_lora_batch  # noqa: E402
from loradock.runtime.model_runner import lora_batch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
         torch.int32: "i32", torch.uint8: "u8"}


def recorded_launches(dtypes: tuple[torch.dtype, ...]) -> list[tuple[JITFunction, dict, dict]]:
    """(kernel, signature, constexprs) of every launch the launchers make for a spread of inputs."""
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        values = dict(zip([p.name for p in self.params], args, strict=False)) | kwargs
        signature, constexprs = {}, {}
        for p in self.params:
            value = values[p.name]
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[p.name] = "*" + TYPES[value.dtype]
            else:
                signature[p.name] = "fp32" if isinstance(value, float) else "i32"
        launches.append((self, signature, constexprs))

    JITFunction.run = record
    for dtype in dtypes:
        lora_launches(dtype)
        attention_launches(dtype)
    unique = {}
    for kernel, signature, constexprs in launches:
        unique.setdefault((kernel.fn.__name__, tuple(signature.values()), tuple(constexprs.items())),
                          (kernel, signature, constexprs))
    return list(unique.values())


def lora_launches(dtype: torch.dtype) -> None:
    slots, rank, k, n = 5, 16, 4096, 1024
    shrink, expand = torch.zeros(slots, rank, k, dtype=dtype), torch.zeros(slots, rank, n, dtype=dtype)
    rows = torch.zeros(slots, n, dtype=dtype)
    ranks = torch.full((slots,), rank, dtype=torch.int32)
    for batch in (lora_batch([1] * 8 + [2] * 200, torch.device("cpu")),  # a prompt chunk: no split
                  static_lora_batch(torch.zeros(64, dtype=torch.long))):  # a captured step: split-K
        x = torch.zeros(batch.token_slots.shape[0], k, dtype=dtype)
        triton_lora.triton_lora(x, shrink, expand, batch, (1, 2))
        triton_lora.triton_lora(x, shrink, expand, batch, (1, 2), ranks)
        out = torch.zeros(x.shape[0], n, dtype=dtype)
        triton_lora.triton_lora_into(out, x, shrink, expand, batch, rows, rows, None, ranks)
        triton_lora.triton_lora_into(out, x, shrink, expand, batch, rows, rows, rows[0], ranks)
        triton_lora.grouped_shrink(x, [shrink] * 3, batch, [ranks] * 3)


def attention_launches(dtype: torch.dtype) -> None:
    pool = torch.zeros(64, 8, 128, dtype=dtype)  # [slots, kv heads, head dim]
    tables = torch.zeros(2, 4, dtype=torch.int32)
    for new in ([1, 1], [100, 1]):  # decode rows, a prompt chunk
        seqs = triton_attention.paged_seqs([0, new[0]], [3, 5], new, tables, 16)
        static = triton_attention.PagedSeqs(seqs.tables.long(), seqs.seqs.long(), seqs.max_new, 16)  # a graph's
        q = torch.zeros(sum(new), 32, 128, dtype=dtype)
        for window, softcap in ((None, None), (4096, 50.0)):
            for batch in (seqs, static):
                triton_attention.paged_attention(q, pool, pool, batch, window=window, softcap=softcap)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="bf16 for sm_90 only")
    quick = p.parse_args().quick
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
    targets = [GPUTarget("cuda", arch, 32) for arch in ((90,) if quick else (90, 80))]
    failed = 0
    for kernel, signature, constexprs in recorded_launches(dtypes):
        for target in targets:
            pointers = sorted({t for t in signature.values() if t.startswith("*")})
            name = f"{kernel.fn.__name__} sm_{target.arch} [{' '.join(pointers)}] " + " ".join(
                f"{k}={v}" for k, v in constexprs.items())
            started = time.perf_counter()
            try:
                triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)
                print(f"ok    {name} ({time.perf_counter() - started:.1f} s)", flush=True)
            except Exception as e:
                failed += 1
                print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
