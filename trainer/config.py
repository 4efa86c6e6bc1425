"""The training config: one dataclass, read from YAML, checked before anything is loaded.

Key names follow LLaMA-Factory where they mean the same thing, so its SFT LoRA
configs work unchanged; loradock's own keys (adapter_name, aliases, parent,
publish, device) say where the result goes. Each field's docstring is its
documentation and is rendered by `loradock train --help`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError, problems_message

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
TEMPLATE_ALIASES = ("default", "auto", "base")


@dataclass
class TrainConfig:
    """Everything one training run needs. Unknown keys are refused."""

    # Folder of the YAML file this came from: a second place to look for relative dataset paths.
    config_dir: typing.ClassVar[Path | None] = None

    # --- model -------------------------------------------------------------
    model_name_or_path: str = ""
    """Base model: a registry base name (see `loradock bases list`) or a local Hugging Face model directory."""
    template: str = "default"
    """Prompt format. Only the base tokenizer's own chat template is used ("default")."""
    quantization_bit: int | None = None
    """Load the base with bitsandbytes in 4 bit (QLoRA, NF4) or 8 bit; empty = full precision."""
    device: str = "auto"
    """Where to train: auto (CUDA when available, else CPU), cpu, cuda or cuda:N."""
    bf16: bool = False
    """Run forward passes under bfloat16 autocast (CUDA). LoRA weights stay float32."""
    fp16: bool = False
    """Run forward passes under float16 autocast (CUDA). LoRA weights stay float32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower)."""

    # --- data ----------------------------------------------------------------
    dataset: list[str] = field(default_factory=list)
    """Datasets, comma separated: names in dataset_dir/dataset_info.json, or JSON/JSONL files."""
    dataset_dir: str = "."
    """Folder holding dataset_info.json and the dataset files (relative: to the working directory, else to the config file)."""
    cutoff_len: int = 2048
    """Maximum tokens per example; longer examples are cut (and counted)."""
    max_samples: int | None = None
    """Use at most this many records from each dataset (for quick runs)."""
    val_size: float = 0.0
    """Held-out split for eval loss: a fraction in (0, 1) or a number of records (>= 1)."""

    # --- LoRA ----------------------------------------------------------------
    stage: str = "sft"
    """Training stage. Only supervised fine-tuning ("sft") is supported."""
    do_train: bool = True
    """Accepted for LLaMA-Factory compatibility; must be true."""
    finetuning_type: str = "lora"
    """Only "lora" is supported (full and freeze tuning would change the base)."""
    lora_rank: int = 8
    """LoRA rank r: the inner dimension of each adapter matrix pair."""
    lora_alpha: float | None = None
    """LoRA alpha (scaling = alpha / r); empty = 2 * lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input, in [0, 1)."""
    lora_target: list[str] = field(default_factory=lambda: ["all"])
    """Modules to adapt, comma separated (e.g. q_proj,v_proj), or "all" for every linear projection."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling (alpha / sqrt(r)), passed to PEFT."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA), passed to PEFT."""

    # --- optimisation ----------------------------------------------------------
    per_device_train_batch_size: int = 8
    """Examples per forward pass on each device."""
    per_device_eval_batch_size: int = 8
    """Examples per forward pass when computing eval loss."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step (effective batch = batch size x this x processes)."""
    learning_rate: float = 1e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    num_train_epochs: float = 3.0
    """Passes over the training split (fractions allowed); ignored when max_steps > 0."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 = use num_train_epochs."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value each step; 0 = no clipping."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule: linear, cosine, constant, constant_with_warmup, cosine_with_restarts, polynomial."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up from 0."""
    seed: int = 42
    """Seed for LoRA initialisation, data order, split and dropout: same seed, same weights."""

    # --- run outputs -------------------------------------------------------------
    output_dir: str | None = None
    """Folder for the step log, checkpoints and the final adapter; empty = runs/<adapter_name>-<time>."""
    overwrite_output_dir: bool = False
    """Allow an output_dir that already holds a run (otherwise refused, to protect its checkpoints)."""
    logging_steps: int = 10
    """Log loss and learning rate every N steps (the JSONL step log gets every step)."""
    eval_steps: int | None = None
    """Compute eval loss every N steps (needs val_size); empty = only at the end."""
    save_steps: int = 500
    """Save a resumable checkpoint every N steps; 0 = never."""
    resume_from_checkpoint: str | None = None
    """Continue a run exactly: a checkpoint folder, or "true"/"latest" for the newest one in output_dir."""

    # --- registry ----------------------------------------------------------------
    adapter_name: str | None = None
    """Registry name to publish to (e.g. medical or org/medical); defaults to the parent's name."""
    aliases: list[str] = field(default_factory=list)
    """Aliases to point at the new version (e.g. staging), comma separated."""
    parent: str | None = None
    """Continue from an existing version (e.g. medical@3): LoRA weights start from it."""
    publish: bool = True
    """Publish the trained adapter as a new registry version (false: only write output_dir)."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems_message("invalid training config", problems))

    # Range and choice checks; types were checked when the values were read.
    def problems(self) -> list[str]:
        p: list[str] = []
        if not self.model_name_or_path:
            p.append("model_name_or_path: required (a registry base name or a model directory)")
        if not self.dataset:
            p.append("dataset: required (dataset names or files, comma separated)")
        if self.template not in TEMPLATE_ALIASES:
            p.append(
                f"template: {self.template!r} is not supported; loradock renders prompts with the "
                "base model's own chat template, so use template: default"
            )
        if self.stage != "sft":
            p.append(f"stage: {self.stage!r} is not supported; only 'sft' (supervised fine-tuning) is")
        if not self.do_train:
            p.append("do_train: must be true (evaluation-only runs are not supported)")
        if self.finetuning_type != "lora":
            p.append(
                f"finetuning_type: {self.finetuning_type!r} is not supported; only 'lora' is "
                "(adapters never change the base)"
            )
        if self.quantization_bit not in (None, 4, 8):
            p.append(f"quantization_bit: must be 4, 8 or empty, not {self.quantization_bit}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            p.append(f"device: must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.bf16 and self.fp16:
            p.append("bf16, fp16: choose at most one")
        for name in ("lora_rank", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "cutoff_len", "logging_steps"):
            if getattr(self, name) < 1:
                p.append(f"{name}: must be >= 1, not {getattr(self, name)}")
        for name in ("max_samples", "eval_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                p.append(f"{name}: must be >= 1 or empty, not {getattr(self, name)}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            p.append(f"lora_alpha: must be > 0, not {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            p.append(f"lora_dropout: must be in [0, 1), not {self.lora_dropout}")
        if self.learning_rate <= 0:
            p.append(f"learning_rate: must be > 0, not {self.learning_rate}")
        if self.weight_decay < 0:
            p.append(f"weight_decay: must be >= 0, not {self.weight_decay}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            p.append("num_train_epochs: must be > 0 (or set max_steps)")
        if self.max_steps == 0 or self.max_steps < -1:
            p.append(f"max_steps: must be >= 1, or -1 to use num_train_epochs, not {self.max_steps}")
        if self.max_grad_norm < 0:
            p.append(f"max_grad_norm: must be >= 0 (0 = no clipping), not {self.max_grad_norm}")
        if self.lr_scheduler_type not in SCHEDULERS:
            p.append(f"lr_scheduler_type: {self.lr_scheduler_type!r} is not one of {', '.join(SCHEDULERS)}")
        if not 0 <= self.warmup_ratio < 1:
            p.append(f"warmup_ratio: must be in [0, 1), not {self.warmup_ratio}")
        if self.val_size < 0 or (self.val_size >= 1 and not float(self.val_size).is_integer()):
            p.append(f"val_size: must be a fraction in [0, 1) or a whole number of records, not {self.val_size}")
        if self.save_steps < 0:
            p.append(f"save_steps: must be >= 0 (0 = never), not {self.save_steps}")
        if self.eval_steps is not None and self.val_size == 0:
            p.append("eval_steps: needs a validation split; set val_size")
        if self.publish and not (self.adapter_name or self.parent):
            p.append("adapter_name: required to publish (or set parent, or publish: false)")
        return p

    def to_dict(self) -> dict:
        """The resolved config as plain JSON-able values (recorded in the manifest)."""
        return dataclasses.asdict(self)


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """{field name: docstring}, read from the string literal under each field."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def config_help() -> str:
    """Every config key with its type, default and docstring, for `--help`."""
    docs = field_docs()
    hints = typing.get_type_hints(TrainConfig)
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "required" if default in ("", []) and f.name in ("model_name_or_path", "dataset") else (
            f"default {_show(default)}"
        )
        lines.append(f"  {f.name} ({_type_name(hints[f.name])}, {shown})")
        lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def load_config(
    source: str | Path | Mapping,
    overrides: Sequence[str] | Mapping | None = None,
) -> TrainConfig:
    """Read a config from a YAML file or a mapping, apply overrides, check it.

    `overrides` are `key=value` strings (values parsed as YAML scalars, as on the
    command line) or a mapping; they win over the file. Every problem (unknown
    keys with a suggestion, wrong types, values out of range) is reported at once.
    """
    config_dir: Path | None = None
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of key: value, not {type(raw).__name__}")
        config_dir = path.resolve().parent
    raw.update(parse_overrides(overrides))
    values, problems = _coerce_all(raw)
    if problems:
        raise ConfigError(problems_message("invalid training config", problems))
    config = TrainConfig(**values)
    config.config_dir = config_dir
    return config


def parse_overrides(overrides: Sequence[str] | Mapping | None) -> dict:
    """`["lora_rank=16", "dataset=a,b"]` -> {"lora_rank": 16, "dataset": "a,b"}."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value (e.g. learning_rate=2e-4)")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _coerce_all(raw: dict) -> tuple[dict, list[str]]:
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    values, problems = {}, []
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{key}: unknown key{hint}")
            continue
        try:
            values[key] = _coerce(value, hints[key])
        except ValueError as e:
            problems.append(f"{key}: {e}")
    return values, problems


def _coerce(value: object, hint: object) -> object:
    """Check `value` against a field's type, converting only where YAML is ambiguous."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0])
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"expected a list of names or a comma-separated string, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")
        return value
    if hint is float:
        # PyYAML reads 3e-4 (no dot) as a string; accept it as the number it means.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) and value is True:
            return "true"  # resume_from_checkpoint: true
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint}")  # a bug in TrainConfig, not user input


def _type_name(hint: object) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return "list"
    if args:
        return "/".join(_type_name(a) for a in args if a is not type(None)) + " or empty"
    return getattr(hint, "__name__", str(hint))


def _show(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, list):
        return ",".join(value) if value else "empty"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
