"""The official `openai` client, sync and async, unary and streaming, against a real
`loradock serve` (gRPC and HTTP from one engine) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from loradock.runtime.types import FinishReason

from loradock.client import Client
from tests.http.conftest import ADAPTERS, TOKEN

BASE = "tiny-llama"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def chat(client: openai.OpenAI, model: str, max_tokens: int = 12, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, **kwargs)


def test_greedy_chat_equals_grpc_for_the_same_adapter_and_messages(api, client):
    """Guards: the HTTP edge rendering messages, mapping sampling or reporting results
    differently from the gRPC edge over the same engine (text, served version, exact usage,
    finish reason), for every way of naming a model."""
    texts = set()
    with Client(api.grpc, token=TOKEN, timeout=60) as grpc_client:
        for model, ref in [("", None), (BASE, None), ("a1", "a1"), ("a2@1", "a2@1"), ("mover@prod", "mover@prod"),
                           (f"{BASE}:a3", "a3"), (f"{BASE}:", None)]:
            http = chat(client, model)
            grpc = grpc_client.generate(MESSAGES, adapter=ref, max_new_tokens=12)
            assert http.choices[0].message.content == grpc.text, model
            assert http.model == (grpc.adapter.ref if grpc.adapter else BASE)
            assert (http.usage.prompt_tokens, http.usage.completion_tokens) == (grpc.prompt_tokens,
                                                                                grpc.completion_tokens)
            assert http.usage.total_tokens == grpc.prompt_tokens + grpc.completion_tokens
            assert http.choices[0].finish_reason == ("length" if grpc.finish_reason is FinishReason.LENGTH else "stop")
            assert http.object == "chat.completion" and http.id.startswith("chatcmpl-")
            texts.add(grpc.text)
    assert len(texts) >= 4, "the adapters must change the output, or this comparison could not fail"


def test_sync_stream_is_the_unary_answer_token_by_token(client):
    """Guards the SSE path: role chunk first, one chunk per generated token, the finish reason,
    the usage chunk only when asked for, every chunk naming the concrete version, [DONE] at the end."""
    unary = chat(client, "a4", max_tokens=10)
    chunks = list(chat(client, "a4", max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    tokens = [c for c in chunks[1:] if c.choices and c.choices[0].finish_reason is None]
    assert len(tokens) == unary.usage.completion_tokens
    assert "".join(c.choices[0].delta.content for c in tokens) == unary.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        unary.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == unary.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.model for c in chunks} == {"a4@1"} and {c.id for c in chunks} == {chunks[0].id}

    plain = list(chat(client, "a4", max_tokens=10, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason is not None


def test_32_concurrent_async_streams_over_8_adapters_and_the_base(client):
    """Guards: mixed-up streams, lost tokens or errors under concurrency. Async unary answers
    taken one at a time are the reference; 32 concurrent streams over 8 adapters and the base
    (4 device slots, so adapters rotate) must each reproduce theirs, with 0 errors."""
    models = [*ADAPTERS, ""]
    prompts = [f"Describe thing number {i}." for i in range(4)]

    def messages(prompt: str) -> list[dict]:
        return [{"role": "user", "content": prompt}]

    async def run() -> tuple[dict, list, list]:
        async with openai.AsyncOpenAI(base_url=str(client.base_url), api_key=TOKEN, max_retries=0,
                                      timeout=120) as aclient:
            reference = {}
            for model in models:
                for prompt in prompts:
                    reference[model, prompt] = await aclient.chat.completions.create(
                        model=model, messages=messages(prompt), max_tokens=16, temperature=0)
            jobs = [(models[i % len(models)], prompts[i % len(prompts)]) for i in range(32)]

            async def one(model: str, prompt: str) -> tuple[str, object, set]:
                stream = await aclient.chat.completions.create(
                    model=model, messages=messages(prompt), max_tokens=16, temperature=0, stream=True,
                    stream_options={"include_usage": True})
                text, usage, served = "", None, set()
                async for chunk in stream:
                    served.add(chunk.model)
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                    else:
                        usage = chunk.usage
                return text, usage, served

            results = await asyncio.gather(*(one(m, p) for m, p in jobs), return_exceptions=True)
            return reference, jobs, results

    reference, jobs, results = asyncio.run(run())
    assert [r for r in results if isinstance(r, BaseException)] == []
    for job, (text, usage, served) in zip(jobs, results, strict=True):
        expected = reference[job]
        assert text == expected.choices[0].message.content, job
        assert usage == expected.usage and served == {expected.model}, job
    assert len({r.choices[0].message.content for r in reference.values()}) > len(prompts)


def test_models_list_the_registry_and_follow_an_alias_move(api, client, http_registry):
    """Guards: /v1/models missing references a client may use, listing what the engine cannot
    serve, or going stale after an alias move (seen on the next call, no restart)."""
    cards = {m.id: m for m in client.models.list().data}
    base = cards[BASE]
    assert (base.root, base.parent, base.object, base.owned_by) == (BASE, None, "model", "loradock")
    for name in ADAPTERS:
        assert cards[name].root == cards[f"{name}@1"].root == f"{name}@1"
        assert cards[name].parent == BASE
    assert cards["mover"].root == "mover@2" and cards["mover@prod"].root == "mover@1"
    assert {"mover@1", "mover@2"} <= set(cards)
    assert not {"big", "big@1", "broken@0"} & set(cards), "rank 32 is above --max-rank 16: not servable"
    info_len, prompt_len = cards[BASE].max_model_len, cards[BASE].max_prompt_tokens
    assert 0 < prompt_len < info_len
    assert all((c.max_model_len, c.max_prompt_tokens) == (info_len, prompt_len) for c in cards.values())
    assert cards["a0@1"].created > 1_600_000_000
    assert client.models.retrieve("mover@prod").root == "mover@1"

    pid = api.proc.pid
    http_registry.tag("mover@2", "prod")
    try:
        assert {m.id: m.root for m in client.models.list().data}["mover@prod"] == "mover@2"
        # traffic follows once mover@2 is loaded (warm promotion), mover@1 serving until then
        served = [chat(client, "mover@prod", max_tokens=2).model]
        deadline = time.monotonic() + 30
        while served[-1] != "mover@2" and time.monotonic() < deadline:
            served.append(chat(client, "mover@prod", max_tokens=2).model)
        assert served[-1] == "mover@2" and set(served[:-1]) <= {"mover@1"}, served
    finally:
        http_registry.tag("mover@1", "prod")
    assert chat(client, "mover@prod", max_tokens=2).model == "mover@1"
    assert api.proc.pid == pid and api.proc.poll() is None


def test_n_choices_seeds_stop_strings_and_text_completions(client):
    """Guards: n ignored or miscounted in usage, seeds not reproducible, stop strings not
    applied, and /v1/completions with several prompts, token ids and echo."""
    greedy = chat(client, "a5", max_tokens=6, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1  # greedy: one answer, three times
    single = chat(client, "a5", max_tokens=6)
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert greedy.usage.completion_tokens == 3 * single.usage.completion_tokens

    def sampled():
        r = client.chat.completions.create(model="a5", messages=MESSAGES, max_tokens=8, n=2, temperature=1.0,
                                           seed=7)
        return [c.message.content for c in r.choices]

    first = sampled()
    assert first == sampled() and first[0] != first[1]  # per-choice seeds: reproducible, not copies

    text = chat(client, "a6", max_tokens=12).choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    stopped = chat(client, "a6", max_tokens=12, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[:text.index(stop)]

    done = client.completions.create(model="a7", prompt=["Once upon", "The end"], n=2, max_tokens=5,
                                     temperature=0, echo=True, extra_body={"ignore_eos": True})
    assert done.object == "text_completion" and done.model == "a7@1"
    assert [c.text.startswith(p) for c, p in zip(done.choices, ["Once upon"] * 2 + ["The end"] * 2,
                                                  strict=True)] == [True] * 4
    assert done.choices[0].text == done.choices[1].text != done.choices[2].text
    assert done.usage.completion_tokens == 4 * 5
    ids = client.completions.create(model="a7", prompt=[1, 2, 3, 4], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens <= 3
    streamed = list(client.completions.create(model="a7", prompt="Once upon", max_tokens=5, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True}))
    unary = client.completions.create(model="a7", prompt="Once upon", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == unary.choices[0].text
    assert client.completions.create(model="a7", prompt="Once", temperature=0,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 16


def test_log_probabilities_through_the_official_client(client):
    """Chat (`logprobs`, `top_logprobs`) and text completions (`logprobs`), unary and streamed:
    one entry per generated token, whose texts make up the answer; greedy picks each step's most
    likely token, so its logprob is the first alternative's; the stream carries the same values."""
    answer = chat(client, "a1", max_tokens=6, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 6
    assert "".join(c.token for c in content) == answer.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode())
        assert c.top_logprobs[0].token == c.token and abs(c.top_logprobs[0].logprob - c.logprob) < 1e-6
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
    streamed = [lp for chunk in chat(client, "a1", max_tokens=6, logprobs=True, top_logprobs=3, stream=True)
                for choice in chunk.choices if choice.logprobs for lp in choice.logprobs.content]
    assert [(s.token, round(s.logprob, 5)) for s in streamed] == [(c.token, round(c.logprob, 5)) for c in content]
    assert chat(client, "a1", max_tokens=2).choices[0].logprobs is None  # not asked: none

    text = client.completions.create(model="a2", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text and len(lp.token_logprobs) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v, abs=1e-6)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))


