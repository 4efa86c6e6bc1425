"""The OpenAI <-> engine conversion without a server: nothing in the schemas goes unhandled."""

from __future__ import annotations

import pytest
from loradock.runtime.http import convert
from loradock.runtime.http.errors import ApiError
from loradock.runtime.http.models import ServedModel
from loradock.runtime.http.schemas import (
    ChatCompletionRequest,
    ChatDelta,
    CompletionRequest,
    unimplemented_fields,
)

MODEL = ServedModel("a@1", "a@1", "a")


@pytest.mark.parametrize(("schema", "honoured"), [
    (ChatCompletionRequest, convert.CHAT_HONOURED),
    (CompletionRequest, convert.COMPLETION_HONOURED),
])
def test_every_field_is_honoured_refused_or_identifying(schema, honoured):
    """Guards "never silently ignored": a field added to a schema without deciding what to do
    with it fails here."""
    fields = set(schema.model_fields)
    decided = set(honoured) | set(unimplemented_fields(schema)) | (convert.IDENTIFYING & fields)
    assert fields == decided, f"undecided: {fields - decided}; stale: {decided - fields}"


def test_off_values_pass_and_anything_else_is_refused_by_name():
    base = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
    off = ChatCompletionRequest(**base, logprobs=False, tools=[], tool_choice="none", presence_penalty=0,
                                response_format={"type": "text"}, service_tier="auto", store=False)
    assert len(convert.chat_plan(off, MODEL).requests) == 1
    for name, value in [("top_logprobs", 2), ("store", True), ("modalities", ["audio"])]:
        with pytest.raises(ApiError) as info:
            convert.chat_plan(ChatCompletionRequest(**base, **{name: value}), MODEL)
        assert (info.value.status, info.value.param) == (400, name)


def test_sampling_follows_openai_defaults_and_n_gets_distinct_seeds():
    plan = convert.chat_plan(ChatCompletionRequest(model="a", messages=[{"role": "developer", "content": "x"}],
                                                   n=2, seed=5), MODEL)
    first, second = (r.sampling for r in plan.requests)
    # OpenAI's defaults; max_new_tokens None: until the context is full
    assert (first.temperature, first.top_p, first.max_new_tokens) == (1.0, 1.0, None)
    assert (first.seed, second.seed) == (5, 6)
    assert plan.requests[0].messages[0].role == "system"  # "developer" is OpenAI's newer name for it
    text = convert.completion_plan(CompletionRequest(model="a", prompt=["x", "y"], n=2), MODEL)
    assert text.prompt_of == [0, 0, 1, 1] and text.requests[0].sampling.max_new_tokens == 16


def test_deltas_carry_only_what_changed():
    assert ChatDelta(content="hi").model_dump() == {"content": "hi"}
    assert ChatDelta().model_dump() == {}
