"""What loradock's own weight formats share (`fp8.FP8Linear`, `int4.Int4Linear`): a linear layer
whose weight lives in buffers nn.Linear cannot hold, and the swap of a model's linear layers for
them. The LoRA layers wrap them as they wrap nn.Linear, and take DoRA's norms of
`dequantized_weight()`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class QuantizedLinear(nn.Module):
    """A linear layer served from quantized buffers: `in_features`, `out_features`, `bias` as the
    layer had it, and `emulated`, why its matmul runs the format's arithmetic in torch ops instead
    of the device's kernel (None: the kernel serves it). Not an nn.Linear: nothing that casts a
    model's floating point parameters (`.to(dtype)`) may touch its quantized weight."""

    def __init__(self, linear: nn.Linear, emulated: str | None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.emulated = emulated

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with, float32 [out, in] (for DoRA's norms)."""
        raise NotImplementedError


def replace_linears(model: nn.Module, targets: list[tuple[str, nn.Module]],
                    make: Callable[[nn.Linear], nn.Module | None]) -> None:
    """Replace each (name, nn.Linear) of `targets` in `model` by `make(linear)`, where it returns
    a layer (None keeps the linear as it is)."""
    for name, linear in targets:
        layer = make(linear)
        if layer is not None:
            model.set_submodule(name, layer)
