"""Load the served base model: transformers, quantized by the engine's one recipe, plus its
tokenizer and end-of-sequence ids, and size the paged KV pool for its layers.

Never `trust_remote_code`: only architectures transformers ships are served.
"""

from __future__ import annotations

import logging

import torch
from loradock.registry import Registry
from loradock.registry.bases import ResolvedBase
from loradock.registry.devices import device_name
from loradock.registry.quantization import QuantizationRecipe, pin_bitsandbytes_cpu_kernel

from . import fp8, int4
from .attention import ATTENTION_NAME, register_attention
from .config import EngineConfig
from .kv_cache import KVPool
from .lora_layer import lora_targets

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
    """The one recipe this engine serves its base with: its matmuls in `compute_dtype`, or in
    the activations' dtype when that is "auto"."""
    compute = dtype_name(dtype) if config.compute_dtype == "auto" else config.compute_dtype
    return QuantizationRecipe.named(config.quantize, compute, config.double_quant)


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
    if recipe.method == "fp8-dynamic":
        emulated = fp8.quantize_linears(model, lora_targets(model), device, dtype)
        log.info("fp8: every linear layer's weights in float8, its activations per token" +
                 ("" if emulated is None else f"; emulated in float32 (torch._scaled_mm cannot: {emulated})"))
    elif recipe.method == "int4-weight-only":
        emulated = int4.quantize_linears(model, lora_targets(model), device, getattr(torch, recipe.compute_dtype))
        log.info(f"int4: linear layers' weights in 4-bit groups, computing in {recipe.compute_dtype}" +
                 ("" if emulated is None else f"; dequantized at each call (the kernel cannot: {emulated})"))
    elif device.type == "cpu" and bnb is not None and pin_bitsandbytes_cpu_kernel(model, recipe):
        log.info("4-bit matmuls in bfloat16: bitsandbytes' AVX512-BF16 kernel where this CPU has it")
    model.eval()
    model.requires_grad_(False)
    return model


def sliding_windows(config) -> tuple[int, ...]:
    """The sliding-window sizes the model's attention layers ask for (transformers passes each
    layer's as `sliding_window`; its config holds one size, used by every layer (Mistral) or by
    the layers `layer_types` marks "sliding_attention" (Qwen2, Gemma 2/3)); () when none."""
    window = getattr(config, "sliding_window", None)
    return (int(window),) if window else ()


def load_tokenizer(source: ResolvedBase):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)


def eos_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """Every token id the model's generation config, config or tokenizer names as end of sequence."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def kv_heads(config) -> int:
    """Key/value heads per layer: grouped-query families call them num_key_value_heads, Falcon
    num_kv_heads (one for its multi-query models), multi-head families (GPT-NeoX) have as many as
    query heads."""
    if config.model_type == "falcon":
        return config.num_kv_heads if config.new_decoder_architecture or not config.multi_query else 1
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def kv_pool_for(model: torch.nn.Module, config: EngineConfig, dtype: torch.dtype, device: torch.device) -> KVPool:
    """The paged KV pool for `model`'s layers, sized by the config: a fraction of the free device
    memory (CUDA, when set), else kv_cache_bytes when set, else kv_cache_tokens."""
    mc = model.config
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    kv_shape = (mc.num_hidden_layers, kv_heads(mc), head_dim)
    budget = config.kv_cache_bytes
    if config.kv_cache_memory_fraction and device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * config.kv_cache_memory_fraction)
    num_blocks = (KVPool.blocks_in_budget(budget, config.kv_block_size, *kv_shape, dtype)
                  if budget else config.kv_cache_tokens // config.kv_block_size)
    pool = KVPool(*kv_shape, num_blocks, config.kv_block_size, dtype, device)
    log.info("KV pool: %d blocks of %d tokens (%.1f MiB)", num_blocks, config.kv_block_size, pool.nbytes / 2**20)
    return pool
