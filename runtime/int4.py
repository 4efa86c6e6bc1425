"""int4 weight-only serving (`quantize="int4"`): each linear layer's weight in 4 bits, asymmetric
per group of input features, the activations as they are; the matmul is tinygemm's int4 kernel,
the one torchao's int4 weight-only runs: `torch._weight_int4pack_mm` on CUDA,
`torch._weight_int4pack_mm_for_cpu` on CPU. Both take bfloat16 activations.

A decode step reads half a byte per weight and a bf16 scale and zero per group of 128: 0.53
bytes per weight, 27% of bf16's, so the step's memory-bandwidth floor falls with it.
The LoRA deltas stay in the activations' dtype: the adapters see the activations unquantized,
as PEFT does.

The quantization, which is also the executable spec (`quantize_groups`, `dequantize_groups`):
for each group of a row, lo and hi its smallest and largest weight, scale = (hi - lo) / 15 and
zero = lo + 8 * scale, both rounded to the compute dtype as the kernel holds them;
q = round((w - (zero - 8 * scale)) / scale) clamped to 0..15, and the layer computes with
(q - 8) * scale + zero (tinygemm's convention; torchao's `Int4WeightOnlyConfig` quantizes so):
the activations rounded to the compute dtype, times that weight in float32, summed in float32,
the result rounded to the compute dtype, as the CPU kernel does (CUDA's rounds the weight to
bfloat16 for its tensor cores as well).

Where the kernel cannot serve (the compute dtype is not bfloat16, or the kernel fails its
check on this device) the layer keeps its 4-bit weight and dequantizes it for each call
(`emulated`): the same numbers, at the cost of a dequantize per call. `check_int4_matmul` decides
at start, and the engine reports it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .quantized_linear import QuantizedLinear, replace_linears

log = logging.getLogger(__name__)

GROUP_SIZES = (128, 64, 32)  # the largest that divides a layer's input features; the kernel takes these
LEVELS = 15  # 4 bits: q in 0..15
MID = 8  # q - 8: the 4-bit value centred on zero, as tinygemm reads it
MIN_RANGE = 1e-6  # a constant group keeps a finite scale (torchao's clamp)
KERNEL_DTYPE = torch.bfloat16
DEQUANTIZE_ROWS = 256  # identity rows per kernel call when reading a packed weight back


def group_size(in_features: int) -> int | None:
    """The group size for a layer with `in_features` inputs; None when the kernel takes none.

    >>> group_size(4096), group_size(576), group_size(32), group_size(100)
    (128, 64, 32, None)
    """
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def fits(linear: nn.Linear) -> bool:
    """Whether the kernel takes the layer's shape: whole groups, and CUDA's tiles of 8 output rows."""
    return group_size(linear.in_features) is not None and linear.out_features % 8 == 0


def inner_k_tiles(in_features: int) -> int:
    """How many 16-wide tiles of K the CUDA packing interleaves: 8, 4 or 2, dividing K."""
    return next(t for t in (8, 4, 2) if in_features % (t * 16) == 0)


def quantize_groups(weight: torch.Tensor, group: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q uint8 [out, in] in 0..15, scales and zeros float32 [out, in / group]),
    the scales and zeros rounded through `dtype`.

    >>> q, s, z = quantize_groups(torch.tensor([[0.0, 1.5, 3.0, 0.75]]), 4, torch.float32)
    >>> q.tolist(), s.tolist(), z.tolist()
    ([[0, 8, 15, 4]], [[0.20000000298023224]], [[1.600000023841858]])
    """
    rows, k = weight.shape
    w = weight.detach().float().view(rows, k // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo).clamp(min=MIN_RANGE) / LEVELS).to(dtype).float()
    zeros = (lo + MID * scales).to(dtype).float()
    low = (zeros - MID * scales)[..., None]
    q = ((w - low) / scales[..., None]).round().clamp(0, LEVELS).to(torch.uint8)
    return q.view(rows, k), scales, zeros


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] that (q, scales, zeros) stand for, in float32: (q - 8) * scale + zero."""
    rows, k = q.shape
    groups = scales.shape[1]
    w = (q.float().view(rows, groups, k // groups) - MID) * scales[..., None] + zeros[..., None]
    return w.view(rows, k)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [out, in] in 0..15 -> uint8 [out, in / 2], each even column in the high nibble (the
    order tinygemm's CUDA packing reads)."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).view(packed.shape[0], -1)


def pack_for_kernel(q: torch.Tensor) -> torch.Tensor:
    """q [out, in] (on the serving device) in the kernel's tiled layout for that device."""
    if q.device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), inner_k_tiles(q.shape[1]))
    return torch._convert_weight_to_int4pack(pack_nibbles(q).contiguous(), inner_k_tiles(q.shape[1]))


