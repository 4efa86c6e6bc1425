"""Tool calling: the tools rendered into the prompt, the answer's tool calls parsed back, and a
required or named tool choice enforced with the grammar engine so that the answer always parses.

What a model writes when it calls a tool depends on its family; the format is read from the chat
template (or set with `--tool-call-parser`):
- `hermes` (Qwen 2/2.5/3, Hermes, SmolLM3, and loradock's own rendering for templates that know no
  tools): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call;
- `llama3_json` (Llama 3.1 and later): the whole answer is `{"name": ..., "parameters": {...}}`,
  several joined by `;` (the `<|python_tag|>` before it is a special token the detokeniser drops);
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (`[TOOL_CALLS]` may be dropped
  as a special token too, so a bare JSON array of calls at the start counts).

tool_choice `required` and a named function are held to JSON by the grammar engine, as vLLM does,
whatever the family: a named function's answer is its arguments object; `required` answers a JSON
array of `{"name", "parameters"}` objects (one item when parallel tool calls are off).
An answer whose calls do not parse stays plain content, as vLLM and OpenAI leave it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidRequestError
from .types import ChatMessage, GenerationRequest, StructuredOutput, Tool, ToolCall, ToolCalls

FORMATS = ("hermes", "llama3_json", "mistral")
TOOL_CHOICES = ("auto", "none", "required", "function")

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_HERMES_OPEN = "<tool_call>"
_MISTRAL_OPEN = "[TOOL_CALLS]"
_LLAMA_TAG = "<|python_tag|>"


def detect_format(chat_template: str | None) -> str:
    """The tool-call format a chat template teaches its model (hermes when it says nothing)."""
    template = chat_template or ""
    if _MISTRAL_OPEN in template:
        return "mistral"
    if "python_tag" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def renders_tools(chat_template: str | None) -> bool:
    """Whether the template itself renders `tools` (else loradock renders them, in hermes form)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---- requests ----


def check(request: GenerationRequest) -> None:
    """InvalidRequestError naming the field for an inconsistent tools / tool_choice pair."""
    names = [t.name for t in request.tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"tools: function names must be distinct (got {names})")
    for i, tool in enumerate(request.tools):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", tool.name):
            raise InvalidRequestError(f"tools[{i}].function.name: {tool.name!r} must be 1-64 letters, digits, "
                                      "underscores, dots or dashes")
        if tool.parameters:
            try:
                schema = json.loads(tool.parameters)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"tools[{i}].function.parameters: not JSON ({e})") from None
            if not isinstance(schema, dict):
                raise InvalidRequestError(f"tools[{i}].function.parameters: must be a JSON schema object")
    choice = request.tool_choice
    if choice not in TOOL_CHOICES:
        raise InvalidRequestError(f"tool_choice: {choice!r} is not one of {', '.join(TOOL_CHOICES)}")
    if choice in ("required", "function") and not request.tools:
        raise InvalidRequestError(f"tool_choice: {choice} needs tools")
    if choice == "function" and request.tool_name not in names:
        raise InvalidRequestError(f"tool_choice: no tool named {request.tool_name!r} in tools "
                                  f"({', '.join(names) or 'none'})")
    if choice in ("required", "function") and request.sampling.structured is not None:
        raise InvalidRequestError(f"tool_choice: {choice} already constrains the answer; drop the structured "
                                  "output (response_format / structured_outputs)")
    if not request.messages and request.tools:
        raise InvalidRequestError("tools: only with chat messages (a raw prompt has no template to render them)")


def _parameters(tool: Tool) -> dict:
    return json.loads(tool.parameters) if tool.parameters else {"type": "object", "properties": {}}


def constraint(request: GenerationRequest) -> StructuredOutput | None:
    """The grammar a required or named tool choice holds the answer to (None: free)."""
    tools = {t.name: t for t in request.tools}
    if request.tool_choice == "function":
        return StructuredOutput("json_schema", json.dumps(_parameters(tools[request.tool_name])))
    if request.tool_choice != "required":
        return None
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, "parameters": _parameters(t)},
                       "required": ["name", "parameters"], "additionalProperties": False}
                      for t in request.tools]}
    schema = {"type": "array", "items": call, "minItems": 1}
    if not request.parallel_tool_calls:
        schema["maxItems"] = 1
    return StructuredOutput("json_schema", json.dumps(schema))


def _tool_json(tool: Tool) -> dict:
    function = {"name": tool.name, "description": tool.description, "parameters": _parameters(tool)}
    return {"type": "function", "function": function}


def _arguments(call: ToolCall):
    try:
        return json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        return call.arguments  # a template shows it as the text it was


