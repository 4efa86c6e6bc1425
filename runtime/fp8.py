"""FP8 serving (`quantize="fp8"`): each linear layer's weight in float8 (e4m3) with one scale per
output row, each token's activations quantized to float8 as they come (one scale per token), the
matmul `torch._scaled_mm` (FP8 tensor cores on Hopper and Ada; a CPU kernel elsewhere): W8A8
with dynamic per-token scales, as vLLM's and llm-compressor's "FP8 dynamic".

A decode step reads its weights once, so one byte per weight is half of bf16's bytes (the
memory-bandwidth floor of the step halves with it). The LoRA deltas stay in the compute dtype:
the adapters see the activations unquantized, as PEFT does.

Where `_scaled_mm` cannot run with the engine's dtype (no FP8 tensor cores, or a float32 output
CUDA refuses for row-wise scales) the layers compute the same W8A8 arithmetic emulated in
float32 (`emulated_fp8_linear`, the executable spec): the same numbers, at the speed of a
dequantized matmul. `check_fp8_matmul` decides which at start, and the engine reports it.
"""

from __future__ import annotations

import torch
from torch import nn

from .quantized_linear import QuantizedLinear, replace_linears

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale


def row_scales(t: torch.Tensor) -> torch.Tensor:
    """One float32 scale per row of t [rows, k] that maps its largest |value| to FP8_MAX: [rows, 1].

    >>> row_scales(torch.tensor([[448.0, -2.0], [0.0, 0.0]])).flatten().tolist()
    [1.0, 1e-12]
    """
    return (t.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [rows, k] -> (float8 values [rows, k], float32 scales [rows, 1]) with t ~= values * scales."""
    scales = row_scales(t)
    return (t.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def emulated_fp8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """The W8A8 linear in float32: x [tokens, in] quantized per token, times the float8 weight
    [out, in] with its row scales [out, 1]; the result in x's dtype."""
    xq, x_scale = quantize_rows(x)
    y = (xq.float() * x_scale) @ (qweight.float() * weight_scale).T
    return (y if bias is None else y + bias.float()).to(x.dtype)


def scaled_mm_fp8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """The W8A8 linear on `torch._scaled_mm` (row-wise scales: per token, per output row)."""
    xq, x_scale = quantize_rows(x)
    y = torch._scaled_mm(xq, qweight.T, scale_a=x_scale, scale_b=weight_scale.T, out_dtype=x.dtype)
    return y if bias is None else y + bias


class FP8Linear(QuantizedLinear):
    """A linear layer served in FP8: `qweight` [out, in] float8 e4m3, `weight_scale` [out, 1]
    float32; `emulated` says why the matmul is `emulated_fp8_linear` (None: `torch._scaled_mm`)."""

    def __init__(self, linear: nn.Linear, matmul=scaled_mm_fp8_linear, emulated: str | None = None) -> None:
        super().__init__(linear, emulated)
        qweight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", scale)
        self.matmul = matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        return self.matmul(flat, self.qweight, self.weight_scale, self.bias).view(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.weight_scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 (row scales)"


def check_fp8_matmul(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `_scaled_mm` cannot serve FP8 layers on `device` with activations in `dtype` (None: it
    can): it must run, and agree with the emulated spec."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).to(device, dtype)
    linear = nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g))
    layer = FP8Linear(linear.to(device))
    try:
        got = scaled_mm_fp8_linear(x, layer.qweight, layer.weight_scale, None).float()
    except Exception as e:  # no FP8 matmul here, or not for this output dtype
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    want = emulated_fp8_linear(x, layer.qweight, layer.weight_scale, None).float()
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
        return f"torch._scaled_mm differs from the spec by {(got - want).abs().max().item():.3g}"
    return None


def quantize_linears(model: nn.Module, targets: list[tuple[str, nn.Module]], device: torch.device,
                     dtype: torch.dtype) -> str | None:
    """Replace each (name, nn.Linear) of `targets` in `model` (on `device`, activations in
    `dtype`) by an FP8Linear on `torch._scaled_mm`, or where that cannot run on the emulated
    spec: returns why it is emulated, or None."""
    emulated = check_fp8_matmul(device, dtype)
    matmul = scaled_mm_fp8_linear if emulated is None else emulated_fp8_linear
    replace_linears(model, targets, lambda linear: FP8Linear(linear, matmul, emulated))
    return emulated
