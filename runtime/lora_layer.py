"""`MultiLoRALinear`: a base linear layer (plain, 4-bit or 8-bit) plus stacked LoRA slots.

The layer owns preallocated buffers shrink [slots, r_max, in] (PEFT's lora_A, scaling
folded in) and expand [slots, r_max, out] (lora_B transposed); slot 0 means
"no adapter" and stays zero. Writing an adapter into a slot zero-pads its rank to
r_max, so every op is a plain x @ shrink.T @ expand. Which token uses which slot
comes from the step's batch context.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .batch_context import current_context
from .lora_ops import LoRAOp, pick_op

# Projections an adapter may target (Llama-family names).
TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear, bnb Linear4bit or Linear8bitLt."""
    return int(layer.in_features), int(layer.out_features)


class MultiLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, op: LoRAOp) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        self.op = op
        self.register_buffer("lora_shrink", torch.zeros(num_slots, max_rank, self.in_features, dtype=dtype,
                                                        device=device), persistent=False)
        self.register_buffer("lora_expand", torch.zeros(num_slots, max_rank, self.out_features, dtype=dtype,
                                                        device=device), persistent=False)
        self.ranks = [0] * num_slots  # rank of the adapter in each slot here (0: none)

    def set_slot(self, slot: int, shrink: torch.Tensor | None, expand: torch.Tensor | None) -> None:
        """Write an adapter's shrink [r, in] (scaling * lora_A) and expand [r, out] (lora_B^T)
        into `slot`; None clears the slot."""
        if slot == 0:
            raise ValueError("slot 0 is reserved for requests without an adapter")
        r = 0 if shrink is None or expand is None else shrink.shape[0]
        if r and (shrink.shape != (r, self.in_features) or expand.shape != (r, self.out_features)):
            raise ValueError(  # before any write: a refused adapter leaves the slot as it was
                f"LoRA shapes shrink{tuple(shrink.shape)} expand{tuple(expand.shape)} do not fit a "
                f"{self.in_features}->{self.out_features} layer"
            )
        self.ranks[slot] = 0
        if r:
            self.lora_shrink[slot, :r] = shrink
            self.lora_expand[slot, :r] = expand
        if r < self.lora_shrink.shape[1]:  # the rank padding (or the whole slot when clearing)
            self.lora_shrink[slot, r:] = 0
            self.lora_expand[slot, r:] = 0
        self.ranks[slot] = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        ctx = current_context()
        if ctx is None:
            return result
        slots = [s for s in ctx.lora.slots_present if self.ranks[s]]
        if not slots:
            return result
        # Ranks beyond the largest one present are zero padding: leave them out of the maths.
        r = max(self.ranks[s] for s in slots)
        flat = x.reshape(-1, self.in_features).to(self.lora_shrink.dtype)  # [T, in]
        delta = self.op(flat, self.lora_shrink[:, :r], self.lora_expand[:, :r], ctx.lora, slots)  # [T, out]
        return result + delta.reshape(result.shape).to(result.dtype)


def wrap_linears(model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, ops: str) -> dict[str, MultiLoRALinear]:
    """Replace every targetable linear of `model` by a MultiLoRALinear; {module name: wrapper}."""
    op = pick_op(ops, device)
    targets = [(name, module) for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in TARGETABLE and hasattr(module, "in_features")]
    wrapped: dict[str, MultiLoRALinear] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoRALinear(module, num_slots, max_rank, dtype, device, op)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


def iter_wrapped(model: nn.Module) -> Iterator[tuple[str, MultiLoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, MultiLoRALinear):
            yield name, module
