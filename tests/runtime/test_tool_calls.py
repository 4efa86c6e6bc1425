"""Tool calling in the engine: tools rendered into the prompt (by the template, or by loradock in
hermes form when the template knows none), calls parsed back per family format, streamed content
held back where a call may begin, and required / named choices held to JSON by the grammar engine,
so the answer of a random tiny model still parses into calls of the offered tools."""

from __future__ import annotations

import json

import loradock.runtime.tool_calls as tc
import pytest
from loradock.runtime import GenerationRequest, SamplingParams, StructuredOutput
from loradock.runtime.errors import InvalidRequestError
from loradock.runtime.prompts import PromptEncoder
from loradock.runtime.types import ChatMessage, Tool, ToolCall

from tests.runtime.conftest import drive

WEATHER = Tool("get_weather", "Weather in a city", json.dumps({
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}))
CLOCK = Tool("get_time", "The time now")
ASK = (ChatMessage("user", "Weather in Paris?"),)


def request(**kw) -> GenerationRequest:
    kw.setdefault("messages", ASK)
    kw.setdefault("tools", (WEATHER, CLOCK))
    return GenerationRequest(**kw)


@pytest.mark.parametrize("fmt, text, calls, content", [
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {})], "Let me look."),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": "{}"}', [("get_time", {})], ""),  # cut before </
    ("hermes", "Paris is sunny.", None, None),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>', None, None),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}; '
                    '{"name": "get_time", "parameters": {}}',
     [("get_weather", {"city": "Oslo", "days": 1}), ("get_time", {})], ""),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {}}', [("get_time", {})], ""),
    ("llama3_json", 'It is {"name": "get_time"}', None, None),
    ("llama3_json", '{"city": "Oslo"}', None, None),  # JSON, but not a call
    ("mistral", '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]', [("get_time", {})], ""),
    ("mistral", '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]',
     [("get_weather", {"city": "Paris", "days": 3})], ""),
    ("mistral", "[1, 2]", None, None),
])
def test_each_format_parses_its_calls_and_leaves_prose_alone(fmt, text, calls, content):
    parsed = tc.parse(text, fmt)
    if calls is None:
        assert parsed is None
        return
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
    assert parsed.content == content
    assert all(c.id.startswith("call_") for c in parsed.calls) and len({c.id for c in parsed.calls}) == len(calls)


@pytest.mark.parametrize("fmt, pieces, streamed", [
    # prose streams as it comes; a call's text never does
    ("hermes", ["Let ", "me look.", " <tool", "_call>", '{"name": "get_time"}', "</tool_call>"], "Let me look. "),
    ("hermes", ["I <to", "ok"], "I <took"),  # a marker's prefix waits, then goes out when it is not one
    ("llama3_json", [" ", "{", '"name": "get_time", "parameters": {}}'], ""),
    ("llama3_json", ["<|py", "thon_tag|>{}"], ""),
    ("llama3_json", ["Sure", ", {x}"], "Sure, {x}"),
    ("mistral", ["[TOOL", "_CALLS][]"], ""),
    ("mistral", ["No ", "call"], "No call"),
])
def test_streamed_content_is_held_back_only_where_a_call_may_begin(fmt, pieces, streamed):
    holdback = tc.ContentHoldback.for_request(request(), fmt)
    text, out = "", ""
    for piece in pieces:
        text += piece
        out += holdback.release(text)
    assert out == streamed
    if tc.parse(text, fmt) is None:  # no call after all: the held text follows as content
        assert out + holdback.rest(text) == text


def test_forced_choices_hold_back_everything_and_free_choices_nothing():
    whole = tc.ContentHoldback.for_request(request(tool_choice="required"), "hermes")
    assert whole.release("[{") == "" and whole.release('[{"name": "x"}]') == ""
    assert tc.ContentHoldback.for_request(request(tool_choice="none"), "hermes") is None
    assert tc.ContentHoldback.for_request(request(tools=()), "hermes") is None


def test_required_and_named_choices_compile_to_grammars_that_admit_only_calls(tiny_registry, tiny_base,
                                                                               engine_factory):
    """The schemas the choices compile to, checked by xgrammar itself: a named choice is the
    function's arguments; required is a list of calls of offered tools (one when not parallel)."""
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)

    def admits(req: GenerationRequest, value) -> bool:  # the whole JSON text, then the end of sequence
        matcher = engine.grammars.matcher(tc.constraint(req))
        return (matcher.accept_string(json.dumps(value)) and matcher.accept_token(min(engine.eos_ids))
                and matcher.is_terminated())

    named = request(tool_choice="function", tool_name="get_weather")
    assert admits(named, {"city": "Paris", "days": 3})
    assert not admits(named, {"city": "Rome", "days": 3})
    assert not admits(named, {"city": "Paris"})
    required = request(tool_choice="required")
    two = [{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}, {"name": "get_time", "parameters": {}}]
    assert admits(required, two)
    assert not admits(required, [{"name": "get_date", "parameters": {}}])
    assert not admits(required, [])
    assert not admits(request(tool_choice="required", parallel_tool_calls=False), two)
    assert tc.constraint(request()) is None


