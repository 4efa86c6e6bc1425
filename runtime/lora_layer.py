"""`MultiLoRALinear`: a base linear layer (plain, 4-bit or 8-bit) plus stacked LoRA slots.

The layer owns preallocated buffers A [slots, r_max, in] and B [slots, out, r_max];
slot 0 means "no adapter" and stays zero. Writing an adapter into a slot zero-pads
its rank to r_max and folds its scaling into B, so every op is a plain
B @ (A @ x). Which token uses which slot comes from the step's batch context.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .batch_context import current_context
from .lora_ops import LORA_OPS, LoRAOp

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
        self.register_buffer("lora_A", torch.zeros(num_slots, max_rank, self.in_features, dtype=dtype,
                                                   device=device), persistent=False)
        self.register_buffer("lora_B", torch.zeros(num_slots, self.out_features, max_rank, dtype=dtype,
                                                   device=device), persistent=False)
        self.ranks = [0] * num_slots  # rank of the adapter in each slot here (0: none)

    def set_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float) -> None:
        """Write an adapter's A [r, in] and B [out, r] into `slot`; None clears the slot."""
        if slot == 0:
            raise ValueError("slot 0 is reserved for requests without an adapter")
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.ranks[slot] = 0
        if A is None or B is None:
            return
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ValueError(
                f"LoRA shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit a "
                f"{self.in_features}->{self.out_features} layer"
            )
        self.lora_A[slot, :r] = A.to(self.lora_A.dtype)
        self.lora_B[slot, :, :r] = (B.float() * scaling).to(self.lora_B.dtype)
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
        flat = x.reshape(-1, self.in_features).to(self.lora_A.dtype)  # [T, in]
        delta = self.op(flat, self.lora_A[:, :r], self.lora_B[:, :, :r], ctx.lora, slots)  # [T, out]
        return result + delta.reshape(result.shape).to(result.dtype)


def wrap_linears(model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, ops: str) -> dict[str, MultiLoRALinear]:
    """Replace every targetable linear of `model` by a MultiLoRALinear; {module name: wrapper}."""
    op = LORA_OPS[ops]
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
