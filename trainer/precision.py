"""bf16 / fp16 mapped onto the training device, with a note when the device cannot honour them.

CUDA with bfloat16 (Ampere and newer): bf16 loads the base in bfloat16 and runs forward
passes under bfloat16 autocast. CUDA without it: bf16 falls back to float32, with a note.
fp16 on CUDA: the base in float16 and float16 autocast (as LLaMA-Factory's compute dtype;
no loss scaling). Neither: bfloat16 base where the GPU has it (half the memory), else
float32. CPU: float32 always (faster and exact on CPUs without bfloat16 units); bf16 or
fp16 get a note saying so. LoRA weights stay float32 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    base_dtype: torch.dtype  # the frozen base's weights (and the 4-bit compute dtype)
    autocast_dtype: torch.dtype | None  # forward passes under autocast, or None
    note: str | None = None  # why a requested precision was not used


def pick_precision(bf16: bool, fp16: bool, device: torch.device) -> Precision:
    """The precision a run with these flags uses on `device` (see module docstring)."""
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if bf16 and bf16_ok:
            return Precision(torch.bfloat16, torch.bfloat16)
        if bf16:
            return Precision(torch.float32, None, "bf16: this GPU has no bfloat16 support; training "
                             "in float32 (set fp16: true for float16 autocast)")
        if fp16:
            return Precision(torch.float16, torch.float16)
        return Precision(torch.bfloat16 if bf16_ok else torch.float32, None)
    asked = "bf16" if bf16 else "fp16" if fp16 else None
    note = None if asked is None else (
        f"{asked}: true has no effect on {device.type}: loradock trains in float32 there "
        "(half-precision autocast on a CPU is slower without bfloat16 units and rounds the loss)"
    )
    return Precision(torch.float32, None, note)