@pytest.mark.parametrize("change, field", [
    ({"tool_choice": "function", "tool_name": "nope"}, "tool_choice"),
    ({"tool_choice": "required", "tools": ()}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": (CLOCK, CLOCK)}, "tools"),
    ({"tools": (Tool("bad name!"),)}, "tools[0].function.name"),
    ({"tools": (Tool("f", parameters="[1]"),)}, "tools[0].function.parameters"),
    ({"tools": (Tool("f", parameters="{"),)}, "tools[0].function.parameters"),
    ({"tool_choice": "required", "sampling": SamplingParams(structured=StructuredOutput("json_object"))},
     "tool_choice"),
    ({"messages": (), "prompt": "hi"}, "tools"),
])
def test_inconsistent_tool_requests_are_refused_naming_the_field(change, field):
    with pytest.raises(InvalidRequestError, match=rf"^{field.replace('[', '.').replace(']', '.')}"):
        tc.check(request(**change))


def test_a_template_without_tools_gets_them_in_hermes_form(tokenizer_dir):
    """SmolLM2's template renders only role and content: loradock writes the tools into the system
    message and earlier calls and results as <tool_call> / <tool_response> blocks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = PromptEncoder(tokenizer, len(tokenizer), 4096)
    assert not encoder.renders_tools
    call = ToolCall("get_weather", '{"city": "Paris", "days": 2}', "call_1")
    messages = (ChatMessage("system", "Be brief."), *ASK, ChatMessage("assistant", "", (call,)),
                ChatMessage("tool", '{"sky": "clear"}', tool_call_id="call_1"))
    text = tokenizer.decode(encoder.encode(request(messages=messages)))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and text.count("<|im_start|>system") == 1
    assert '"name": "get_weather", "description": "Weather in a city"' in text and '"name": "get_time"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}' \
           '\n</tool_call><|im_end|>' in text
    assert '<|im_start|>user\n<tool_response>\n{"sky": "clear"}\n</tool_response><|im_end|>' in text
    plain = tokenizer.decode(encoder.encode(request(tools=(), messages=ASK)))
    assert "# Tools" not in plain  # no tools, nothing added


def test_a_template_that_knows_tools_renders_them_itself(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.name }}({{ c.function.arguments.city }})]{% endfor %}"
        "{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}\n{% endfor %}")
    encoder = PromptEncoder(tokenizer, len(tokenizer), 4096)
    assert encoder.renders_tools
    call = ToolCall("get_weather", '{"city": "Oslo", "days": 1}', "call_9")
    messages = (*ASK, ChatMessage("assistant", "", (call,)), ChatMessage("tool", "rain", tool_call_id="call_9"))
    text = tokenizer.decode(encoder.encode(request(messages=messages)))
    assert text == "TOOLS:get_weather;get_time;user:Weather in Paris?assistant:[get_weather(Oslo)]tool:rain#call_9"
    assert tc.detect_format(tokenizer.chat_template) == "hermes"
    assert tc.detect_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert tc.detect_format("{{ '<|python_tag|>' }}") == "llama3_json"


def test_the_engine_answers_forced_and_free_choices_with_parsed_calls(tiny_registry, tiny_base, engine_factory):
    """A random tiny model, in one batch: a named choice and a required one always come back as
    calls of the offered tools with schema-valid arguments; a free (auto) answer driven into the
    hermes format by a regex is parsed into its call; tool_choice none is plain text."""
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    sampling = SamplingParams(max_new_tokens=80)
    hermes_call = r'<tool_call>\n\{"name": "get_time", "arguments": \{\}\}\n</tool_call>'
    cases = {
        "named": request(adapter="law", tool_choice="function", tool_name="get_weather", sampling=sampling),
        "required": request(adapter="med", tool_choice="required", parallel_tool_calls=False, sampling=sampling),
        "auto": request(sampling=SamplingParams(max_new_tokens=40, structured=StructuredOutput("regex", hermes_call))),
        "none": request(adapter="law", tool_choice="none", sampling=SamplingParams(max_new_tokens=8)),
    }
    handles = {k: engine.submit(r) for k, r in cases.items()}
    drive(engine, list(handles.values()))
    results = {k: h.result() for k, h in handles.items()}
    (named,) = results["named"].tool_calls.calls
    assert named.name == "get_weather" and json.loads(named.arguments) == json.loads(results["named"].text)
    assert set(json.loads(named.arguments)) == {"city", "days"}
    (required,) = results["required"].tool_calls.calls
    assert required.name in ("get_weather", "get_time")
    (auto,) = results["auto"].tool_calls.calls
    assert (auto.name, auto.arguments, results["auto"].tool_calls.content) == ("get_time", "{}", "")
    assert results["none"].tool_calls is None and results["none"].text
    assert "get_weather" in engine.tokenizer.decode(results["none"].prompt_token_ids)  # offered all the same
