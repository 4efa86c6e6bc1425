"""PEFT is the oracle: a mixed batch of many adapters in ONE forward pass gives each request
the logits and greedy tokens of its adapter run alone through PeftModel on the same base."""

from __future__ import annotations

import itertools

import pytest
import torch
from loradock.runtime import GenerationRequest, SamplingParams
from loradock.runtime.model_runner import StepItem

from tests.runtime.conftest import (
    SPECS,
    load_peft_oracle,
    oracle_generate,
    oracle_greedy,
    oracle_logits,
)

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived",
    "Patient presents with",
    "Roses are red,",
    "2 + 2 =",
    "The mitochondria is",
    "Quarterly revenue grew by",
    "Hello",
    "Translate to German: good morning",
)
# Max |engine - PEFT| on logits. fp32: only summation order differs (scaling folded into B,
# per-sequence attention). NF4: both sides run the same bitsandbytes kernels on the same weights.
ATOL = {"none": 1e-5, "nf4": 1e-5}
# SmolLM2 has 30 layers and logits of magnitude ~20, so rounding differences accumulate more.
SMOLLM2_NF4_ATOL = 2e-3


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def mixed_step_logits(engine, cases: list[tuple[str | None, list[int]]]):
    """Prefill every case in one forward, then decode one greedy token each in one forward.
    Returns (prefill logits, next tokens, decode logits), one row per case."""
    slots = []
    for ref, _ in cases:
        if ref is None:
            slots.append(0)
        else:
            slots.append(engine.cache.slot_of(engine.load_adapter(ref)))
    kvs = [engine.kv.try_allocate(len(ids) + 1) for _, ids in cases]
    prefill = engine.runner.forward(
        [StepItem(kv, ids, s, True) for kv, (_, ids), s in zip(kvs, cases, slots, strict=True)])
    prefill_rows = torch.stack([prefill.row(i) for i in range(len(cases))])
    nxt = prefill_rows.argmax(dim=-1).tolist()
    decode = engine.runner.forward([StepItem(kv, [t], s, True) for kv, t, s in zip(kvs, nxt, slots, strict=True)])
    for kv in kvs:
        engine.kv.free(kv)
    return prefill_rows, nxt, torch.stack([decode.row(i) for i in range(len(cases))])


def check_against_peft(engine, oracle, names: list[str | None], prompts, atol: float, new_tokens: int,
                       greedy_oracle=oracle_greedy, ignore_eos: bool = True):
    tok = engine.tokenizer
    cases = [(name, tok.encode(p)) for name, p in zip(names, prompts, strict=True)]
    forwards = count_forwards(engine.runner.model)
    prefill, nxt, decode = mixed_step_logits(engine, cases)
    assert forwards[0] == 2, "the mixed batch must be one forward for prefill and one for decode"

    diffs = []
    for i, (name, ids) in enumerate(cases):
        want = oracle_logits(oracle, name, [*ids, nxt[i]])
        diffs.append(max((prefill[i] - want[-2]).abs().max().item(), (decode[i] - want[-1]).abs().max().item()))
        torch.testing.assert_close(prefill[i], want[-2], atol=atol, rtol=0, msg=lambda m, name=name: f"prefill logits of {name}: {m}")
        torch.testing.assert_close(decode[i], want[-1], atol=atol, rtol=0, msg=lambda m, name=name: f"decode logits of {name}: {m}")

    print(f"max |engine - PEFT| logits: {max(diffs):.2e} (atol {atol:g})")
    # The test can fail: every adapter changes the logits, and differently from the others.
    distinct = list(dict.fromkeys(names))
    rows, _, _ = mixed_step_logits(engine, [(name, cases[0][1]) for name in distinct])
    for (a, ra), (b, rb) in itertools.combinations(zip(distinct, rows, strict=True), 2):
        assert (ra - rb).abs().max() > 100 * atol, f"{a} and {b} give the same logits"

    # Greedy generation through the full engine: all requests admitted together.
    handles = [engine.submit(GenerationRequest(adapter=name, prompt=p, sampling=SamplingParams(
        max_new_tokens=new_tokens, ignore_eos=ignore_eos))) for name, p in zip(names, prompts, strict=True)]
    steps_before = engine.steps
    while not all(h.done for h in handles):
        engine.step()
    assert engine.steps - steps_before <= new_tokens, "every step should serve all requests together"
    outputs = {}
    for (name, ids), h in zip(cases, handles, strict=True):
        result = h.result()
        assert list(result.token_ids) == greedy_oracle(oracle, name, ids, new_tokens), name
        assert (result.adapter.name if result.adapter else None) == name
        outputs[name] = result.token_ids
    assert len(set(outputs.values())) > len(set(names)) // 2, "adapters should change the greedy outputs"


@pytest.mark.parametrize(("quantize", "ops"), [
    ("none", "auto"), ("nf4", "auto"),
    # each op alone, over prefill and decode alike (auto picks per step)
    ("none", "reference"), ("none", "segmented"), ("none", "batched"),
])
def test_mixed_batch_matches_peft_tiny(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory, quantize, ops):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, quantize=quantize, lora_ops=ops)
    oracle = load_peft_oracle(tiny_base.path, tiny_adapter_dirs, quantize)
    names = [s.name for s in SPECS] + [None, None]
    check_against_peft(engine, oracle, names, PROMPTS, ATOL[quantize], new_tokens=6)


def test_int8_base_serves_adapters_like_peft(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory):
    """LLM.int8 computes activation columns holding an outlier (> 6.0) anywhere in the batch in
    fp16, so its logits depend on what shares the batch, in PEFT too: logits cannot be compared
    across batch compositions. Greedy tokens of single requests must still agree."""
    from bitsandbytes.nn import Linear8bitLt

    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, quantize="int8")
    assert isinstance(engine.layers["model.layers.0.mlp.down_proj"].base_layer, Linear8bitLt)
    names = ["med", "math", None]
    oracle = load_peft_oracle(tiny_base.path, {n: tiny_adapter_dirs[n] for n in names if n}, "int8")
    for name in names:
        result = engine.generate(GenerationRequest(adapter=name, prompt=PROMPTS[0], sampling=SamplingParams(
            max_new_tokens=5, ignore_eos=True)))
        assert list(result.token_ids) == oracle_greedy(oracle, name, engine.tokenizer.encode(PROMPTS[0]), 5)


@pytest.mark.slow
def test_mixed_batch_matches_peft_smollm2_nf4(registry, smollm2_base, smollm2_adapter_dirs, engine_factory):
    for name, path in smollm2_adapter_dirs.items():
        registry.publish(path, name, base=smollm2_base.name)
    engine = engine_factory(registry, smollm2_base.name, run_loop=False, quantize="nf4")
    oracle = load_peft_oracle(smollm2_base.path, smollm2_adapter_dirs, "nf4")
    names = [s.name for s in SPECS] + [None, None]
    check_against_peft(engine, oracle, names, PROMPTS, atol=SMOLLM2_NF4_ATOL, new_tokens=4,
                       greedy_oracle=oracle_generate, ignore_eos=False)
