"""Load the served base model: transformers, quantized by the engine's one recipe, plus its tokenizer.

Never `trust_remote_code`: only architectures transformers ships are served.
"""

from __future__ import annotations

import logging

import torch
from loradock.registry import Registry
from loradock.registry.bases import ResolvedBase
from loradock.registry.devices import device_name
from loradock.registry.quantization import QuantizationRecipe

from .attention import ATTENTION_NAME, register_attention
from .config import EngineConfig

log = logging.getLogger(__name__)


def resolve_base(spec: str, registry: Registry | None) -> ResolvedBase:
    """A model directory path, or a registry base name (the registry's one rule for both)."""
    return (registry or Registry()).resolve_base(spec)


def pick_device(device: str) -> torch.device:
    return torch.device(device_name(device, torch.cuda.is_available()))


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def serving_recipe(config: EngineConfig, dtype: torch.dtype) -> QuantizationRecipe:
    """The one recipe this engine serves its base with."""
    return QuantizationRecipe.named(config.quantize, dtype_name(dtype), config.double_quant)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_base_model(source: ResolvedBase, recipe: QuantizationRecipe, device: torch.device,
                    dtype: torch.dtype, *, attn_implementation: str = ATTENTION_NAME):
    """The causal LM at `source.path`, quantized by `recipe`, in eval mode, using loradock's
    packed-batch attention."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    register_attention()
    kwargs: dict = {"dtype": dtype, "attn_implementation": attn_implementation}
    bnb = recipe.bnb_kwargs()
    if bnb is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(**bnb)
        kwargs["device_map"] = {"": (device.index or 0) if device.type == "cuda" else "cpu"}
    log.info("loading base %s from %s (%s, %s)", source.name, source.path, recipe.describe(), device)
    model = AutoModelForCausalLM.from_pretrained(source.path, trust_remote_code=False, **kwargs)
    if bnb is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(source: ResolvedBase):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
