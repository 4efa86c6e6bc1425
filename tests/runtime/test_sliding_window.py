"""Sliding-window attention, per layer as the config says, equal to transformers + PEFT on prompts
longer than the window: Mistral (every layer windowed) and Qwen2 (`use_sliding_window` with
`max_window_layers`: the first layer full, the second windowed), in one mixed batch, in chunked
prefill, decode, prefix-cache hits and preemption."""

from __future__ import annotations

import pytest
import torch
from loradock.registry import Registry
from loradock.runtime import GenerationRequest, SamplingParams

from loradock.bases import import_base
from tests.conftest import build_tiny_model
from tests.runtime.conftest import (
    ATTN,
    ATTN_MLP,
    Spec,
    drive,
    load_peft_oracle,
    make_adapters,
    oracle_greedy,
)
from tests.runtime.test_oracle import ATOL, check_against_peft

WINDOW = 4
WINDOWED = {
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
}
SPECS = (Spec("wa", 8, ATTN, 1), Spec("wb", 4, ATTN_MLP, 2))
# 8-14 tokens each: longer than the window
PROMPTS = ("The capital of France is a city of", "def fibonacci(n): return n if n < 2 else",
           "Once upon a time, in a land far away, there lived", "Quarterly revenue grew by eleven percent in")


@pytest.fixture(scope="module", params=sorted(WINDOWED))
def windowed(request, session_home, tokenizer_dir, tmp_path_factory):
    """(base, its adapter dirs) for one windowed family."""
    family = request.param
    src = build_tiny_model(tmp_path_factory.mktemp(f"{family}-src"), tokenizer_dir, family, **WINDOWED[family])
    base, _ = import_base(Registry(session_home), src, name=f"tiny-{family}-window")
    return base, make_adapters(base, tmp_path_factory.mktemp(f"{family}-adapters"), SPECS)


@pytest.fixture
def windowed_registry(registry, windowed):
    base, dirs = windowed
    for name, path in dirs.items():
        registry.publish(path, name, base=base.name)
    return registry


def test_the_window_changes_the_answer(windowed):
    """The prompts reach past the window: transformers with the window switched off answers
    otherwise, so the comparisons below can fail."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base, _ = windowed
    ids = torch.tensor([[5, 17, 300, 42, 9, 77, 1200, 3, 64, 811]])
    windowed_model = AutoModelForCausalLM.from_pretrained(base.path, attn_implementation="sdpa").eval()
    config = AutoConfig.from_pretrained(base.path)
    config.sliding_window = None
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    full = AutoModelForCausalLM.from_pretrained(base.path, config=config, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        diff = (windowed_model(ids).logits - full(ids).logits)[0, WINDOW:].abs().max()
    assert diff > 1e-3


def test_mixed_batch_matches_peft_past_the_window(windowed, windowed_registry, engine_factory):
    base, dirs = windowed
    engine = engine_factory(windowed_registry, base.name, run_loop=False)
    assert engine.runner.windows == (WINDOW,)
    oracle = load_peft_oracle(base.path, dirs, "none")
    names = ["wa", "wb", None, "wa"]
    check_against_peft(engine, oracle, names, PROMPTS, ATOL["none"], new_tokens=6, fp32=True, decode_steps=4)


def test_chunked_prefill_prefix_hits_and_preemption_keep_the_window(windowed, windowed_registry, engine_factory):
    """Prompts split into 3-token chunks (the window spans chunks), a second round hitting the
    prefix cache, and a KV pool small enough that sequences are preempted and recomputed: every
    request still gets PEFT's greedy tokens."""
    base, dirs = windowed
    engine = engine_factory(windowed_registry, base.name, run_loop=False, max_batch_tokens=8, max_running=4,
                            kv_block_size=4, kv_cache_tokens=64, max_model_len=48, max_prompt_tokens=32)
    oracle = load_peft_oracle(base.path, dirs, "none")
    names = ["wa", "wb", None, "wb"]
    for _ in range(2):  # the second round reuses the first's cached prompt blocks
        handles = [engine.submit(GenerationRequest(adapter=n, prompt=p, sampling=SamplingParams(
            max_new_tokens=12, ignore_eos=True))) for n, p in zip(names, PROMPTS, strict=True)]
        drive(engine, handles)
        for name, prompt, h in zip(names, PROMPTS, handles, strict=True):
            ids = engine.tokenizer.encode(prompt)
            assert list(h.result().token_ids) == oracle_greedy(oracle, name, ids, 12), name
    assert engine.preemptions > 0, "the pool should have been too small for all four at once"
    assert engine.stats()["kv_cached_blocks"] > 0


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_static_decode_steps_keep_the_window(windowed, windowed_registry, engine_factory, attention):
    """The static forward CUDA graphs capture (run eagerly here) rebuilds each window's mask from
    its persistent inputs before every step (sdpa), or hands the kernel the rows' block tables,
    one context size for every step (triton, under Triton's CPU interpreter here)."""
    from loradock.runtime.cuda_graphs import StepGraphs

    if attention == "triton":
        pytest.importorskip("triton")
    base, dirs = windowed
    engine = engine_factory(windowed_registry, base.name, run_loop=False, attention=attention)
    graphs = StepGraphs(engine.runner.model, engine.kv, engine.device, max_batch=8,
                          max_context=engine.max_model_len, capture=False, windows=engine.runner.windows,
                          paged=engine.runner.paged)
    assert graphs.context_buckets == ([engine.max_model_len] if attention == "triton" else [64, 128, 256, 512])
    engine.runner.graphs = graphs
    oracle = load_peft_oracle(base.path, dirs, "none")
    check_against_peft(engine, oracle, ["wa", "wb", None], PROMPTS[:3], ATOL["none"], new_tokens=6, fp32=True,
                       decode_steps=4)
    assert graphs.static_steps >= 4, "decode steps must take the static path"
