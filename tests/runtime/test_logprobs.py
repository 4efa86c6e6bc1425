"""Log probabilities of generated tokens: in a mixed batch, each request that asks gets, per
token, the log-softmax of the logits PEFT gives its adapter alone, and the k most likely
alternatives; requests that do not ask get none, and sampling is unchanged."""

from __future__ import annotations

import pytest
import torch
from loradock.runtime import GenerationRequest, SamplingParams
from loradock.runtime.errors import InvalidRequestError

from tests.runtime.conftest import drive, load_peft_oracle, oracle_logits
from tests.runtime.test_oracle import PROMPTS

NEW = 4


def test_each_token_carries_peft_log_probabilities(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    cases = [("law", 3, 0.0), ("med", None, 0.0), (None, 0, 0.0), ("chem", 5, 0.8)]  # adapter, logprobs, temperature
    handles = [engine.submit(GenerationRequest(adapter=a, prompt=p, sampling=SamplingParams(
        max_new_tokens=NEW, ignore_eos=True, logprobs=k, temperature=t, seed=7)))
        for (a, k, t), p in zip(cases, PROMPTS[:4], strict=True)]
    drive(engine, handles)
    oracle = load_peft_oracle(tiny_base.path, {a: tiny_adapter_dirs[a] for a, _, _ in cases if a}, "none")
    for (adapter, k, _), prompt, h in zip(cases, PROMPTS[:4], handles, strict=True):
        result = h.result()
        if k is None:
            assert result.logprobs is None
            continue
        assert [lp.token_id for lp in result.logprobs] == list(result.token_ids)
        ids = engine.tokenizer.encode(prompt)
        want = torch.log_softmax(oracle_logits(oracle, adapter, ids + list(result.token_ids))[len(ids) - 1:-1], -1)
        for step, lp in enumerate(result.logprobs):
            assert abs(lp.logprob - want[step, lp.token_id].item()) < 1e-4, (adapter, step)
            top = want[step].topk(k)
            assert [i for i, _ in lp.top] == top.indices.tolist(), (adapter, step)
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top.values, atol=1e-4, rtol=0)


def test_streamed_events_carry_the_same_log_probabilities(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name)
    request = GenerationRequest(adapter="law", prompt=PROMPTS[0], sampling=SamplingParams(
        max_new_tokens=NEW, ignore_eos=True, logprobs=2))
    handle = engine.submit(request)
    streamed = [event.logprob for event in handle]
    assert streamed == list(handle.result().logprobs) and len(streamed) == NEW


@pytest.mark.parametrize("bad", [-1, 21, True, 2.0])
def test_a_bad_logprobs_count_is_refused_naming_it(tiny_registry, tiny_base, engine_factory, bad):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    with pytest.raises(InvalidRequestError, match=r"sampling.logprobs: must be an integer in \[0, 20\]"):
        engine.submit(GenerationRequest(prompt="hi", sampling=SamplingParams(logprobs=bad)))


def test_prompt_log_probabilities_equal_peft_through_chunks_and_a_warm_prefix_cache(
        tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory):
    """Each prompt token after the first gets the log-softmax PEFT gives it from the tokens before
    it, with prompts split over several prefill chunks, and again when the same prompt is cached
    (a request asking for them reads nothing from the prefix cache)."""
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, max_batch_tokens=16, kv_block_size=4)
    prompt = PROMPTS[2] + " " + PROMPTS[3] + " " + PROMPTS[7]  # ~25 tokens: two chunks at least
    ids = engine.tokenizer.encode(prompt)
    oracle = load_peft_oracle(tiny_base.path, {"law": tiny_adapter_dirs["law"]}, "none")
    want = torch.log_softmax(oracle_logits(oracle, "law", ids)[:-1], -1)
    for _ in range(2):  # the second round's prompt blocks are in the prefix cache
        handles = [engine.submit(GenerationRequest(adapter=a, prompt=prompt, sampling=SamplingParams(
            max_new_tokens=2, prompt_logprobs=k))) for a, k in (("law", 2), ("law", None), (None, None))]
        drive(engine, handles)
        got = handles[0].result().prompt_logprobs
        assert got[0] is None and len(got) == len(ids)
        for position, lp in enumerate(got[1:]):
            assert lp.token_id == ids[position + 1]
            assert abs(lp.logprob - want[position, lp.token_id].item()) < 1e-4, position
            assert [i for i, _ in lp.top] == want[position].topk(2).indices.tolist()
        assert handles[1].result().prompt_logprobs is None
    assert engine.stats()["adapters"]["law@1"]["cached_prompt_tokens"] > 0  # the plain request did hit
