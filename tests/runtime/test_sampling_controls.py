"""Penalties, logit bias, min_tokens and stop_token_ids: in a mixed batch, a request using them
gets, at every step, the argmax of PEFT's logits for its adapter alone after the same processing
(repetition penalty by HF's own RepetitionPenaltyLogitsProcessor, frequency and presence as
OpenAI defines them, then the bias), while plain greedy requests beside it are unchanged."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from loradock.runtime import FinishReason, GenerationRequest, SamplingParams
from loradock.runtime.errors import InvalidRequestError
from transformers import RepetitionPenaltyLogitsProcessor

from tests.runtime.conftest import drive, load_peft_oracle, oracle_greedy, oracle_logits
from tests.runtime.test_oracle import PROMPTS

NEW = 8


def reference_next(oracle, adapter, prompt_ids, output_ids, p: SamplingParams) -> int:
    logits = oracle_logits(oracle, adapter, prompt_ids + output_ids)[-1:]
    ids = torch.tensor([prompt_ids + output_ids])
    logits = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, logits)[0]
    for token, count in Counter(output_ids).items():
        logits[token] -= p.frequency_penalty * count + p.presence_penalty
    for token, bias in p.logit_bias:
        logits[token] += bias
    return int(logits.argmax())


def test_processed_requests_follow_peft_and_plain_ones_are_unchanged(tiny_registry, tiny_base, tiny_adapter_dirs,
                                                                     engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    plain = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    processed = SamplingParams(max_new_tokens=NEW, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.7,
                               presence_penalty=0.4, logit_bias=((13, 1.5), (314, -2.0)))
    # a prompt token pushed to the top: penalties that counted the prompt would hold it back at once
    prompt_token = engine.tokenizer.encode(PROMPTS[2])[-1]
    output_only = SamplingParams(max_new_tokens=NEW, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0,
                                 logit_bias=((prompt_token, 3.0),))
    cases = [("law", processed), ("law", plain), ("med", processed), (None, processed), (None, plain),
             ("chem", output_only)]  # the sixth case's prompt is PROMPTS[2]
    handles = [engine.submit(GenerationRequest(adapter=a, prompt=PROMPTS[i % 3], sampling=s))
               for i, (a, s) in enumerate(cases)]
    drive(engine, handles)
    oracle = load_peft_oracle(tiny_base.path, {a: tiny_adapter_dirs[a] for a in ("law", "med", "chem")}, "none")
    outputs = []
    for i, ((adapter, params), h) in enumerate(zip(cases, handles, strict=True)):
        ids, got = engine.tokenizer.encode(PROMPTS[i % 3]), list(h.result().token_ids)
        if params is plain:
            assert got == oracle_greedy(oracle, adapter, ids, NEW)
        else:
            for step in range(NEW):
                assert got[step] == reference_next(oracle, adapter, ids, got[:step], params), (adapter, step)
        outputs.append(got)
    assert outputs[0] != outputs[1], "the processors should change what law answers"
    assert outputs[5][0] == prompt_token


def test_min_tokens_holds_back_the_end_and_stop_token_ids_end_the_answer(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name)
    eos = engine.tokenizer.eos_token_id
    to_the_end = ((eos, 100.0),)  # EOS is the top token at every step
    request = lambda **kw: GenerationRequest(prompt=PROMPTS[0], sampling=SamplingParams(max_new_tokens=NEW, **kw))  # noqa: E731
    at_once = engine.generate(request(logit_bias=to_the_end))
    assert (at_once.token_ids, at_once.finish_reason) == ((eos,), FinishReason.EOS)
    held = engine.generate(request(logit_bias=to_the_end, min_tokens=3))
    assert len(held.token_ids) == 4 and eos not in held.token_ids[:3] and held.token_ids[3] == eos
    free = engine.generate(request(ignore_eos=True))
    stopped = engine.generate(request(ignore_eos=True, stop_token_ids=(free.token_ids[2],)))
    first = free.token_ids.index(free.token_ids[2])
    assert stopped.token_ids == free.token_ids[:first + 1] and stopped.finish_reason is FinishReason.STOP


@pytest.mark.parametrize(("change", "field"), [
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"frequency_penalty": 2.5}, "frequency_penalty"),
    # a factor that underflows (or overflows) float32 would make the distribution NaN: found by schemathesis
    ({"repetition_penalty": 5e-324}, "repetition_penalty"), ({"repetition_penalty": 1e6}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"presence_penalty": -3.0}, "presence_penalty"), ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
    ({"logit_bias": ((10**9, 1.0),)}, "logit_bias"), ({"min_tokens": 9}, "min_tokens"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"),
])
def test_bad_controls_are_refused_naming_the_field(tiny_registry, tiny_base, engine_factory, change, field):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    with pytest.raises(InvalidRequestError, match=rf"sampling.{field}: "):
        engine.submit(GenerationRequest(prompt="hi", sampling=SamplingParams(max_new_tokens=NEW, **change)))
