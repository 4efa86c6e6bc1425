"""Random PEFT LoRA adapters for benchmarks, published into a registry.

PEFT itself lays out each (rank, targets) combination once, on a meta-device copy of
the base (no weights read), which gives the exact tensor names and shapes PEFT saves.
Each adapter then only draws its tensors and writes them: fast enough for 1,000
adapters. lora_B is non-zero (PEFT starts it at zero, a no-op adapter).
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from loradock.registry import AdapterVersion, BaseInfo, NotFoundError, Registry
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from .workload import AdapterSpec

B_STD = 0.05  # lora_B ~ N(0, B_STD^2): outputs change visibly without going off the rails
WEIGHTS_FILE = "adapter_model.safetensors"


def lora_config(spec: AdapterSpec, base_name: str) -> LoraConfig:
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )


def lora_layout(base_path: Path, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """{saved tensor name: shape} PEFT writes for `config` on this base, built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path))
        # get_peft_model rewrites base_model_name_or_path (and warns): give it a copy.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*renamed")
            peft_model = get_peft_model(model, copy.deepcopy(config))
        state = get_peft_model_state_dict(peft_model)
    return {name: tuple(t.shape) for name, t in state.items()}


def random_lora_tensors(layout: dict[str, tuple[int, ...]], seed: int,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """lora_A like PEFT's kaiming-uniform init, lora_B ~ N(0, B_STD^2); drawn in float32, seeded,
    stored in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(layout.items()):
        if ".lora_A." in name:
            bound = 1 / math.sqrt(shape[1])
            tensors[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        else:
            tensors[name] = torch.randn(shape, generator=gen) * B_STD
    return {name: t.to(dtype) for name, t in tensors.items()}


def write_adapter(out_dir: Path, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """A standard PEFT adapter directory: adapter_config.json + adapter_model.safetensors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    return out_dir


def publish_random_adapters(
    registry: Registry,
    base: BaseInfo,
    specs: Sequence[AdapterSpec],
    seed: int = 0,
    versions: int = 1,
    dtype: torch.dtype = torch.float32,
) -> list[AdapterVersion]:
    """Make sure every spec is published (`versions` versions each, distinct weights); reuse existing ones.

    Returns the latest version of each spec, in order. Adapters already in the registry
    from an earlier run with the same name are kept, so a rerun does not republish.
    """
    layouts: dict[tuple[int, tuple[str, ...]], dict[str, tuple[int, ...]]] = {}
    out = []
    with tempfile.TemporaryDirectory(dir=registry.root, prefix=".bench-adapters-") as tmp:
        for i, spec in enumerate(tqdm(specs, desc="adapters", unit="adapter", leave=False)):
            have = _existing_versions(registry, spec.name)
            config = lora_config(spec, base.name)
            key = (spec.rank, spec.targets)
            for v in range(len(have) + 1, versions + 1):
                if key not in layouts:
                    layouts[key] = lora_layout(base.path, config)
                tensors = random_lora_tensors(layouts[key], seed=seed * 1_000_003 + i * 101 + v, dtype=dtype)
                src = write_adapter(Path(tmp) / f"{i}-{v}", config, tensors)
                registry.publish(src, spec.name, base=base.name,
                                 metadata={"source": {"kind": "import", "path": f"random (loradock.benchmarks, seed {seed})"}})
            # Verified here, once: the systems never run on damaged files, and the digests of
            # adapters published by an older loradock get recorded (a publish records its own).
            out.append(registry.resolve(spec.name))
    return out


def _existing_versions(registry: Registry, name: str) -> list[AdapterVersion]:
    try:
        return registry.versions(name)
    except NotFoundError:
        return []
