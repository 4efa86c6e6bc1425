"""The base model (optionally quantized) with trainable LoRA layers attached.

The base is loaded frozen, in the precision `precision.py` picks for the device, quantized
as the run's `QuantizationRecipe` says (the registry's one recipe type: 4-bit NF4 = QLoRA,
or 8-bit; the trainer records it in the manifest so the runtime can tell when it serves
the adapter on a base quantized otherwise); LoRA weights are float32 whatever the base's dtype. The
adapter is never merged: only its weights are trained and saved.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from loradock.registry.devices import device_name
from loradock.registry.quantization import QuantizationRecipe, pin_bitsandbytes_cpu_kernel
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .config import TrainConfig
from .errors import ConfigError
from .precision import pick_precision

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> this process's CUDA device when there is one, else CPU (the registry's rule)."""
    try:
        return torch.device(device_name(name, torch.cuda.is_available(), local_rank))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def load_tokenizer(base_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_recipe(config: TrainConfig, device: torch.device) -> QuantizationRecipe:
    """The recipe this run quantizes its base with (and records in the manifest)."""
    compute = str(pick_precision(config.bf16, config.fp16, device).base_dtype).removeprefix("torch.")
    quantize = {4: "nf4", 8: "int8", None: "none"}[config.quantization_bit]
    return QuantizationRecipe.named(quantize, compute, config.double_quantization)


def load_base(base_dir: Path, recipe: QuantizationRecipe, device: torch.device) -> torch.nn.Module:
    """The frozen base model on `device`, quantized (or not) as `recipe` says."""
    bnb = recipe.bnb_kwargs()
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=recipe.compute_dtype,
        quantization_config=BitsAndBytesConfig(**bnb) if bnb is not None else None,
        device_map={"": str(device)},
    )
    model.config.use_cache = False  # no KV cache needed while training
    pin_bitsandbytes_cpu_kernel(model, recipe, training=True)  # evaluation must not cut the gradients
    return model


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of every linear projection (quantized ones too), excluding the output head."""
    head = model.get_output_embeddings()
    return sorted({
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    })


def lora_config(config: TrainConfig, model: torch.nn.Module) -> LoraConfig:
    available = linear_module_names(model)
    if config.lora_target == ["all"]:
        targets = available
    else:
        unknown = [t for t in config.lora_target if t not in available]
        if unknown:
            raise ConfigError(
                f"lora_target: {', '.join(unknown)} not found in the base model; "
                f"its linear layers are: {', '.join(available)} (or use 'all')"
            )
        targets = list(config.lora_target)
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_rank,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_model(
    config: TrainConfig, base_dir: Path, device: torch.device, parent_dir: Path | None = None
) -> PeftModel:
    """Base + fresh LoRA layers (seeded), or + the parent version's LoRA weights."""
    model = load_base(base_dir, quantization_recipe(config, device), device)
    if config.quantization_bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    torch.manual_seed(config.seed)  # LoRA A is initialised randomly
    peft_model = get_peft_model(model, lora_config(config, model))
    if parent_dir is not None:
        load_adapter_weights(peft_model, parent_dir / ADAPTER_WEIGHTS, "parent")
    return peft_model


def load_adapter_weights(model: PeftModel, path: Path, what: str) -> None:
    """Copy saved LoRA weights into `model`; names and shapes must match exactly."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    saved = load_file(str(path))
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    wrong = sorted(k for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape)
    if missing or extra or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("shape differs", wrong))
            if keys
        )
        raise ConfigError(
            f"{what} adapter {path.parent} does not fit this LoRA config ({detail}); "
            "use the same lora_rank and lora_target as the " + what
        )
    set_peft_model_state_dict(model, saved)
