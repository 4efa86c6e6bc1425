"""Check that a directory is a PEFT LoRA adapter loradock can store and serve.

Reads `adapter_config.json` and the safetensors header only (no torch). Every
problem found is collected, so one error message lists all of them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidAdapterError
from .safetensors_header import SafetensorsFormatError, read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
CONVERT_HINT = (
    "loradock stores safetensors only (pickle files can run code when loaded). Convert with: "
    "PeftModel.from_pretrained(base_model, DIR).save_pretrained(OUT, safe_serialization=True)"
)

# PEFT saves LoRA weights as `base_model.model.<module>.lora_A.weight` / `lora_B.weight`.
_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight")
_MAX_LISTED = 8  # problems of one kind listed before "... and N more"


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: x[in] -> lora_A [r, in] -> lora_B [out, r]."""

    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class AdapterSpec:
    """What the registry records about a valid LoRA adapter directory."""

    config: dict
    rank: int
    alpha: float
    target_modules: list[str]
    use_rslora: bool
    base_model_name_or_path: str | None
    modules: dict[str, LoraModule]


def _listed(problems: list[str]) -> list[str]:
    if len(problems) <= _MAX_LISTED:
        return problems
    return [*problems[:_MAX_LISTED], f"... and {len(problems) - _MAX_LISTED} more"]


def _fail(src: Path, problems: list[str]) -> InvalidAdapterError:
    lines = "\n  - ".join(_listed(problems))
    return InvalidAdapterError(f"{src} is not a usable LoRA adapter:\n  - {lines}")


def check_files(src: Path) -> None:
    """The directory exists and holds a config and safetensors weights (not pickle)."""
    if not src.exists():
        raise InvalidAdapterError(f"{src}: no such file or directory")
    if not src.is_dir():
        raise InvalidAdapterError(f"{src}: not a directory (give the folder PEFT's save_pretrained wrote)")
    problems = []
    if not (src / CONFIG_FILE).is_file():
        problems.append(f"missing {CONFIG_FILE} (is this a PEFT adapter directory?)")
    if not (src / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            problems.append(f"pickle weights ({', '.join(pickles)}) are refused. {CONVERT_HINT}")
        else:
            problems.append(f"missing {WEIGHTS_FILE}")
    if problems:
        raise _fail(src, problems)


def _read_config(src: Path, shown: Path) -> dict:
    try:
        config = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(shown, [f"{CONFIG_FILE} is not valid JSON ({e})"]) from e
    if not isinstance(config, dict):
        raise _fail(shown, [f"{CONFIG_FILE} is not a JSON object"])
    return config


def _config_problems(config: dict) -> list[str]:
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only LoRA adapters ('LORA') are supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r (rank) must be a positive integer, got {r!r}")
    if not isinstance(config.get("lora_alpha"), int | float) or isinstance(config.get("lora_alpha"), bool):
        problems.append(f"lora_alpha must be a number, got {config.get('lora_alpha')!r}")
    targets = config.get("target_modules")
    if not targets or not isinstance(targets, str | list):
        problems.append(f"target_modules must be a non-empty list of module names, got {targets!r}")
    if config.get("use_dora"):
        problems.append("DoRA adapters (use_dora) are not supported")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save ({config['modules_to_save']}) is not supported: only LoRA A/B weights are served")
    # the runtime refuses these too: what the registry stores must be servable
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("adapters with trained biases are not supported (bias must be 'none')")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=true is not supported (Linear layers only)")
    patterns = {targets: targets} if isinstance(targets, str) else {}  # shown -> as matched
    for key in ("rank_pattern", "alpha_pattern"):
        table = config.get(key) or {}
        if not isinstance(table, dict):
            problems.append(f"{key} must be an object")
            continue
        patterns.update({k: rf"(.*\.)?({k})$" for k in table})  # as _pattern_value matches keys
        if key == "alpha_pattern" and not all(isinstance(v, int | float) and not isinstance(v, bool)
                                              for v in table.values()):
            problems.append("alpha_pattern values must be numbers")
    for pattern, matched in patterns.items():
        try:
            re.compile(matched)
        except re.error as e:
            problems.append(f"{pattern!r} is not a valid regular expression ({e})")
    return problems


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): first key matching the module name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_target(targets: str | list[str], module: str) -> bool:
    if isinstance(targets, str):  # PEFT treats a string as a full-match regex
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets)


