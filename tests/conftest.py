"""Shared fixtures: a registry root per session holding a tiny random Llama and the real SmolLM2.

`home` gives each test a fresh registry root whose `bases/` points at the session's
bases, so tests publish adapters in isolation without converting a base again.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loradock.registry import BaseInfo, Registry

from loradock.bases import import_base, packaged_gguf_path

TINY_BASE = "tiny-llama"

# Without a GPU, Triton kernels are tested under Triton's CPU interpreter. The variable must be
# set before anything imports triton (bitsandbytes does, on import), so it is set here.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loradock-home")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer (with chat template), read from the packaged GGUF, or from
    $LORADOCK_TOKENIZER_DIR where that package is not installed (a GPU machine: gpu_wheels.py)."""
    from transformers import AutoTokenizer

    if os.environ.get("LORADOCK_TOKENIZER_DIR"):
        return Path(os.environ["LORADOCK_TOKENIZER_DIR"])

    gguf = packaged_gguf_path()
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def build_tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with hidden size 64 and SmolLM2's tokenizer, saved as safetensors."""
    return build_tiny_model(out, tokenizer_dir, "llama", seed)


def build_tiny_model(out: Path, tokenizer_dir: Path, model_type: str, seed: int = 0, **config) -> Path:
    """A random 2-layer model of transformers' `model_type` (hidden size 64, SmolLM2's tokenizer,
    `config` overriding the rest), saved as safetensors."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    shape = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
             "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**shape, **config}))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_base(session_home: Path, tokenizer_dir: Path, tmp_path_factory) -> BaseInfo:
    src = build_tiny_llama(tmp_path_factory.mktemp("tiny-src"), tokenizer_dir)
    info, _ = import_base(Registry(session_home), src, name=TINY_BASE)
    return info


@pytest.fixture(scope="session")
def smollm2_base(session_home: Path) -> BaseInfo:
    """The real SmolLM2-135M-Instruct, converted once per test session (~30 s)."""
    info, _ = import_base(Registry(session_home))
    return info


@pytest.fixture
def home(tmp_path: Path, session_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh registry root (also exported as LORADOCK_HOME) sharing the session's bases."""
    root = tmp_path / "home"
    root.mkdir()
    (session_home / "bases").mkdir(exist_ok=True)
    os.symlink(session_home / "bases", root / "bases")
    monkeypatch.setenv("LORADOCK_HOME", str(root))
    return root


@pytest.fixture
def registry(home: Path) -> Registry:
    return Registry(home)
