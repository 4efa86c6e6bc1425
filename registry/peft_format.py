"""The PEFT LoRA adapter format, in one place: config keys, tensor names, rank and alpha patterns,
and what loradock's runtime can serve.

Torch-free: the registry checks a directory from `adapter_config.json` and the safetensors header
(names and shapes); the runtime runs the same rules on the tensors it reads and then checks only
the fit to its served base and its own limits; the trainer checks its config before training.

Two kinds of rules:
- `config_problems` / `read_modules`: is this a well-formed PEFT LoRA adapter at all (refused at
  publish when not);
- `serving_problems`: a well-formed adapter that loradock's runtime does not serve (a LoRA
  variant it does not implement, weights it does not apply). The manifest records the answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# PEFT saves `base_model.model.<module>.lora_A.weight`, `lora_B.weight`, with lora_bias also
# `lora_B.bias`, and with DoRA `lora_magnitude_vector` (one value per output feature).
_TENSOR = re.compile(
    r"base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)")
A, B, BIAS, MAGNITUDE = "lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector"

# The runtime wraps every linear layer of the base with LoRA slots (fused ones too: Phi-3's
# qkv_proj and gate_up_proj, GPT-NeoX's and Falcon's query_key_value), except the output head;
# the embeddings are no linear layers. These are their names in the families transformers ships.
HEAD_AND_EMBEDDINGS = ("lm_head", "embed_out", "embed_tokens", "embed_in", "wte", "wpe", "word_embeddings")

# Config keys that turn on something the runtime does not apply, with why (falsy/None = off).
_NOT_SERVED = {
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D weights) is not served: Linear layers only",
    "modules_to_save": "modules_to_save (whole trained modules) is not served: only LoRA weights are",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not served",
    "target_parameters": ("target_parameters: MoE expert LoRA (LoRA on bare parameters: experts' fused "
                          "weights, routers) is not served; LoRA on attention and dense layers is"),
    "layer_replication": "layer_replication (a deeper model built from repeated layers) is not served",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not served",
    "use_qalora": "QALoRA (use_qalora) is not served",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not served",
    "arrow_config": "Arrow routing (arrow_config) is not served",
    "kasa_config": "KaSA (kasa_config) is not served",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not served",
    "velora_config": "VeLoRA (velora_config) is not served",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: x[in] -> lora_A [r, in] -> lora_B [out, r] (+ options)."""

    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    rank: int
    alpha: float
    in_features: int
    out_features: int
    has_bias: bool = False  # lora_B.bias [out] (lora_bias=true)
    has_magnitude: bool = False  # DoRA's lora_magnitude_vector [out] (use_dora=true)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_tensor_name(name: str) -> tuple[str, str] | None:
    """`base_model.model.<module>.<part>` -> (module, part), part one of A, B, BIAS, MAGNITUDE."""
    m = _TENSOR.fullmatch(name)
    return None if m is None else (m["module"], m["part"])


def pattern_value(patterns: Mapping, module: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key matching the module name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """The factor PEFT multiplies lora_B @ lora_A (and lora_B's bias) by."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def is_target(targets: str | list[str], module: str) -> bool:
    if isinstance(targets, str):  # PEFT treats a string as a full-match regex
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets)


def config_problems(config: object) -> list[str]:
    """Why `config` (adapter_config.json) is not a well-formed PEFT LoRA config (empty: it is)."""
    if not isinstance(config, dict):
        return [f"{CONFIG_FILE} is not a JSON object"]
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only LoRA adapters ('LORA') are supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r (rank) must be a positive integer, got {r!r}")
    if not is_number(config.get("lora_alpha")):
        problems.append(f"lora_alpha must be a number, got {config.get('lora_alpha')!r}")
    targets = config.get("target_modules")
    if not targets or not isinstance(targets, str | list):
        problems.append(f"target_modules must be a non-empty list of module names, got {targets!r}")
    elif isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        problems.append(f"target_modules must hold module names (strings), got {targets!r}")
    if config.get("use_dora") and config.get("lora_bias"):
        problems.append("use_dora and lora_bias cannot both be true (PEFT refuses the pair too)")
    if config.get("modules_to_save"):  # their tensors are whole modules, not LoRA weights
        problems.append(f"modules_to_save ({config['modules_to_save']}) is not supported: "
                        "only LoRA A/B weights are stored")
    patterns = {targets: targets} if isinstance(targets, str) else {}  # shown -> as matched
    for key in ("rank_pattern", "alpha_pattern"):
        table = config.get(key) or {}
        if not isinstance(table, dict):
            problems.append(f"{key} must be an object, got {table!r}")
            continue
        patterns.update({k: rf"(.*\.)?({k})$" for k in table})  # as pattern_value matches keys
        for k, v in table.items():
            if key == "rank_pattern" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                problems.append(f"rank_pattern value for {k!r} must be a positive integer, got {v!r}")
            if key == "alpha_pattern" and not is_number(v):
                problems.append(f"alpha_pattern value for {k!r} must be a number, got {v!r}")
    for pattern, matched in patterns.items():
        try:
            re.compile(matched)
        except re.error as e:
            problems.append(f"{pattern!r} is not a valid regular expression ({e})")
    return problems


def serving_problems(config: dict, modules: Mapping[str, LoraModule] = ()) -> list[str]:
    """Why loradock's runtime would not serve a well-formed adapter (empty: it would)."""
    problems = [why for key, why in _NOT_SERVED.items() if config.get(key) and key != "modules_to_save"]
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r} (trained base-layer biases) is not served; "
                        "lora_bias=true is")
    outside = sorted({name.rsplit(".", 1)[-1] for name in modules} & set(HEAD_AND_EMBEDDINGS))
    if outside:
        problems.append(f"target_modules: LoRA on {', '.join(outside)} (the embeddings or the output head) is "
                        "not served; the runtime adapts the linear layers of the decoder")
    return problems