def _tensor_problems(
    header: dict[str, dict], config: dict
) -> tuple[list[str], dict[str, LoraModule]]:
    problems: list[str] = []
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, info in header.items():
        m = _TENSOR.fullmatch(name)
        if m is None:
            problems.append(f"unexpected tensor {name!r} (only lora_A / lora_B weights are supported)")
            continue
        pairs.setdefault(m["module"], {})[m["kind"]] = info["shape"]
    if not pairs:
        problems.append(f"{WEIGHTS_FILE} holds no LoRA tensors")
    targets = config.get("target_modules") or []
    rank_pattern = config.get("rank_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for module, shapes in sorted(pairs.items()):
        if set(shapes) != {"A", "B"}:
            missing = "lora_B" if "A" in shapes else "lora_A"
            problems.append(f"{module}: has no {missing} weight")
            continue
        a, b = shapes["A"], shapes["B"]
        r = _pattern_value(rank_pattern, module, config.get("r"))
        if len(a) != 2 or len(b) != 2:
            problems.append(f"{module}: lora_A {a} / lora_B {b} are not matrices")
            continue
        if a[0] != r or b[1] != r:
            problems.append(f"{module}: rank in tensors (lora_A {a}, lora_B {b}) does not match rank r={r} from the config")
            continue
        if isinstance(targets, str | list) and targets and not _is_target(targets, module):
            problems.append(f"{module}: has LoRA weights but is not in target_modules {targets}")
        modules[module] = LoraModule(module, r, in_features=a[1], out_features=b[0])
    if isinstance(targets, list):
        for t in targets:
            if not any(_is_target([t], m) for m in pairs):
                problems.append(f"target module {t!r} has no LoRA weights in {WEIGHTS_FILE}")
    return problems, modules


def validate_adapter_dir(src: Path, shown_as: Path | None = None) -> AdapterSpec:
    """Return the adapter's spec, or raise InvalidAdapterError listing every problem found.

    `shown_as` is the path messages name (when `src` is a staged copy of it).
    """
    src = Path(src)
    shown = Path(shown_as) if shown_as is not None else src
    check_files(src)
    config = _read_config(src, shown)
    problems = _config_problems(config)
    try:
        header = read_header(src / WEIGHTS_FILE)
    except SafetensorsFormatError as e:
        problems.append(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}")
        raise _fail(shown, problems) from e
    if not problems:  # tensor checks need a sane config
        tensor_problems, modules = _tensor_problems(header, config)
        problems += tensor_problems
    if problems:
        raise _fail(shown, problems)
    targets = config["target_modules"]
    if isinstance(targets, str):  # a regex: record the layer names it actually matched
        targets = {m.rsplit(".", 1)[-1] for m in modules}
    return AdapterSpec(
        config=config,
        rank=config["r"],
        alpha=config["lora_alpha"],
        target_modules=sorted(targets),
        use_rslora=bool(config.get("use_rslora", False)),
        base_model_name_or_path=config.get("base_model_name_or_path") or None,
        modules=modules,
    )


def base_problems(modules: dict[str, LoraModule], base_shapes: dict[str, list[int]]) -> list[str]:
    """Why these LoRA modules do not fit a base with these tensor shapes (empty: they fit)."""
    problems = []
    for m in modules.values():
        shape = base_shapes.get(f"{m.name}.weight")
        if shape is None:
            problems.append(f"{m.name}: no such layer in the base model")
        elif shape != [m.out_features, m.in_features]:
            problems.append(
                f"{m.name}: adapter maps {m.in_features} -> {m.out_features} features but the "
                f"base weight is {shape} (out, in)"
            )
    return _listed(problems)
