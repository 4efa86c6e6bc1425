"""Reading adapter versions: PEFT's config semantics (rank/alpha patterns, rsLoRA, lora_bias, DoRA)
and clear refusals."""

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
    targets = sorted({m.rsplit(".", 1)[-1] for m in ranks}) or ["q_proj"]
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "lora_alpha": 8, "target_modules": targets, **config}))
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


Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(("config", "ranks", "extra", "message"), [
    ({"r": 4, "use_dora": True}, {Q0: 4}, None, "use_dora is true but it has no lora_magnitude_vector"),
    ({"r": 4}, {Q0: 4}, {f"{PREFIX}{Q0}.lora_B.bias": torch.zeros(8)}, "lora_bias is not true"),
    ({"r": 4, "use_dora": True}, {Q0: 4}, {f"{PREFIX}{Q0}.lora_magnitude_vector": torch.ones(4)},
     r"lora_magnitude_vector has shape \[4\], expected \[8\]"),
    ({"r": 4, "use_dora": True, "lora_bias": True}, {Q0: 4}, None, "cannot both be true"),
    ({"r": 4, "bias": "all"}, {Q0: 4}, None, "trained base-layer biases"),
    ({"r": 4, "modules_to_save": ["lm_head"]}, {Q0: 4}, None, "modules_to_save"),
    ({"r": 4, "alora_invocation_tokens": [5, 6]}, {Q0: 4}, None, "activated LoRA"),
    ({"r": 4}, {"model.layers.0.mlp.gate_proj": 4}, None, "no such targetable linear"),
    ({"r": 16}, {Q0: 16}, None, "exceeds the engine's max_rank 8"),
    ({"r": 2}, {Q0: 4}, None, "does not match rank r=2"),
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


def test_lora_bias_is_scaled_like_peft(tmp_path):
    """PEFT adds lora_B(lora_A(x)) * scaling, so lora_B's bias is scaled too."""
    bias = torch.randn(8)
    path = write_adapter(tmp_path / "b", {"r": 4, "lora_bias": True}, {Q0: 4},
                         {f"{PREFIX}{Q0}.lora_B.bias": bias})
    m = read_adapter(KEY, path, {}, SERVED).modules[Q0]
    torch.testing.assert_close(m.bias, 2.0 * bias)
    assert m.dora_scale is None


def test_dora_scale_is_magnitude_over_row_norm_of_merged_weight(tmp_path):
    """dora_scale[o] = magnitude[o] / ||W[o] + scaling * (B @ A)[o]|| - 1, against the base weight
    the engine serves; an engine that cannot show its base weights refuses DoRA."""
    g = torch.Generator().manual_seed(0)
    base = {Q0: torch.randn(8, 8, generator=g)}
    served = ServedModel(SERVED.fingerprint, SERVED.linear_shapes, SERVED.max_rank, base_weight=base.__getitem__)
    magnitude = torch.rand(8, generator=g) + 0.5
    path = write_adapter(tmp_path / "d", {"r": 4, "use_dora": True}, {Q0: 4},
                         {f"{PREFIX}{Q0}.lora_magnitude_vector": magnitude})
    saved = load_file(path / "adapter_model.safetensors")
    a, b = saved[f"{PREFIX}{Q0}.lora_A.weight"], saved[f"{PREFIX}{Q0}.lora_B.weight"]
    m = read_adapter(KEY, path, {}, served).modules[Q0]
    merged = base[Q0] + 2.0 * (b @ a)
    want = torch.stack([magnitude[o] / merged[o].pow(2).sum().sqrt() - 1 for o in range(8)])
    torch.testing.assert_close(m.dora_scale, want)
    assert m.bias is None and m.nbytes == (4 * 8 * 2 + 8) * 4
    with pytest.raises(AdapterUnavailableError, match="DoRA needs the served base weights"):
        read_adapter(KEY, path, {}, SERVED)