def test_penalties_bias_and_vllm_sampling_extras_through_the_official_client(client):
    """logit_bias and the penalties as OpenAI spells them, min_tokens / stop_token_ids /
    repetition_penalty as vLLM's extra fields: honoured, not refused."""
    plain = chat(client, "a1", max_tokens=3, logprobs=True)
    forced = chat(client, "a1", max_tokens=3, logprobs=True, logit_bias={"13": 100})  # token 13 every step
    tokens = [c.token for c in forced.choices[0].logprobs.content]
    assert len(tokens) == 3 and len(set(tokens)) == 1
    assert tokens != [c.token for c in plain.choices[0].logprobs.content]
    penalised = chat(client, "a1", max_tokens=4, frequency_penalty=2.0, presence_penalty=2.0,
                     extra_body={"repetition_penalty": 1.5, "min_tokens": 2, "stop_token_ids": [2]})
    assert penalised.usage.completion_tokens >= 2


def test_structured_outputs_through_the_official_client(client):
    """response_format json_schema (the client's own `parse` with a Pydantic model) and
    json_object, and vLLM's structured_outputs (choice, regex) as extra fields: the answers
    parse, whatever the adapter would have said."""
    import json
    import re

    from pydantic import BaseModel, Field

    class Verdict(BaseModel):
        ok: bool
        size: str = Field(pattern="^(S|M|L)$")

    parsed = client.chat.completions.parse(model="a1", messages=MESSAGES, max_tokens=40, temperature=0,
                                           response_format=Verdict)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    anything = chat(client, "a2", max_tokens=60, response_format={"type": "json_object"})
    content = anything.choices[0].message.content
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # a random tiny model may run out of tokens inside a string: still an object, never prose
        assert content.startswith("{") and anything.choices[0].finish_reason == "length"
    choice = chat(client, "a1", max_tokens=10, extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert choice.choices[0].message.content in ("red", "green")
    text = client.completions.create(model="a3", prompt="Code:", max_tokens=10, temperature=0,
                                     extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", text.choices[0].text)


def test_tokenize_detokenize_and_version(api):
    """vLLM's routes: /tokenize (a text or chat messages, as served), /detokenize, /version;
    the tokenizer routes are the API (token required), /version is open like the probes."""
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}"}
    text = "Hello there, Veloria"
    tokens = httpx.post(f"{api.url}/tokenize", json={"model": "a1", "prompt": text}, headers=headers).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] > tokens["count"]
    back = httpx.post(f"{api.url}/detokenize", json={"model": "a1", "tokens": tokens["tokens"]}, headers=headers)
    assert back.json() == {"prompt": text}
    chat_tokens = httpx.post(f"{api.url}/tokenize", json={"messages": [{"role": "user", "content": text}]},
                             headers=headers).json()
    assert chat_tokens["count"] > tokens["count"]  # the chat template's own tokens around the text
    assert httpx.post(f"{api.url}/tokenize", json={"model": "nope", "prompt": "x"}, headers=headers).status_code == 404
    assert httpx.post(f"{api.url}/tokenize", json={"prompt": "x"}).status_code == 401
    bad = httpx.post(f"{api.url}/detokenize", json={"tokens": [10**9]}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.get(f"{api.url}/version").json()["version"]


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(api, client):
    """lm-eval's loglikelihood request (echo, logprobs=1, max_tokens=1, temperature 0): the
    prompt's tokens come back first with their log probabilities (the first has none), then the
    generated one, and the texts add up to the answer."""
    import httpx

    prompt = "The capital of France is Paris"
    answer = client.completions.create(model="a2", prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = answer.choices[0].logprobs
    ids = httpx.post(f"{api.url}/tokenize", json={"prompt": prompt}, headers={"Authorization": f"Bearer {TOKEN}"})
    n = ids.json()["count"]
    assert len(lp.tokens) == n + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(top) <= 1 for top in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == answer.choices[0].text and answer.choices[0].text.startswith(prompt)
    assert lp.text_offset[0] == 0
