"""Load the served base model: transformers, optionally bitsandbytes-quantized, plus its tokenizer.

Never `trust_remote_code`: only architectures transformers ships are served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from loradock.registry import Registry
from loradock.registry.bases import check_model_dir, fingerprint

from .attention import ATTENTION_NAME, register_attention
from .config import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseModelSource:
    """Which base is served: its name, HF directory and fingerprint."""

    name: str
    path: Path
    fingerprint: str


def resolve_base(spec: str, registry: Registry | None) -> BaseModelSource:
    """A registry base name, or a model directory path, -> BaseModelSource."""
    path = Path(spec).expanduser()
    if path.is_dir():
        check_model_dir(path)
        return BaseModelSource(name=path.name, path=path, fingerprint=fingerprint(path))
    if registry is None:
        registry = Registry()
    info = registry.bases.get(spec)  # NotFoundError lists the known bases
    return BaseModelSource(name=info.name, path=Path(info.path), fingerprint=info.fingerprint)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch sees no CUDA device")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def quantization_config(quantize: str, dtype: torch.dtype):
    """The BitsAndBytesConfig for `quantize`, or None for full precision."""
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False,
        )
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantize!r}")


def load_base_model(source: BaseModelSource, config: EngineConfig, device: torch.device,
                    dtype: torch.dtype, *, attn_implementation: str = ATTENTION_NAME):
    """The causal LM at `source.path`, in eval mode, using loradock's packed-batch attention."""
    from transformers import AutoModelForCausalLM

    register_attention()
    kwargs: dict = {"dtype": dtype, "attn_implementation": attn_implementation}
    qconfig = quantization_config(config.quantize, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": (device.index or 0) if device.type == "cuda" else "cpu"}
    log.info("loading base %s from %s (%s, %s, %s)", source.name, source.path, config.quantize, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(source.path, trust_remote_code=False, **kwargs)
    if qconfig is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(source: BaseModelSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
