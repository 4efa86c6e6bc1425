"""Check that a directory is a PEFT LoRA adapter loradock can store (and say if it can serve it).

Reads `adapter_config.json` and the safetensors header only (no torch). Every
problem found is collected, so one error message lists all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import peft_format
from .errors import InvalidAdapterError
from .peft_format import CONFIG_FILE, WEIGHTS_FILE, LoraModule
from .safetensors_header import SafetensorsFormatError, read_header

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
CONVERT_HINT = (
    "loradock stores safetensors only (pickle files can run code when loaded). Convert with: "
    "PeftModel.from_pretrained(base_model, DIR).save_pretrained(OUT, safe_serialization=True)"
)
_MAX_LISTED = 8  # problems of one kind listed before "... and N more"


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
    serving_problems: tuple[str, ...] = ()  # why loradock's runtime would not serve it (empty: it would)

    @property
    def servable(self) -> bool:
        return not self.serving_problems


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


def validate_adapter_dir(src: Path, shown_as: Path | None = None) -> AdapterSpec:
    """Return the adapter's spec, or raise InvalidAdapterError listing every problem found.

    `shown_as` is the path messages name (when `src` is a staged copy of it).
    """
    src = Path(src)
    shown = Path(shown_as) if shown_as is not None else src
    check_files(src)
    config = _read_config(src, shown)
    problems = peft_format.config_problems(config)
    try:
        header = read_header(src / WEIGHTS_FILE)
    except SafetensorsFormatError as e:
        problems.append(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}")
        raise _fail(shown, problems) from e
    if not problems:  # tensor checks need a sane config
        tensor_problems, modules = peft_format.read_modules(
            {name: info["shape"] for name, info in header.items()}, config)
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
        serving_problems=tuple(peft_format.serving_problems(config, modules)),
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
    if not any(p.endswith("no such layer in the base model") for p in problems):
        return _listed(problems)
    layers = sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name, shape in base_shapes.items()
                     if name.endswith(".weight") and len(shape) == 2} - set(peft_format.HEAD_AND_EMBEDDINGS))
    return [*_listed(problems), f"the base's layers that take LoRA are named {', '.join(layers)}"]