def template_inputs(messages: Sequence[ChatMessage], tools: Sequence[Tool],
                    template_renders_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for `apply_chat_template`. A template that knows tools gets them in
    transformers' shape; for one that does not, loradock writes them into the system message and
    the calls and results into the conversation in hermes form, so no tool is silently dropped."""
    if template_renders_tools or not (tools or any(m.tool_calls or m.role == "tool" for m in messages)):
        out = []
        for m in messages:
            d: dict = {"role": m.role, "content": m.content}
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": _arguments(c)}} for c in m.tool_calls]
            if m.role == "tool" and m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out, ([_tool_json(t) for t in tools] if tools else None)
    out = []
    for m in messages:
        if m.role == "tool":
            text = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1]["content"] += "\n" + text  # several results answer one turn
            else:
                out.append({"role": "user", "content": text})
            continue
        content = m.content
        for c in m.tool_calls:
            call = json.dumps({"name": c.name, "arguments": _arguments(c)}, ensure_ascii=False)
            content += ("\n" if content else "") + f"<tool_call>\n{call}\n</tool_call>"
        out.append({"role": m.role, "content": content})
    if tools:
        listing = "\n".join(json.dumps(_tool_json(t), ensure_ascii=False) for t in tools)
        preamble = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                    f"{listing}\n</tools>\n\nFor each function call, return a json object with function name "
                    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out, None


# ---- answers ----


def _call(obj, arguments_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False), new_call_id())


def _calls(objs, arguments_key: str) -> tuple[ToolCall, ...] | None:
    calls = tuple(_call(o, arguments_key) for o in objs)
    return calls if calls and all(calls) else None


def _json_values(text: str) -> list | None:
    """Consecutive JSON values in `text` separated by whitespace or `;` (None: anything else)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)


def parse(text: str, fmt: str) -> ToolCalls | None:
    """The tool calls an auto-mode answer makes, and its remaining content (None: no call)."""
    if fmt == "hermes":
        start = text.find(_HERMES_OPEN)
        if start < 0:
            return None
        bodies = _HERMES_CALL.findall(text, start)
        values = [_json_values(b) for b in bodies]
        if any(v is None or len(v) != 1 for v in values):
            return None
        calls = _calls([v[0] for v in values], "arguments")
        return calls and ToolCalls(calls, text[:start].strip())
    body = text.strip()
    if fmt == "mistral":
        body = body.removeprefix(_MISTRAL_OPEN).lstrip()
        values = _json_values(body) if body.startswith("[") else None
        one_list = values is not None and len(values) == 1 and isinstance(values[0], list)
        calls = _calls(values[0], "arguments") if one_list else None
        return ToolCalls(calls, "") if calls else None
    body = body.removeprefix(_LLAMA_TAG).lstrip()
    values = _json_values(body) if body.startswith("{") else None
    calls = values and _calls(values, "parameters")
    return ToolCalls(calls, "") if calls else None


def forced(text: str, request: GenerationRequest) -> ToolCalls | None:
    """The calls of a grammar-held answer (tool_choice required or a named function)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None  # cut by max_tokens or a stop string before the JSON closed
    if request.tool_choice == "function":
        return ToolCalls((ToolCall(request.tool_name, json.dumps(value, ensure_ascii=False), new_call_id()),), "")
    calls = _calls(value, "parameters") if isinstance(value, list) else None
    return ToolCalls(calls, "") if calls else None


def answer(text: str, request: GenerationRequest, fmt: str) -> ToolCalls | None:
    """The tool calls in a finished answer to `request` (None: none asked for, or none made)."""
    if not request.tools or request.tool_choice == "none":
        return None
    if request.tool_choice == "auto":
        return parse(text, fmt)
    return forced(text, request)


@dataclass
class ContentHoldback:
    """Streaming: which part of the text so far may go out as content now. Text from where a tool
    call may begin is held until the answer ends (and then goes out as content only if no call
    parsed). `whole`: the answer is a call or nothing (forced choices); `at_start`: a call can
    only open the answer (llama3_json, mistral); otherwise a call opens at its marker (hermes)."""

    marker: str
    at_start: bool = False
    whole: bool = False
    sent: int = 0  # characters of the text already released

    @classmethod
    def for_request(cls, request: GenerationRequest, fmt: str) -> ContentHoldback | None:
        if not request.tools or request.tool_choice == "none":
            return None
        if request.tool_choice != "auto":
            return cls("", whole=True)
        if fmt == "hermes":
            return cls(_HERMES_OPEN)
        return cls(_MISTRAL_OPEN if fmt == "mistral" else "{", at_start=True)

    def release(self, text: str) -> str:
        """Newly releasable content, given all the text generated so far."""
        if self.whole:
            return ""
        if self.at_start:
            body = text.lstrip()
            opens = (self.marker, "[") if self.marker == _MISTRAL_OPEN else (self.marker, _LLAMA_TAG)
            if any(o.startswith(body) or body.startswith(o) for o in opens):  # undecided, or a call
                return ""
            end = len(text)
        else:
            found = text.find(self.marker)
            end = found if found >= 0 else len(text) - _partial_suffix(text, self.marker)
        out = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def rest(self, text: str) -> str:
        """At the end, with no call parsed: the held text is content after all."""
        out, self.sent = text[self.sent:], len(text)
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
