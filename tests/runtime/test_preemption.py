"""A KV pool far smaller than the workload: sequences are preempted and recomputed, prompt chunks
run next to decode tokens, and every request still gets exactly the greedy tokens of its adapter
alone through PeftModel."""

from __future__ import annotations

import pytest
import torch
from loradock.runtime import GenerationRequest, SamplingParams
from loradock.runtime.errors import InvalidRequestError
from loradock.runtime.kv_cache import KVPool

from tests.runtime.conftest import load_peft_oracle, oracle_greedy

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Patient presents with a cough and",
           "Roses are red,", "Quarterly revenue grew by", "Hello there, how are you")


def test_preempted_sequences_recompute_to_peft_greedy(tiny_registry, tiny_base, tiny_adapter_dirs,
                                                      engine_factory):
    names = ["law", "med", None, "code", "law", "chem"]
    # 64 tokens of KV in blocks of 4 against 6 sequences of ~8 + 24 tokens each; an 8-token step
    # budget chunks the prompts next to the decode tokens.
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, kv_cache_tokens=64,
                            kv_block_size=4, max_model_len=64, max_prompt_tokens=32, max_running=6,
                            max_batch_tokens=8)
    oracle = load_peft_oracle(tiny_base.path, {n: tiny_adapter_dirs[n] for n in names if n}, "none")
    new_tokens = 24
    handles = [engine.submit(GenerationRequest(adapter=name, prompt=p, sampling=SamplingParams(
        max_new_tokens=new_tokens, ignore_eos=True))) for name, p in zip(names, PROMPTS, strict=True)]
    mixed_steps = 0
    while not all(h.done for h in handles):
        running = engine.scheduler.running
        mixed_steps += any(s.in_prefill for s in running) and any(not s.in_prefill for s in running)
        engine.step()
    assert engine.preemptions > 0, "the pool was meant to run dry"
    assert mixed_steps > 0, "prompt chunks were meant to share steps with decode tokens"
    for name, prompt, h in zip(names, PROMPTS, handles, strict=True):
        result = h.result()
        assert len(result.token_ids) == new_tokens
        assert list(result.token_ids) == oracle_greedy(oracle, name, engine.tokenizer.encode(prompt),
                                                       new_tokens), name
    assert engine.kv.free_blocks == engine.kv.num_blocks, "every block came back"


def test_prompt_larger_than_the_pool_is_refused_with_numbers(tiny_registry, tiny_base, engine_factory):
    per_block = 4 * KVPool.bytes_per_token(2, 2, 16, torch.float32)  # the tiny base's KV, fp32
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, kv_cache_bytes=2 * per_block,
                            kv_block_size=4, max_model_len=64, max_prompt_tokens=32)
    assert engine.info().kv_cache_tokens == 8
    with pytest.raises(InvalidRequestError, match=r"need \d+ KV blocks; the whole pool has 2 \(8 tokens"):
        engine.submit(GenerationRequest(prompt=" ".join(PROMPTS), sampling=SamplingParams(max_new_tokens=2)))
    result = engine.generate(GenerationRequest(prompt="Hi", sampling=SamplingParams(max_new_tokens=20,
                                                                                    ignore_eos=True)))
    assert result.prompt_tokens + result.completion_tokens == 8, "capped by what the pool holds"
