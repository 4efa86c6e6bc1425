"""Which device a `device:` setting means: one rule for the trainer and the runtime.

Torch-free (the caller says whether CUDA is there), so both layers can share it:
`torch.device(device_name(spec, torch.cuda.is_available(), local_rank))`.
"""

from __future__ import annotations

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def device_name(spec: str, cuda_available: bool, local_rank: int = 0) -> str:
    """`auto` -> this process's CUDA device when there is one, else `cpu`; `cuda` -> this
    process's CUDA device (`local_rank` under torchrun); anything else as given.

    ValueError when CUDA is asked for and there is none.
    """
    if spec == "auto":
        return f"cuda:{local_rank}" if cuda_available else "cpu"
    if spec.startswith("cuda") and not cuda_available:
        raise ValueError(f"device {spec!r} asked for, but no CUDA device is available")
    if spec == "cuda":
        return f"cuda:{local_rank}"
    return spec
