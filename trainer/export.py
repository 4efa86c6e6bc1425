"""Export a registry version for other runtimes.

- adapter only: a clean PEFT directory (adapter_config.json, adapter_model.safetensors and the
  model card; no manifest), loadable with `PeftModel.from_pretrained`;
- merged: a full Hugging Face model directory, the adapter merged into an unquantized copy
  of its base (PEFT's `merge_and_unload`) in the asked dtype, with the tokenizer and a card.
  When the adapter was trained on a quantized base (QLoRA), that base is loaded quantized as
  the manifest's recipe says and dequantized before merging, so the merged weights are the
  ones the adapter was trained against; the card says so.

The output is written to a staging directory beside `out` and renamed into place at the
end, so a failed export leaves nothing behind; `out` must not exist or be empty.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from loradock.registry.quantization import recorded_recipe

from .errors import TrainerError
from .model import load_base, load_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


class ExportError(TrainerError, ValueError):
    """The version cannot be exported as asked (the message says why)."""


@dataclass(frozen=True)
class ExportSource:
    """A resolved registry version and its base, as the CLI (which reads the registry) found them."""

    ref: str  # name@N
    digest: str
    path: Path  # the version directory
    manifest: dict
    base_name: str | None
    base_dir: Path | None  # None when the base is not in the registry


def export_version(version: ExportSource, out: Path, *, merge: bool = False, dtype: str | None = None,
                   progress: Callable[[str], None] = lambda _: None) -> Path:
    """Export `version` into `out` (see the module docstring); returns `out`."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; export into a new one")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype is not None and not merge:
        raise ExportError("--dtype applies to merged exports (--merge); an adapter is exported as stored")
    if merge and version.base_dir is None:
        raise ExportError(f"{version.ref} was trained on base {version.base_name!r}, which is not in this "
                          "registry; add it with `loradock bases add` to export a merged model")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if merge:
            _write_merged(version, stage, dtype, progress)
        else:
            for name in PEFT_FILES:
                shutil.copyfile(version.path / name, stage / name)
        if out.exists():
            out.rmdir()  # empty, checked above
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    progress(f"exported {version.ref} to {out}")
    return out


def _write_merged(version: ExportSource, stage: Path, dtype: str | None,
                  progress: Callable[[str], None]) -> None:
    from peft import PeftModel

    base_name, base_dir = version.base_name, version.base_dir
    recipe = recorded_recipe(version.manifest)
    quantized = recipe is not None and recipe.quantized
    progress(f"[1/4] loading base {base_name}" + (f" as trained ({recipe.describe()})" if quantized else ""))
    if quantized:
        model = load_base(base_dir, recipe, torch.device("cpu"))
        progress("[2/4] dequantizing the base")
        model = model.dequantize()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        progress("[2/4] base is unquantized: nothing to dequantize")
    model.config.use_cache = True
    target = DTYPES[dtype] if dtype else _stored_dtype(base_dir)
    progress(f"[3/4] merging {version.ref} into the base")
    merged = PeftModel.from_pretrained(model.float(), version.path).merge_and_unload()
    merged = merged.to(target)
    progress(f"[4/4] saving {str(target).removeprefix('torch.')} weights")
    merged.save_pretrained(stage)
    load_tokenizer(base_dir).save_pretrained(stage)
    (stage / "README.md").write_text(_merged_card(version, base_name, str(target).removeprefix("torch."),
                                                  recipe.describe() if quantized else None), encoding="utf-8")


def _stored_dtype(base_dir: Path) -> torch.dtype:
    """The dtype the base is stored in (its config's `dtype`), float32 when it names none."""
    config = json.loads((base_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def _merged_card(version: ExportSource, base_name: str, dtype: str, dequantized_from: str | None) -> str:
    front = {"base_model": base_name, "tags": ["loradock", "lora-merged"], "library_name": "transformers"}
    origin = (f"The base was quantized ({dequantized_from}) when the adapter was trained, so it was "
              "dequantized first: the merged weights are the dequantized base plus the LoRA delta, not "
              f"the original {base_name} weights plus the delta."
              if dequantized_from else f"The base was not quantized: these are {base_name}'s weights plus "
              "the LoRA delta.")
    return "\n".join([
        "---", yaml.safe_dump(front, sort_keys=True).strip(), "---", "",
        f"# {version.ref} merged into {base_name}", "",
        f"A full model: the LoRA adapter `{version.ref}` (digest `{version.digest}`) merged into "
        f"`{base_name}` with PEFT's `merge_and_unload`, saved as {dtype}.", "",
        origin, "",
        "Load with `AutoModelForCausalLM.from_pretrained(this_directory)`.", "",
    ])
