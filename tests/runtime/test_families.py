"""Every served model family, as a tiny random model built with transformers: two PEFT adapters
(attention only; every linear layer, fused projections included) and the base in one mixed
batch, equal to PeftModel in logits (fp32) and greedy tokens. Families with sliding windows get
a window shorter than the prompts."""

from __future__ import annotations

import pytest
from loradock.registry import Registry

from loradock.bases import import_base
from tests.adapters import make_lora_adapter
from tests.conftest import build_tiny_model
from tests.runtime.conftest import load_peft_oracle, one_thread
from tests.runtime.test_oracle import ATOL, NF4_ATOL, PROMPTS, check_against_peft

# family -> (config overrides, its attention projections)
FAMILIES = {
    "gemma2": ({"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 5.0,
                "final_logit_softcapping": 3.0}, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "gemma3_text": ({"head_dim": 16, "sliding_window": 4, "sliding_window_pattern": 2, "query_pre_attn_scalar": 24},
                    ("q_proj", "k_proj", "v_proj", "o_proj")),
    "phi3": ({}, ("qkv_proj", "o_proj")),
    "olmo2": ({}, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "granite": ({"attention_multiplier": 0.2, "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                 "logits_scaling": 4.0}, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "smollm3": ({"no_rope_layer_interval": 2}, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "starcoder2": ({"sliding_window": 4}, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "cohere": ({}, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "gpt_neox": ({"num_key_value_heads": None}, ("query_key_value", "dense")),  # multi-head: no such key
    "falcon": ({"new_decoder_architecture": True, "num_kv_heads": 2}, ("query_key_value", "dense")),
    "phi": ({}, ("q_proj", "k_proj", "v_proj", "dense")),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4},
                ("q_proj", "k_proj", "v_proj", "o_proj")),
    "qwen3_moe": ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
                  ("q_proj", "k_proj", "v_proj", "o_proj")),
    "olmoe": ({"num_experts": 4, "num_experts_per_tok": 2}, ("q_proj", "k_proj", "v_proj", "o_proj")),
}

MOE = ("mixtral", "qwen3_moe", "olmoe")


def build_family(name: str, home, tokenizer_dir, out) -> tuple:
    """The tiny `name` base stored in `home`'s registry, and its two adapters: (base, {adapter: dir})."""
    overrides, attention = FAMILIES[name]
    src = build_tiny_model(out / "src", tokenizer_dir, name, **overrides)
    base, _ = import_base(Registry(home), src, name=f"tiny-{name}")
    # PEFT's all-linear on an MoE base also targets the experts' parameters (not served, below)
    every_linear = ("q_proj", "o_proj") if name in MOE else "all-linear"
    with one_thread():
        dirs = {"attn": make_lora_adapter(base.path, out / "attn", rank=8, alpha=16, targets=attention, seed=1,
                                          scale=0.3),
                "all": make_lora_adapter(base.path, out / "all", rank=4, alpha=8, targets=every_linear, seed=2,
                                         scale=0.3)}
    return base, dirs


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, session_home, tokenizer_dir, tmp_path_factory):
    return build_family(request.param, session_home, tokenizer_dir, tmp_path_factory.mktemp(request.param))


def test_mixed_batch_matches_peft(family, registry, engine_factory):
    base, dirs = family
    for name, path in dirs.items():
        registry.publish(path, name, base=base.name)
    engine = engine_factory(registry, base.name, run_loop=False)
    oracle = load_peft_oracle(base.path, dirs, "none")
    names = ["attn", "all", None, "attn", "all"]
    check_against_peft(engine, oracle, names, PROMPTS[:5], ATOL["none"], new_tokens=5, fp32=True)


@pytest.mark.parametrize("family_name", ["gemma2", "gemma3_text"])
def test_the_paged_kernel_serves_each_attention_shape_like_peft(family_name, session_home, tokenizer_dir,
                                                                tmp_path, registry, engine_factory):
    """`attention="triton"` (under Triton's CPU interpreter here) on the families whose attention
    differs: soft-capping with a window and a query scalar (Gemma 2), windows on some layers
    (Gemma 3); windows on every layer are in test_sliding_window.py, multi-head and grouped keys
    in test_triton_attention.py. The same mixed batch, prefill and decode steps, equal to PEFT."""
    pytest.importorskip("triton")
    base, dirs = build_family(family_name, session_home, tokenizer_dir, tmp_path)
    for name, path in dirs.items():
        registry.publish(path, name, base=base.name)
    engine = engine_factory(registry, base.name, run_loop=False, attention="triton")
    assert engine.info().attention == "triton" and engine.runner.paged
    oracle = load_peft_oracle(base.path, dirs, "none")
    check_against_peft(engine, oracle, ["attn", "all", None, "attn"], PROMPTS[:4], ATOL["none"], new_tokens=5,
                       fp32=True)


@pytest.mark.parametrize("family_name", ["phi3", "gemma2"])
def test_a_new_family_in_nf4(family_name, session_home, tokenizer_dir, tmp_path, registry, engine_factory,
                             cpu_4bit_compute):
    """NF4 on a fused and a soft-capped, windowed family, both 4-bit kernels: PEFT's logits within
    1e-5 (float32 compute) or within the bf16 kernel's own noise."""
    base, dirs = build_family(family_name, session_home, tokenizer_dir, tmp_path)
    for name, path in dirs.items():
        registry.publish(path, name, base=base.name)
    engine = engine_factory(registry, base.name, run_loop=False, quantize="nf4", compute_dtype=cpu_4bit_compute)
    oracle = load_peft_oracle(base.path, dirs, "nf4", compute=cpu_4bit_compute)
    names = ["attn", "all", None, "attn"]
    check_against_peft(engine, oracle, names, PROMPTS[:4], NF4_ATOL[cpu_4bit_compute], new_tokens=5)


def test_moe_expert_lora_is_published_as_not_servable_and_refused_with_its_reason(
        session_home, tokenizer_dir, tmp_path, registry, engine_factory):
    """PEFT puts LoRA on an MoE base's experts with target_parameters (all-linear does): the
    version is kept, its manifest says why it is not servable, and a request for it fails with
    that reason while the base and other adapters go on being served."""
    from loradock.runtime import GenerationRequest, SamplingParams
    from loradock.runtime.errors import AdapterUnavailableError

    src = build_tiny_model(tmp_path / "src", tokenizer_dir, "mixtral", **FAMILIES["mixtral"][0])
    base, _ = import_base(Registry(session_home), src, name="tiny-mixtral")
    with one_thread():
        experts = make_lora_adapter(base.path, tmp_path / "experts", rank=4, alpha=8, targets="all-linear", seed=3)
    version = registry.publish(experts, "experts", base=base.name)
    why = version.manifest["not_servable_because"]
    assert any("MoE expert LoRA" in w and "is not served" in w for w in why), why
    engine = engine_factory(registry, base.name, run_loop=False)
    with pytest.raises(AdapterUnavailableError, match="MoE expert LoRA"):
        engine.generate(GenerationRequest(adapter="experts", prompt="hi", sampling=SamplingParams(max_new_tokens=1)))
    assert engine.generate(GenerationRequest(adapter=None, prompt="hi", sampling=SamplingParams(max_new_tokens=1)))
