"""Tool calling over the OpenAI API, with the official client and with `langchain-openai` (clients
nobody here wrote): named and required choices come back as calls of the offered tools, streamed
as tool-call deltas, and a conversation carrying a call and its result goes round; LangChain's
structured output works in every method and `bind_tools` round-trips a call."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.http.conftest import TOKEN

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def ask(client: openai.OpenAI, model: str = "a1", **kwargs):
    kwargs.setdefault("messages", ASK)
    kwargs.setdefault("tools", [WEATHER, CLOCK])
    kwargs.setdefault("max_tokens", 80)
    return client.chat.completions.create(model=model, temperature=0, **kwargs)


def test_named_and_required_choices_answer_with_calls_of_the_offered_tools(client):
    named = ask(client, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = named.choices[0].message
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] in ("Paris", "Oslo") and 1 <= arguments["days"] <= 7
    assert message.content is None and named.choices[0].finish_reason == "stop"  # as OpenAI for a named choice

    required = ask(client, "a2", tool_choice="required", parallel_tool_calls=False)
    (call,) = required.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time") and isinstance(json.loads(call.function.arguments), dict)
    assert required.choices[0].finish_reason == "tool_calls"

    free = ask(client, "a3", max_tokens=6)  # auto: a random model writes prose, which stays content
    assert free.choices[0].message.tool_calls is None and free.choices[0].message.content
    assert free.choices[0].finish_reason in ("stop", "length")


def test_streamed_calls_arrive_as_tool_call_deltas(client):
    unary = ask(client, "a4", tool_choice="required")
    chunks = list(ask(client, "a4", tool_choice="required", stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert not "".join(d.content or "" for d in deltas)  # the call's JSON never leaks as content
    streamed = [call for d in deltas for call in d.tool_calls or ()]
    expected = unary.choices[0].message.tool_calls
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in streamed] == [
        (i, c.function.name, json.loads(c.function.arguments)) for i, c in enumerate(expected)]
    assert all(c.id.startswith("call_") and c.type == "function" for c in streamed)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_a_call_and_its_result_go_round_in_the_conversation(client, api):
    """The assistant's call and the tool's answer are rendered into the next prompt (SmolLM2's
    template knows no tools: loradock writes them in hermes form), and the reply is plain text."""
    first = ask(client, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear", "high_c": 21}'}]
    reply = ask(client, messages=history, tool_choice="none", max_tokens=8)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content
    rendered = httpx.post(f"{api.url}/tokenize", headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"model": "a1", "messages": history}).json()
    assert rendered["count"] > 0
    detok = httpx.post(f"{api.url}/detokenize", headers={"Authorization": f"Bearer {TOKEN}"},
                       json={"tokens": rendered["tokens"]}).json()["prompt"]
    assert f'"name": "get_weather", "arguments": {call.function.arguments}' in detok
    assert '<tool_response>\n{"sky": "clear", "high_c": 21}\n</tool_response>' in detok


@pytest.mark.parametrize("change, status, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "get_date"}}}, 400, "tool_choice"),
    ({"tool_choice": "required", "tools": None}, 400, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, 400, "tools[0].function.name"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, 400, "tool_choice"),
    ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, 400, "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, 400, "messages[0].tool_call_id"),
    ({"functions": [{"name": "f"}]}, 400, "functions"),
])
def test_bad_tool_requests_are_400s_naming_the_field(client, change, status, param):
    with pytest.raises(openai.APIStatusError) as raised:
        ask(client, **change)
    assert raised.value.status_code == status
    assert raised.value.body["param"] == param, raised.value.body


# ---- LangChain (langchain-openai), as its users call it ----


class Forecast(BaseModel):
    """A weather forecast."""

    city: Literal["Paris", "Oslo"]
    days: int = Field(ge=1, le=7)


@pytest.fixture(scope="module")
def chat_model(api):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="a1", base_url=f"{api.url}/v1", api_key=TOKEN, temperature=0, max_tokens=60,
                      max_retries=0, timeout=60)


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_langchain_structured_output_in_every_method(chat_model, method):
    structured = chat_model.with_structured_output(Forecast, method=method, include_raw=True)
    out = structured.invoke("Forecast for Paris, please. Answer in JSON.")
    if method == "json_mode":
        # json_object holds the answer to a JSON object, not to Forecast's fields: a random model's
        # object parses as JSON and fails only Forecast's validation, if at all
        assert out["raw"].content.startswith("{")
        assert out["parsed"] is not None or "validation error" in str(out["parsing_error"]), out
        return
    assert out["parsing_error"] is None and isinstance(out["parsed"], Forecast), out


def test_langchain_bind_tools_round_trip(chat_model):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool(args_schema=Forecast)
    def get_weather(city: str, days: int) -> str:
        """Weather in a city for some days."""
        return f"{city}: clear for {days} days"

    bound = chat_model.bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage("Weather in Oslo?")
    called = bound.invoke([question])
    (call,) = called.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Oslo")
    answer = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    reply = chat_model.bind_tools([get_weather]).invoke([question, called, answer])
    assert isinstance(reply.content, str) and reply.content and not reply.tool_calls

    streamed = list(bound.stream([question]))
    merged = streamed[0]
    for chunk in streamed[1:]:
        merged += chunk
    assert [c["name"] for c in merged.tool_calls] == ["get_weather"]