def kernel_linear(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] (bfloat16) times the packed weight: [tokens, out] in bfloat16."""
    if x.device.type == "cpu":
        return torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)
    return torch._weight_int4pack_mm(x, packed, group, scales_and_zeros)


class Int4Linear(QuantizedLinear):
    """A linear layer served in int4: with the kernel, `packed` (its device's tiled layout) and
    `scales_and_zeros` [in / group, out, 2] in bfloat16; emulated, `qweight` (two 4-bit values a
    byte, `pack_nibbles`) and float32 `scales` and `zeros` [out, in / group]. It multiplies in
    `compute_dtype` and returns the activations' dtype."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, emulated: str | None = None) -> None:
        super().__init__(linear, emulated)
        if not fits(linear):
            raise ValueError(f"int4 takes linear layers with input features divisible by 32 and output "
                             f"features by 8, not {linear.in_features} -> {linear.out_features}")
        self.group = group_size(linear.in_features)
        self.compute_dtype = compute_dtype
        q, scales, zeros = quantize_groups(linear.weight, self.group, compute_dtype)
        if emulated is None:
            self.register_buffer("packed", pack_for_kernel(q))
            self.register_buffer("scales_and_zeros",
                                 torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(compute_dtype))
        else:
            self.register_buffer("qweight", pack_nibbles(q))
            self.register_buffer("scales", scales)
            self.register_buffer("zeros", zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.compute_dtype)
        if self.emulated is None:
            y = kernel_linear(flat, self.packed, self.group, self.scales_and_zeros)
        else:
            y = F.linear(flat.float(), self.dequantized_weight()).to(self.compute_dtype)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        if self.emulated is not None:
            return dequantize_groups(unpack_nibbles(self.qweight), self.scales, self.zeros)
        # The packed layout is the kernel's own: read it back through the kernel (identity rows
        # in, the weight's columns out, rounded to bfloat16), then take each weight's level from
        # its group's scale and zero, so the weight comes back exact in float32.
        eye = torch.eye(self.in_features, dtype=self.compute_dtype, device=self.packed.device)
        columns = [kernel_linear(eye[i:i + DEQUANTIZE_ROWS], self.packed, self.group, self.scales_and_zeros)
                   for i in range(0, self.in_features, DEQUANTIZE_ROWS)]
        read = torch.cat(columns).T.float()
        scales, zeros = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # [out, groups] each
        rows, groups = scales.shape
        levels = (read.view(rows, groups, self.group) - zeros[..., None]) / scales[..., None] + MID
        return dequantize_groups(levels.round().clamp(0, LEVELS).view(rows, -1), scales, zeros)

    def extra_repr(self) -> str:
        how = "tinygemm" if self.emulated is None else "emulated"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group} "
                f"({how}, compute {str(self.compute_dtype).removeprefix('torch.')})")


def check_int4_matmul(device: torch.device, compute_dtype: torch.dtype) -> str | None:
    """Why the int4 kernel cannot serve on `device` computing in `compute_dtype` (None: it can):
    it takes bfloat16, and must run and agree with the spec."""
    if compute_dtype != KERNEL_DTYPE:
        return (f"the int4 kernels compute in bfloat16, this engine in {str(compute_dtype).removeprefix('torch.')} "
                f"(set compute_dtype to bfloat16)")
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(128, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 128, generator=g))
    x = torch.randn(5, 128, generator=g).to(device, compute_dtype)
    want = Int4Linear(linear.to(device), compute_dtype, emulated="spec")(x).float()
    try:
        got = Int4Linear(linear, compute_dtype)(x).float()
    except Exception as e:  # no kernel for this device, or not for this build
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
        return f"the int4 kernel differs from the spec by {(got - want).abs().max().item():.3g}"
    return None


def quantize_linears(model: nn.Module, targets: list[tuple[str, nn.Module]], device: torch.device,
                     compute_dtype: torch.dtype) -> str | None:
    """Replace each (name, nn.Linear) of `targets` in `model` (on `device`) whose shape the kernel
    takes by an Int4Linear computing in `compute_dtype`, on the kernel or where it cannot serve
    emulated: returns why it is emulated, or None. Layers of other shapes stay as they are (logged)."""
    emulated = check_int4_matmul(device, compute_dtype)
    kept = [name for name, linear in targets if not fits(linear)]
    if kept:
        log.warning("int4: %d linear layers keep their weights unquantized (input features not divisible by 32 "
                    "or output features by 8): %s", len(kept), ", ".join(kept[:4]) + (", ..." if len(kept) > 4 else ""))
    replace_linears(model, targets, lambda linear: Int4Linear(linear, compute_dtype, emulated) if fits(linear) else None)
    return emulated
