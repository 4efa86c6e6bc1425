"""Make real PEFT LoRA adapters for tests (shared by every test area).

`make_lora_adapter` wraps a stored base with `get_peft_model`, gives lora_B random
non-zero values (PEFT initialises it to zero, which would make the adapter a no-op),
and saves a standard PEFT directory: `adapter_config.json` + `adapter_model.safetensors`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def make_lora_adapter(
    base_path: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    targets: Sequence[str] | str = ("q_proj", "v_proj"),
    seed: int = 0,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
    scale: float = 0.5,
    use_dora: bool = False,
    lora_bias: bool = False,
) -> Path:
    """Save a LoRA adapter for the model at `base_path` into `out_dir` and return `out_dir`.

    Every lora_A / lora_B weight is drawn from N(0, scale^2) with `seed`, so two seeds
    give different adapters and each visibly changes the base model's outputs.
    `base_model_name_or_path` is written into adapter_config.json (default: `base_path`).
    `use_dora` / `lora_bias` make a DoRA adapter (its magnitudes scaled by 1 + N(0, scale^2), so
    they differ from the weight norms) or one with lora_B biases (drawn like lora_B).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_path = Path(base_path)
    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets if isinstance(targets, str) else list(targets),  # or "all-linear"
        use_rslora=use_rslora,
        use_dora=use_dora,
        lora_bias=lora_bias,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    if base_model_name_or_path is not None:
        # patched after saving: PEFT would otherwise try to fetch that name's config from the Hub
        config_path = out_dir / "adapter_config.json"
        config_json = json.loads(config_path.read_text())
        config_json["base_model_name_or_path"] = base_model_name_or_path
        config_path.write_text(json.dumps(config_json, indent=2))
    return out_dir
