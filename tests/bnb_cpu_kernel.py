"""bitsandbytes' AVX512-BF16 CPU 4-bit kernel, natively where the CPU has it and emulated where
it does not, so the tests that depend on it run the same arithmetic on every x86-64 CPU.

bitsandbytes 0.50.2 (`backends/cpu/ops.py`, `csrc/cpu_ops.cpp`): a `Linear4bit` allowed to
(`support_avx512bf16_for_cpu`) is repacked at its first forward without gradients
(`functional._convert_weight_packed_for_cpu`: 4-bit codes in 32-row tiles, block scales as
bf16 [K/blocksize, N], `quant_state.dtype` bf16, `packing_format_for_cpu`), then every forward
goes to `gemv_4bit`, whose kernel (`tinygemm_kernel_nn<bf16_t>`) rounds the input to bf16,
looks each code up in the NF4/FP4 table rounded to bf16, sums `x * code` over one quantization
block with `vdpbf16ps` (fp32 accumulation), multiplies that block sum by the block's bf16 scale
and adds it to an fp32 total (`fmadd`), and rounds the total to bf16.

`emulated_gemv_4bit` computes exactly that in torch. Where it differs: the order of the fp32
additions inside a block (the kernel pairs neighbours, torch's matmul its own order), and
`vdpbf16ps` flushing denormals; both change a result only when its fp32 total sits within an
fp32 rounding of a bf16 rounding boundary, and then by one bf16 step. Measured against the
native kernel on an AVX512-BF16 CPU (`test_the_emulation_is_the_native_kernel`, SmolLM2's
shapes): 0.005-0.01% of the outputs differ, each by one bf16 step; the rest are bit-identical.
The repacking itself is bitsandbytes' own torch code and runs unchanged under the emulation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import bitsandbytes.functional as F
import bitsandbytes.nn.modules as bnb_modules
import torch

# LORADOCK_EMULATE_BF16_KERNEL=1 takes the emulation on a CPU that has the kernel too (to run the
# suite there as it runs on CPUs without it).
NATIVE = bool(F.has_avx512bf16()) and not os.environ.get("LORADOCK_EMULATE_BF16_KERNEL")
TILE = 32  # rows per packed tile (`block_n` of the repacking)


def unpack_codes(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The [n, k] 4-bit code indices of a weight repacked by `_convert_weight_packed_for_cpu`."""
    pairs = packed.reshape(-1, TILE)
    codes = torch.cat([pairs & 0xF, pairs >> 4], dim=-1)  # low nibbles: first half of 64
    return codes.reshape(n // TILE, k // 2, TILE, 2).transpose(1, 2).reshape(n, k).long()


def emulated_gemv_4bit(x: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """What the kernel returns for `x` [..., K] and a repacked weight: bf16 [..., N]."""
    n, k = state.shape
    blocks, size = k // state.blocksize, state.blocksize
    weights = getattr(state, "emulated_codes", None)  # the codes as bf16 values, looked up once per layer
    if weights is None:
        weights = state.emulated_codes = state.code.to(torch.bfloat16).float()[
            unpack_codes(packed.view(torch.uint8), n, k)]
    rows = x.reshape(-1, k).to(torch.bfloat16).float()
    block_sums = torch.einsum("mbk,nbk->mnb", rows.view(-1, blocks, size), weights.view(n, blocks, size))
    scales = state.absmax.float().T  # [N, K/blocksize], bf16 values
    return (block_sums * scales).sum(-1).to(torch.bfloat16).reshape(*x.shape[:-1], n)


@contextlib.contextmanager
def bf16_cpu_kernel(emulate: bool = not NATIVE) -> Iterator[str]:
    """Within: bitsandbytes behaves as on an AVX512-BF16 CPU (native there, emulated elsewhere
    or when `emulate`). Yields "native" or "emulated". Only layers built inside take the kernel
    (the flag is read when a Linear4bit is made), and only when their recipe allows it
    (loradock's pin)."""
    if not emulate:
        yield "native"
        return
    native_gemv, native_has = F.gemv_4bit, bnb_modules.has_avx512bf16

    def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
        if getattr(state, "packing_format_for_cpu", False) and A.device.type == "cpu":
            result = emulated_gemv_4bit(A, B, state).to(A.dtype)
            return result if out is None else out.copy_(result)
        return native_gemv(A, B, out=out, transposed_A=transposed_A, transposed_B=transposed_B, state=state)

    F.gemv_4bit, bnb_modules.has_avx512bf16 = gemv_4bit, lambda: True
    try:
        yield "emulated"
    finally:
        F.gemv_4bit, bnb_modules.has_avx512bf16 = native_gemv, native_has