def parameter_lora(module: str, config: dict) -> bool:
    """Whether `module`'s tensors are LoRA on bare parameters (`target_parameters`: MoE experts'
    fused weights, routers), which PEFT names after the module holding the parameter. Those are
    left out of the module checks; `serving_problems` says they are not served."""
    targets = config.get("target_modules")
    if not config.get("target_parameters") or not isinstance(targets, list):
        return False
    parts = [p for p in module.split(".") if p != "base_layer"]
    return parts[-1] not in targets


def read_modules(shapes: Mapping[str, list[int]], config: dict) -> tuple[list[str], dict[str, LoraModule]]:
    """The adapted modules described by tensor names -> shapes (from a safetensors header or the
    tensors themselves), checked against a well-formed `config`: (problems, {module: LoraModule})."""
    problems: list[str] = []
    parts: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        parsed = parse_tensor_name(name)
        if parsed is None:
            problems.append(f"unexpected tensor {name!r} (only lora_A / lora_B weights, lora_B.bias and "
                            "DoRA's lora_magnitude_vector are supported)")
            continue
        if not parameter_lora(parsed[0], config):
            parts.setdefault(parsed[0], {})[parsed[1]] = list(shape)
    if not parts:
        problems.append(f"{WEIGHTS_FILE} holds no LoRA tensors")
    targets = config.get("target_modules") or []
    dora, lora_bias = bool(config.get("use_dora")), bool(config.get("lora_bias"))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for module, found in sorted(parts.items()):
        if A not in found or B not in found:
            problems.append(f"{module}: has no {'lora_B' if A in found else 'lora_A'} weight")
            continue
        a, b = found[A], found[B]
        r = pattern_value(rank_pattern, module, config.get("r"))
        if len(a) != 2 or len(b) != 2:
            problems.append(f"{module}: lora_A {a} / lora_B {b} are not matrices")
            continue
        if a[0] != r or b[1] != r:
            problems.append(f"{module}: rank in tensors (lora_A {a}, lora_B {b}) does not match rank "
                            f"r={r} from the config")
            continue
        out = b[0]
        bad = []
        for part, wanted, key in ((BIAS, lora_bias, "lora_bias"), (MAGNITUDE, dora, "use_dora")):
            if part in found and not wanted:
                bad.append(f"{module}: has {part} but {key} is not true in {CONFIG_FILE}")
            elif wanted and part not in found:
                bad.append(f"{module}: {key} is true but it has no {part}")
            elif part in found and found[part] != [out]:
                bad.append(f"{module}: {part} has shape {found[part]}, expected [{out}] (one per output)")
        problems += bad
        if bad:
            continue
        if isinstance(targets, str | list) and targets and not is_target(targets, module):
            problems.append(f"{module}: has LoRA weights but is not in target_modules {targets}")
        modules[module] = LoraModule(module, r, pattern_value(alpha_pattern, module, config.get("lora_alpha")),
                                     in_features=a[1], out_features=out, has_bias=lora_bias, has_magnitude=dora)
    if isinstance(targets, list):
        for t in targets:
            if not any(is_target([t], m) for m in parts):
                problems.append(f"target module {t!r} has no LoRA weights in {WEIGHTS_FILE}")
    return problems, modules
