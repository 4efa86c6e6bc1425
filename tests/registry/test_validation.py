"""Bad input gets an error that names the problem, and nothing is published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loradock.registry import (
    IncompatibleBaseError,
    InvalidAdapterError,
    InvalidNameError,
    NotFoundError,
    Registry,
)
from loradock.registry.bases import fingerprint

from tests.adapters import make_lora_adapter
from tests.conftest import TINY_BASE


def assert_nothing_published(registry: Registry) -> None:
    assert registry.list() == []
    assert registry.generation() == 0
    staging = registry.root / "adapters" / ".staging"
    assert not staging.exists() or not list(staging.iterdir())


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def rewrite_tensors(adapter: Path, rename) -> None:
    """Rewrite adapter_model.safetensors with tensor names mapped by `rename` (None drops one)."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({rename(k): v for k, v in tensors.items() if rename(k) is not None}, path)


def publish_fails(registry: Registry, src, error=InvalidAdapterError, **kwargs) -> str:
    with pytest.raises(error) as info:
        registry.publish(src, "medical", **kwargs)
    assert_nothing_published(registry)
    return str(info.value)


def test_missing_path_and_plain_file(registry, tmp_path):
    assert "no such file or directory" in publish_fails(registry, tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    assert "not a directory" in publish_fails(registry, tmp_path / "file.txt")


def test_missing_config(registry, editable_lora):
    (editable_lora / "adapter_config.json").unlink()
    assert "missing adapter_config.json" in publish_fails(registry, editable_lora)


def test_config_not_json(registry, editable_lora):
    (editable_lora / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json is not valid JSON" in publish_fails(registry, editable_lora)


def test_not_a_lora(registry, editable_lora):
    edit_config(editable_lora, peft_type="IA3")
    msg = publish_fails(registry, editable_lora)
    assert msg.startswith(f"{editable_lora} is not a usable LoRA adapter:")  # the user's path, not staging
    assert "peft_type is 'IA3'; only LoRA" in msg


def test_all_config_problems_in_one_message(registry, editable_lora):
    edit_config(editable_lora, peft_type="PREFIX_TUNING", r=0, use_dora=True, lora_bias=True,
                rank_pattern={"q_(proj": 4})
    msg = publish_fails(registry, editable_lora)
    assert "'q_(proj' is not a valid regular expression" in msg
    assert "peft_type is 'PREFIX_TUNING'" in msg
    assert "r (rank) must be a positive integer, got 0" in msg
    assert "use_dora and lora_bias cannot both be true" in msg


@pytest.mark.parametrize("variant", ["use_dora", "lora_bias"])
def test_dora_and_lora_bias_adapters_publish_as_servable(registry, tiny_base, tmp_path, variant):
    src = make_lora_adapter(tiny_base.path, tmp_path / variant, rank=4, alpha=8, **{variant: True})
    manifest = registry.publish(src, "medical").manifest
    assert manifest[variant] is True and manifest["servable"] is True
    assert manifest["not_servable_because"] == []


def test_dora_and_bias_tensors_must_agree_with_the_config(registry, tiny_base, tmp_path):
    src = make_lora_adapter(tiny_base.path, tmp_path / "dora", rank=4, alpha=8, use_dora=True)
    edit_config(src, use_dora=False)
    msg = publish_fails(registry, src)
    assert "self_attn.q_proj: has lora_magnitude_vector but use_dora is not true" in msg
    edit_config(src, use_dora=True)
    rewrite_tensors(src, lambda k: None if k.endswith("layers.0.self_attn.v_proj.lora_magnitude_vector") else k)
    assert "layers.0.self_attn.v_proj: use_dora is true but it has no lora_magnitude_vector" in publish_fails(
        registry, src)


def test_well_formed_but_unservable_is_stored_with_the_reasons(registry, editable_lora):
    """A valid PEFT adapter the runtime does not serve is kept (it can be exported or served
    elsewhere) and its manifest says why the runtime will not serve it."""
    edit_config(editable_lora, fan_in_fan_out=True, bias="all", alora_invocation_tokens=[7, 8])
    manifest = registry.publish(editable_lora, "medical").manifest
    assert manifest["servable"] is False
    reasons = " | ".join(manifest["not_servable_because"])
    assert "fan_in_fan_out=true" in reasons and "bias='all'" in reasons and "activated LoRA" in reasons


def test_pickle_weights_refused_with_conversion_hint(registry, editable_lora):
    (editable_lora / "adapter_model.safetensors").rename(editable_lora / "adapter_model.bin")
    msg = publish_fails(registry, editable_lora)
    assert "pickle weights (adapter_model.bin) are refused" in msg
    assert "PeftModel.from_pretrained" in msg and "save_pretrained(OUT, safe_serialization=True)" in msg


def test_safetensors_that_does_not_parse(registry, editable_lora):
    (editable_lora / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken json!!!}")
    msg = publish_fails(registry, editable_lora)
    assert "adapter_model.safetensors is not a valid safetensors file" in msg
    assert "not valid JSON" in msg


def test_truncated_safetensors(registry, editable_lora):
    path = editable_lora / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert "lies outside the file (truncated?)" in publish_fails(registry, editable_lora)


def test_rank_in_tensors_must_match_config(registry, editable_lora):
    edit_config(editable_lora, r=4)
    msg = publish_fails(registry, editable_lora)
    assert "model.layers.0.self_attn.q_proj: rank in tensors (lora_A [8, 64], lora_B [64, 8])" in msg
    assert "r=4" in msg


def test_target_module_without_weights(registry, editable_lora):
    edit_config(editable_lora, target_modules=["q_proj", "v_proj", "k_proj"])
    assert "target module 'k_proj' has no LoRA weights" in publish_fails(registry, editable_lora)


def test_weights_for_a_module_not_targeted(registry, editable_lora):
    edit_config(editable_lora, target_modules=["q_proj"])
    msg = publish_fails(registry, editable_lora)
    assert "model.layers.0.self_attn.v_proj: has LoRA weights but is not in target_modules" in msg


def test_half_a_lora_pair_and_foreign_tensors(registry, editable_lora):
    rewrite_tensors(
        editable_lora,
        lambda k: None if k.endswith("layers.1.self_attn.q_proj.lora_B.weight") else k.replace(
            "layers.0.self_attn.v_proj.lora_A", "layers.0.self_attn.v_proj.magnitude"
        ),
    )
    msg = publish_fails(registry, editable_lora)
    assert "model.layers.1.self_attn.q_proj: has no lora_B weight" in msg
    assert "unexpected tensor 'base_model.model.model.layers.0.self_attn.v_proj.magnitude.weight'" in msg


def test_rank_pattern_is_honoured(registry, tiny_base, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    src = tmp_path / "patterned"

    model = AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    )
    peft_model.save_pretrained(src)
    v = registry.publish(src, "patterned")
    assert v.manifest["rank"] == 8
    registry.delete("patterned@1")
    edit_config(src, rank_pattern={"v_proj": 3})
    with pytest.raises(InvalidAdapterError) as info:
        registry.publish(src, "patterned")
    msg = str(info.value)
    assert "self_attn.v_proj: rank in tensors (lora_A [2, 64], lora_B [32, 2])" in msg and "r=3" in msg


def test_adapter_for_another_base_is_refused(registry, tmp_path, tiny_base):
    """An adapter built on a hidden-32 model does not fit the hidden-64 tiny base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2,
    ))
    other.save_pretrained(tmp_path / "other")
    src = make_lora_adapter(tmp_path / "other", tmp_path / "a", base_model_name_or_path="someone/other-model")
    msg = publish_fails(registry, src, IncompatibleBaseError, base=TINY_BASE)
    assert f"does not fit base {TINY_BASE!r}" in msg
    assert "model.layers.0.self_attn.q_proj: adapter maps 32 -> 32 features but the base weight is [64, 64]" in msg
    assert "model.layers.2.self_attn.q_proj: no such layer in the base model" in msg
    # with no base given, the config's unknown base name is recorded without a fingerprint
    v = registry.publish(src, "other")
    assert v.manifest["base"] == {"name": "someone/other-model", "fingerprint": None}
    # a local model directory outside the registry is fingerprinted (and checked)
    local = make_lora_adapter(tmp_path / "other", tmp_path / "b")
    v = registry.publish(local, "other")
    assert v.manifest["base"] == {"name": str(tmp_path / "other"), "fingerprint": fingerprint(tmp_path / "other")}
    # the config claims the tiny base but the shapes say otherwise
    edit_config(local, base_model_name_or_path=TINY_BASE)
    with pytest.raises(IncompatibleBaseError, match="adapter maps 32 -> 32 features"):
        registry.publish(local, "other")


def test_unknown_explicit_base(registry, lora_dir):
    msg = publish_fails(registry, lora_dir, NotFoundError, base="no-such-base")
    assert "unknown base 'no-such-base'; known bases:" in msg and TINY_BASE in msg


@pytest.mark.parametrize("name", ["", "../evil", "a/b/c", "/abs", "x y", "a/..", ".hidden"])
def test_invalid_names(registry, lora_dir, name):
    with pytest.raises(InvalidNameError, match="name"):
        registry.publish(lora_dir, name)
    assert_nothing_published(registry)


@pytest.mark.parametrize("alias", ["3", "latest", "bad alias", "../x"])
def test_invalid_aliases(registry, lora_dir, alias):
    with pytest.raises(InvalidNameError):
        registry.publish(lora_dir, "medical", aliases=[alias])
    assert_nothing_published(registry)


def test_metadata_keys_and_types_are_checked(registry, lora_dir):
    msg = publish_fails(
        registry, lora_dir,
        metadata={"sauce": 1, "source": {"kind": "hub", "repo": "a/b"}, "dataset": {"rows": 3}, "parent": "medical"},
    )
    assert "unknown metadata keys ['sauce']" in msg
    assert "source of kind 'hub' needs ['revision', 'commit']" in msg
    assert "dataset must record its 'digest'" in msg
    assert "parent must be a version reference like 'name@3', got 'medical'" in msg


def test_metadata_is_recorded(registry, lora_dir):
    meta = {
        "source": {"kind": "trained"},
        "training": {"epochs": 2, "lr": 1e-4},
        "dataset": {"digest": "ab" * 32, "rows": 120},
        "metrics": {"eval_loss": 0.5},
        "parent": "medical@1",
    }
    v = registry.publish(lora_dir, "medical", metadata=meta)
    assert {k: v.manifest[k] for k in meta} == meta


def test_regex_target_modules(registry, editable_lora):
    """A string target_modules is a regex over full module names, as in PEFT."""
    edit_config(editable_lora, target_modules=r".*\.q_proj")
    msg = publish_fails(registry, editable_lora)
    assert "self_attn.v_proj: has LoRA weights but is not in target_modules" in msg
    edit_config(editable_lora, target_modules=r".*\.(q_proj|v_proj)")
    v = registry.publish(editable_lora, "regex")
    assert v.manifest["target_modules"] == ["q_proj", "v_proj"]


def test_an_adapter_naming_layers_the_base_lacks_is_refused_with_the_bases_own_names(registry, tmp_path, tiny_base,
                                                                                      tokenizer_dir):
    """A Phi-3 adapter (fused qkv_proj, gate_up_proj) published for a Llama base."""
    from tests.conftest import build_tiny_model

    phi3 = build_tiny_model(tmp_path / "phi3", tokenizer_dir, "phi3")
    src = make_lora_adapter(phi3, tmp_path / "a", targets=("qkv_proj", "gate_up_proj"))
    msg = publish_fails(registry, src, IncompatibleBaseError, base=TINY_BASE)
    assert "model.layers.0.self_attn.qkv_proj: no such layer in the base model" in msg
    assert msg.endswith("the base's layers that take LoRA are named down_proj, gate_proj, k_proj, o_proj, q_proj, "
                        "up_proj, v_proj")
