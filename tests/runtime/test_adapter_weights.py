"""Reading adapter versions: PEFT's config semantics (rank/alpha patterns, rsLoRA) and clear refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from loradock.runtime import AdapterUnavailableError, ResolvedAdapter
from loradock.runtime.adapter_weights import ServedModel, read_adapter
from safetensors.torch import load_file, save_file

SERVED = ServedModel(
    fingerprint="f" * 64,
    linear_shapes={f"model.layers.{i}.self_attn.{m}": (8, 8) for i in range(2) for m in ("q_proj", "v_proj")},
    max_rank=8,
)
KEY = ResolvedAdapter("demo", 1, "d" * 64)
PREFIX = "base_model.model."


def write_adapter(path: Path, config: dict, ranks: dict[str, int], extra: dict | None = None) -> Path:
    path.mkdir()
    tensors = {}
    for module, r in ranks.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(r, 8)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(8, r)
    tensors.update(extra or {})
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return path


def test_rank_and_alpha_patterns_and_rslora(tmp_path):
    q0, v0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"layers.1.self_attn.q_proj": 2},
              "alpha_pattern": {"v_proj": 2}}
    path = write_adapter(tmp_path / "a", config, {q0: 4, v0: 4, q1: 2})
    loaded = read_adapter(KEY, path, {}, SERVED)
    assert loaded.modules[q0].scaling == 8 / 4
    assert loaded.modules[v0].scaling == 2 / 4  # alpha_pattern matches the module name suffix
    assert loaded.modules[q1].rank == 2 and loaded.modules[q1].scaling == 8 / 2
    saved = load_file(path / "adapter_model.safetensors")  # scaling folded into A
    torch.testing.assert_close(loaded.modules[v0].shrink, 2 / 4 * saved[f"{PREFIX}{v0}.lora_A.weight"])
    torch.testing.assert_close(loaded.modules[v0].expand, saved[f"{PREFIX}{v0}.lora_B.weight"].T)
    rs = read_adapter(KEY, write_adapter(tmp_path / "rs", {**config, "use_rslora": True}, {q0: 4}), {}, SERVED)
    assert rs.modules[q0].scaling == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize(("config", "ranks", "extra", "message"), [
    ({"r": 4, "use_dora": True}, {"model.layers.0.self_attn.q_proj": 4}, None, "DoRA"),
    ({"r": 4, "bias": "all"}, {"model.layers.0.self_attn.q_proj": 4}, None, "biases"),
    ({"r": 4, "modules_to_save": ["lm_head"]}, {"model.layers.0.self_attn.q_proj": 4}, None, "modules_to_save"),
    ({"r": 4}, {"model.layers.0.mlp.gate_proj": 4}, None, "no such targetable linear"),
    ({"r": 16}, {"model.layers.0.self_attn.q_proj": 16}, None, "exceeds the engine's max_rank 8"),
    ({"r": 2}, {"model.layers.0.self_attn.q_proj": 4}, None, "rank 4 in the weights but 2"),
    ({"r": 4}, {}, {f"{PREFIX}model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}, "unexpected tensor"),
])
def test_refusals_name_the_problem(tmp_path, config, ranks, extra, message):
    path = write_adapter(tmp_path / "bad", config, ranks, extra)
    with pytest.raises(AdapterUnavailableError, match=message):
        read_adapter(KEY, path, {}, SERVED)


def test_wrong_base_fingerprint_and_corrupt_weights(tmp_path):
    path = write_adapter(tmp_path / "a", {"r": 4}, {"model.layers.0.self_attn.q_proj": 4})
    manifest = {"base": {"name": "other-base", "fingerprint": "e" * 64}}
    with pytest.raises(AdapterUnavailableError, match="trained for base 'other-base'"):
        read_adapter(KEY, path, manifest, SERVED)
    (path / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterUnavailableError, match=r"cannot read adapter_model\.safetensors"):
        read_adapter(KEY, path, {}, SERVED)
