"""`LoadedAdapter`: one adapter version's LoRA weights as plain host tensors.

Read from the version directory with `safetensors` (never pickle) and validated
against the served model before a single tensor is copied into a slot: all
problems are collected into one AdapterUnavailableError.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from .errors import AdapterUnavailableError
from .types import ResolvedAdapter

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclass(frozen=True)
class ModuleLoRA:
    """One layer's LoRA in the engine's slot layout, prepared off the engine loop so that
    writing a slot is two plain copies: delta = x @ shrink.T @ expand."""

    shrink: torch.Tensor  # [r, in] = scaling * lora_A
    expand: torch.Tensor  # [r, out] = lora_B^T
    scaling: float  # alpha / r, or alpha / sqrt(r) with rsLoRA (already in `shrink`)

    @property
    def rank(self) -> int:
        return self.shrink.shape[0]


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter version's weights, keyed by the served model's module names."""

    adapter: ResolvedAdapter
    modules: dict[str, ModuleLoRA]

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(m.shrink.numel() * m.shrink.element_size() + m.expand.numel() * m.expand.element_size()
                   for m in self.modules.values())


@dataclass(frozen=True)
class ServedModel:
    """What an adapter must fit: the served base's fingerprint and its targetable linears."""

    fingerprint: str
    linear_shapes: dict[str, tuple[int, int]]  # module name -> (in, out)
    max_rank: int


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's `get_pattern_key`: a pattern key matches a module name suffix at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _config_problems(config: object) -> list[str]:
    if not isinstance(config, dict):
        return [f"{CONFIG_FILE} is not a JSON object"]
    problems = []
    if not _is_number(config.get("lora_alpha", 8)):
        problems.append(f"lora_alpha must be a number, got {config['lora_alpha']!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            problems.append(f"{key} must be an object, got {patterns!r}")
            continue
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")  # as _pattern_value uses it
            except re.error as e:
                problems.append(f"{key} key {pattern!r} is not a valid regular expression ({e})")
            if key == "alpha_pattern" and not _is_number(value):
                problems.append(f"alpha_pattern value for {pattern!r} must be a number, got {value!r}")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} is not served (only LORA)")
    if config.get("use_dora"):
        problems.append("DoRA adapters (use_dora=true) are not served")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("adapters with trained biases are not served (bias must be 'none')")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} is not served (LoRA weights only)")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=true is not served (Linear layers only)")
    return problems


def read_adapter(adapter: ResolvedAdapter, version_dir: Path, manifest: dict, served: ServedModel,
                 dtype: torch.dtype = torch.float32) -> LoadedAdapter:
    """Read and validate an adapter version; raise AdapterUnavailableError listing every problem."""
    version_dir = Path(version_dir)
    where = f"adapter {adapter.ref}"
    base_fp = (manifest.get("base") or {}).get("fingerprint")
    if base_fp and base_fp != served.fingerprint:
        base_name = (manifest.get("base") or {}).get("name", "?")
        raise AdapterUnavailableError(
            f"{where} was trained for base {base_name!r} (fingerprint {str(base_fp)[:12]}), "
            f"but this engine serves fingerprint {served.fingerprint[:12]}"
        )
    try:
        config = json.loads((version_dir / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterUnavailableError(f"{where}: cannot read {CONFIG_FILE}: {e}") from e
    problems = _config_problems(config)
    if problems:
        raise AdapterUnavailableError(f"{where}: " + "; ".join(problems))

    weights = version_dir / WEIGHTS_FILE
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        # One read into private memory: faster than safe_open's per-tensor reads, and unlike
        # load_file's copy-on-write mmap, writing the tensors below costs no page faults.
        tensors = load_safetensors(weights.read_bytes())
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise AdapterUnavailableError(f"{where}: cannot read {WEIGHTS_FILE}: {e}") from e
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            problems.append(f"unexpected tensor {key!r}")
            continue
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor

    modules: dict[str, ModuleLoRA] = {}
    default_r, default_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            problems.append(f"{name}: lora_A and lora_B must both be present")
            continue
        if name not in served.linear_shapes:
            problems.append(f"{name}: no such targetable linear layer in the served base")
            continue
        A, B = ab["A"], ab["B"]
        in_f, out_f = served.linear_shapes[name]
        r = A.shape[0]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_f or B.shape != (out_f, r):
            problems.append(f"{name}: A{tuple(A.shape)} B{tuple(B.shape)} do not fit {in_f}->{out_f} with rank {r}")
            continue
        expected_r = _pattern_value(rank_pattern, name, default_r)
        if r != expected_r:
            problems.append(f"{name}: rank {r} in the weights but {expected_r} in {CONFIG_FILE}")
            continue
        if r > served.max_rank:
            problems.append(f"{name}: rank {r} exceeds the engine's max_rank {served.max_rank}")
            continue
        alpha = _pattern_value(alpha_pattern, name, default_alpha)
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        # The scaling goes in place into the freshly read A, in float32 whatever the serving dtype.
        shrink = A.to(torch.float32).mul_(scaling).to(dtype).contiguous()
        modules[name] = ModuleLoRA(shrink=shrink, expand=B.T.to(dtype).contiguous(), scaling=scaling)
    if not modules and not problems:
        problems.append("no LoRA weights found")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise AdapterUnavailableError(f"{where} cannot be served: " + "; ".join(shown))
    return LoadedAdapter(adapter=adapter, modules=modules)
