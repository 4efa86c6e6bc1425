"""A Llama-shaped base of about 1.1B parameters with random weights, made locally, so the
benchmark shows how costs grow with model size (speed does not depend on the weights' values).
Shaped like TinyLlama-1.1B (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632) with the
default base's tokenizer and vocabulary."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from loradock.registry import BaseInfo, Registry

from loradock.bases import import_base

log = logging.getLogger(__name__)

SYNTHETIC_1B = "synthetic-1b"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def make_synthetic_base(registry: Registry, tokenizer_base: BaseInfo, name: str = SYNTHETIC_1B,
                        seed: int = 0) -> BaseInfo:
    """Write the random model as bf16 safetensors and import it into `registry` as `name`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = AutoConfig.from_pretrained(tokenizer_base.path).vocab_size
    config = AutoConfig.for_model(
        "llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=True,
        rms_norm_eps=1e-5, rope_theta=10000.0)
    log.info("making %s: random weights, %d layers, hidden %d (about a minute)", name,
             config.num_hidden_layers, config.hidden_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory(dir=registry.root, prefix=".synthetic-") as tmp:
        out = Path(tmp) / name
        model.save_pretrained(out)
        del model
        for file in TOKENIZER_FILES:
            if (tokenizer_base.path / file).exists():
                shutil.copy2(tokenizer_base.path / file, out / file)
        info, _ = import_base(registry, out, name=name)
    return info
