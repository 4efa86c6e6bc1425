"""The training config: one dataclass, read from YAML, checked before anything is loaded.

Key names follow LLaMA-Factory where they mean the same thing, so its SFT LoRA and
QLoRA example configs run unchanged: its keys with no effect here are accepted and
named in one warning (`lf_keys.py`), keys that would need machinery loradock lacks
(deepspeed) are refused with the way to get the same result. loradock's own keys
(adapter_name, aliases, parent, publish, device) say where the result goes. Each
field's docstring is its documentation and is rendered by `loradock train --help`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import loradock.registry.peft_format as peft_format
import yaml
from loradock.registry.docstrings import field_docs as dataclass_field_docs
from loradock.registry.quantization import DEFAULT_DOUBLE_QUANT

from .errors import ConfigError, problems_message
from .lf_keys import IGNORED_KEYS, ignored_help, split_ignored

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
TEMPLATE_ALIASES = ("default", "auto", "base")  # the base model's own chat template
REPORTERS = ("none", "tensorboard")
EVAL_STRATEGIES = ("no", "steps", "epoch")
QUANTIZATION_METHODS = ("bnb", "bitsandbytes")


@dataclass
class TrainConfig:
    """Everything one training run needs. Unknown keys are refused."""

    # Folder of the YAML file this came from: a second place to look for relative dataset paths.
    config_dir: typing.ClassVar[Path | None] = None
    # LLaMA-Factory keys that have no effect here, with their values (see lf_keys.py).
    ignored: typing.ClassVar[dict] = {}

    # --- model -------------------------------------------------------------
    model_name_or_path: str = ""
    """Base model: a registry base name (see `loradock bases list`) or a local Hugging Face model directory."""
    template: str | None = "default"
    """Prompt format. Training always renders with the base model's own chat template (default, auto, base or empty); a LLaMA-Factory template name (qwen3_nothink, llama3, ...) is accepted when LLaMA-Factory's template renders conversations exactly as the base's does, and refused otherwise with the names that fit this base."""
    quantization_bit: int | None = None
    """Load the base with bitsandbytes in 4 bit (QLoRA, NF4) or 8 bit; empty = full precision."""
    quantization_method: str = "bnb"
    """On-the-fly quantization library: bnb (bitsandbytes, also spelled bitsandbytes) is the only one."""
    double_quantization: bool = DEFAULT_DOUBLE_QUANT
    """4-bit only: also quantize the quantization constants (bitsandbytes double quantization).
    Recorded in the manifest; `loradock serve` uses the same default (--double-quant)."""
    device: str = "auto"
    """Where to train: auto (CUDA when available, else CPU), cpu, cuda or cuda:N."""
    bf16: bool = False
    """bfloat16 on CUDA (base weights and autocast) where the GPU has it; elsewhere float32, with a note. LoRA weights stay float32."""
    fp16: bool = False
    """float16 on CUDA (base weights and autocast, no loss scaling); on CPU float32, with a note. LoRA weights stay float32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower)."""

    # --- data ----------------------------------------------------------------
    dataset: list[str] = field(default_factory=list)
    """Datasets, comma separated: names in dataset_dir/dataset_info.json, or JSON/JSONL files."""
    dataset_dir: str = "data"
    """Folder holding dataset_info.json and the dataset files (relative: to the working directory, else to the config file). A dataset given as a file path is also looked up as given."""
    eval_dataset: list[str] | None = None
    """Validation datasets (names or files, comma separated) for eval loss, instead of a val_size split."""
    cutoff_len: int = 2048
    """Maximum tokens per example, cut as LLaMA-Factory does: each prompt/answer pair in turn gets what is left, shared by infer_seqlen (a short answer is kept whole and the prompt cut); cut examples are counted."""
    max_samples: int | None = None
    """Use the first N records of each dataset (training and eval datasets alike)."""
    val_size: float = 0.0
    """Held-out split for eval loss: a fraction in (0, 1) (rounded up) or a number of records (>= 1), drawn with the seed as LLaMA-Factory's train_test_split draws it."""

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
    """Fraction of the steps spent warming the learning rate up from 0 (ignored when warmup_steps > 0)."""
    warmup_steps: float = 0.0
    """Warm-up length: a number of steps (>= 1), or a fraction of all steps when below 1; 0 = use warmup_ratio."""
    seed: int = 42
    """Seed for LoRA initialisation, data order, split and dropout: same seed, same weights."""

    # --- run outputs -------------------------------------------------------------
    output_dir: str | None = None
    """Folder for the step log, checkpoints and the final adapter; empty = runs/<adapter_name>-<time>."""
    overwrite_output_dir: bool = False
    """Allow an output_dir that already holds a run (otherwise refused, to protect its checkpoints)."""
    logging_steps: int = 10
    """Log loss and learning rate every N steps (the JSONL step log gets every step)."""
    eval_strategy: str | None = None
    """When to compute eval loss during training: no, steps (every eval_steps, default logging_steps) or epoch; empty = steps if eval_steps is set, else no. The final eval loss is always computed when there is validation data."""
    eval_steps: int | None = None
    """Compute eval loss every N steps (needs val_size or eval_dataset); empty = only at the end."""
    save_steps: int = 500
    """Save a checkpoint every N steps; 0 = never."""
    save_only_model: bool = False
    """Checkpoints hold only the adapter weights (smaller, but a run cannot resume from them)."""
    resume_from_checkpoint: str | None = None
    """Continue a run exactly: a checkpoint folder, or "true"/"latest" for the newest one in output_dir."""
    plot_loss: bool = False
    """At the end, draw training_loss.png (and training_eval_loss.png with validation data) beside train_log.jsonl."""
    report_to: list[str] | None = None
    """Where step metrics go besides train_log.jsonl: none, or tensorboard (event files in output_dir/runs; needs the tensorboard package)."""
    ddp_timeout: int = 1800
    """Seconds a process waits for the others in a multi-process run (the process group's timeout)."""
    deepspeed: str | None = None
    """Refused when set: loradock runs data parallel with torchrun / accelerate (DDP); LoRA weights need no ZeRO sharding."""

    # --- registry ----------------------------------------------------------------
    adapter_name: str | None = None
    """Registry name to publish to (e.g. medical or org/medical); defaults to the parent's name, else the config file's name."""
    aliases: list[str] = field(default_factory=list)
    """Aliases to point at the new version (e.g. staging), comma separated."""
    parent: str | None = None
    """Continue from an existing version (e.g. medical@3): LoRA weights start from it."""
    publish: bool = True
    """Publish the trained adapter as a new registry version (false: only write output_dir)."""
    sign_key: str | None = None
    """Sign the published version with this EC private key file (PEM; OpenSSF model signing), so servers with a trust policy accept it."""

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
        if self.template is not None and not self.template.strip():
            p.append("template: empty; leave it out (or use default) for the base model's own chat template")
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
        if self.quantization_method not in QUANTIZATION_METHODS:
            p.append(
                f"quantization_method: {self.quantization_method!r} is not supported; loradock "
                "quantizes on the fly with bitsandbytes (bnb)"
            )
        if self.deepspeed is not None:
            p.append(
                "deepspeed: not supported; loradock trains data parallel with DDP, which needs no "
                "DeepSpeed config (LoRA weights are small enough to keep whole on every process). "
                "Remove the key and launch `torchrun --nproc_per_node N loradock train CONFIG`"
            )
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            p.append(f"device: must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.bf16 and self.fp16:
            p.append("bf16, fp16: choose at most one")
        for name in ("lora_rank", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "cutoff_len", "logging_steps", "ddp_timeout"):
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
        if self.warmup_steps < 0 or (self.warmup_steps >= 1 and not float(self.warmup_steps).is_integer()):
            p.append(
                f"warmup_steps: must be a whole number of steps, or a fraction of all steps below 1, "
                f"not {self.warmup_steps}"
            )
        if self.val_size < 0 or (self.val_size >= 1 and not float(self.val_size).is_integer()):
            p.append(f"val_size: must be a fraction in [0, 1) or a whole number of records, not {self.val_size}")
        if self.val_size > 0 and self.eval_dataset:
            p.append("val_size, eval_dataset: choose one source of validation data, not both")
        if self.save_steps < 0:
            p.append(f"save_steps: must be >= 0 (0 = never), not {self.save_steps}")
        has_validation = self.val_size > 0 or bool(self.eval_dataset)
        if self.eval_strategy is not None and self.eval_strategy not in EVAL_STRATEGIES:
            p.append(f"eval_strategy: {self.eval_strategy!r} is not one of {', '.join(EVAL_STRATEGIES)}")
        if self.eval_steps is not None and not has_validation:
            p.append("eval_steps: needs a validation split; set val_size or eval_dataset")
        elif self.eval_strategy in ("steps", "epoch") and not has_validation:
            p.append(f"eval_strategy: {self.eval_strategy} needs validation data; set val_size or eval_dataset")
        for name in self.report_to or []:
            if name not in REPORTERS:
                p.append(
                    f"report_to: {name!r} is not supported; use none or tensorboard (every step is "
                    "also written to train_log.jsonl in output_dir)"
                )
        if self.report_to and len(self.report_to) > 1 and "none" in self.report_to:
            p.append(f"report_to: none cannot be combined with {', '.join(self.report_to)}")
        for prefix in ("REMOTE:", "ONLINE"):
            if self.dataset_dir.startswith(prefix):
                p.append(
                    f"dataset_dir: {self.dataset_dir!r} reads datasets from a hub, and loradock trains "
                    "offline; download the folder and give its local path"
                )
        if self.publish and not (self.adapter_name or self.parent):
            p.append("adapter_name: required to publish (or set parent, or publish: false)")
        return p + self.serving_problems()

    def serving_problems(self) -> list[str]:
        """The adapter this run would save, against the registry's PEFT format rules (one home:
        registry/peft_format.py), so no run trains and then cannot be published or served."""
        targets = [] if self.lora_target == ["all"] else list(self.lora_target)
        adapter = {"peft_type": "LORA", "r": self.lora_rank, "lora_alpha": self.lora_alpha or 2 * self.lora_rank,
                   "target_modules": targets or ["all"], "use_rslora": self.use_rslora,
                   "use_dora": self.use_dora, "bias": "none"}
        found = peft_format.config_problems(adapter) if self.lora_rank >= 1 else []
        found += peft_format.serving_problems(adapter, dict.fromkeys(targets))
        # The rules' messages name PEFT's keys ("target_modules: ..."); name the trainer's instead.
        keys = {"r": "lora_rank", "target_modules": "lora_target"}
        named = [problem.partition(": ") for problem in found]
        return [f"{keys[key]}: {rest}" if sep and key in keys else f"lora settings: {key}{sep}{rest}"
                for key, sep, rest in named]

    def to_dict(self) -> dict:
        """The resolved config as plain JSON-able values (recorded in the manifest)."""
        return dataclasses.asdict(self)

    @property
    def uses_base_template(self) -> bool:
        """True when `template` names the base model's own chat template rather than a LLaMA-Factory one."""
        return self.template is None or self.template in TEMPLATE_ALIASES

    @property
    def periodic_eval(self) -> str:
        """When eval loss is computed during training: "no", "steps" or "epoch"."""
        if self.eval_strategy is None:
            return "steps" if self.eval_steps else "no"
        return self.eval_strategy

    @property
    def eval_interval(self) -> int | None:
        """Steps between evals for the "steps" strategy (eval_steps, else logging_steps, as in transformers)."""
        return (self.eval_steps or self.logging_steps) if self.periodic_eval == "steps" else None

    @property
    def reporters(self) -> list[str]:
        """The report_to destinations other than none."""
        return [r for r in self.report_to or [] if r != "none"]

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warm-up steps for a run of `total_steps`: warmup_steps wins over warmup_ratio (transformers' rule)."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        ratio = self.warmup_steps if self.warmup_steps > 0 else self.warmup_ratio
        return math.ceil(ratio * total_steps)


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """{field name: docstring}, read from the string literal under each field."""
    return dataclass_field_docs(cls)


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
    lines += ["", "LLaMA-Factory keys accepted with no effect (a warning names those set to act):",
              ignored_help()]
    return "\n".join(lines)


def load_config(
    source: str | Path | Mapping,
    overrides: Sequence[str] | Mapping | None = None,
) -> TrainConfig:
    """Read a config from a YAML file or a mapping, apply overrides, check it.

    `overrides` are `key=value` strings (values parsed as YAML scalars, as on the
    command line) or a mapping; they win over the file. Every problem (unknown
    keys with a suggestion, wrong types, values out of range) is reported at once.
    A config file without adapter_name or parent publishes under the file's name
    (qwen3_lora_sft.yaml -> qwen3_lora_sft), as LLaMA-Factory configs carry no name.
    """
    config_dir: Path | None = None
    stem: str | None = None
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
        stem = path.stem
    raw.update(parse_overrides(overrides))
    raw, ignored = split_ignored(raw)
    values, problems = _coerce_all(raw)
    if problems:
        raise ConfigError(problems_message("invalid training config", problems))
    if stem and not values.get("adapter_name") and not values.get("parent"):
        values["adapter_name"] = name_from_stem(stem)
    config = TrainConfig(**values)
    config.config_dir = config_dir
    config.ignored = ignored
    return config


def name_from_stem(stem: str) -> str | None:
    """A registry name made from a config file's name: other characters become '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip("._-").replace("..", ".")[:96]
    return name or None


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
            close = difflib.get_close_matches(str(key), [*names, *IGNORED_KEYS], n=1, cutoff=0.6)
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
