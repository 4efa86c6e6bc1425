"""OpenAI bodies <-> the engine's types, both ways. The only module that knows both.

A request becomes a `Plan`: one `GenerationRequest` per choice (`n` per prompt), with the
sampling OpenAI's fields ask for. Fields loradock does not implement are refused here by name
unless they hold their "off" value; identification-only fields (`user`, `metadata`,
`safety_identifier`, `prompt_cache_key`) are accepted and logged at debug level.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from loradock.runtime.tool_calls import ContentHoldback
from loradock.runtime.types import (
    AdapterMixture,
    ChatMessage,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    MixtureComponent,
    SamplingParams,
    StructuredOutput,
    TokenEvent,
    TokenLogprob,
    Tool,
    ToolCall,
)
from pydantic import BaseModel

from .errors import ApiError, bad_request, unsupported
from .models import ServedModel
from .schemas import (
    SEED_LIMIT,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    FunctionCall,
    MessageToolCall,
    TokenizeRequest,
    ToolCallDelta,
    TopLogprob,
    Usage,
    unimplemented_fields,
)
from .schemas import ChatMessage as ChatMessageBody

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}

# What each endpoint acts on; every other field of its schema is `Unimplemented` or identifies
# the caller (tests/http/test_convert.py checks that the three cover the schema).
IDENTIFYING = frozenset({"user", "metadata", "safety_identifier", "prompt_cache_key"})
SHARED_HONOURED = frozenset({"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream",
                             "stream_options", "top_k", "ignore_eos", "mixture", "frequency_penalty",
                             "presence_penalty", "logit_bias", "repetition_penalty", "min_tokens", "stop_token_ids",
                             "structured_outputs"})
CHAT_HONOURED = SHARED_HONOURED | {"messages", "max_completion_tokens", "parallel_tool_calls", "logprobs",
                                   "top_logprobs", "response_format", "tools", "tool_choice"}
COMPLETION_HONOURED = SHARED_HONOURED | {"prompt", "echo", "best_of", "logprobs"}
@dataclass
class Plan:
    """What one HTTP request asks the engine for."""

    model: ServedModel
    requests: list[GenerationRequest]
    prompt_of: list[int]  # choice -> index of its prompt (usage counts each prompt once)
    stream: bool
    include_usage: bool
    # per choice: what to put before the completion (echo): text, or prompt token ids to decode
    echo: list[str | tuple[int, ...]] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


def refuse_unimplemented(body: BaseModel, where: str = "") -> None:
    """400 naming the first `Unimplemented` field of `body` that holds anything but an off value."""
    for name, mark in unimplemented_fields(type(body)).items():
        value = getattr(body, name)
        if not any(value is allowed or (type(value) is type(allowed) and value == allowed) for allowed in mark.off):
            raise unsupported(where + name, mark.why)


def _stream_flags(body) -> tuple[bool, bool]:
    stream = bool(body.stream)
    options = body.stream_options
    if options is None:
        return stream, False
    if not stream:
        raise bad_request("stream_options", "only allowed when stream is true")
    refuse_unimplemented(options, "stream_options.")
    return stream, bool(options.include_usage)


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(s == "" for s in stops):
        raise bad_request("stop", "stop strings must be non-empty")
    return stops


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs; the engine checks the ids and ranges."""
    try:
        return tuple((int(token), value) for token, value in (bias or {}).items())
    except ValueError:
        raise bad_request("logit_bias", "keys must be token ids (integers written as strings)") from None


def _structured(body) -> StructuredOutput | None:
    """OpenAI's response_format (chat) or vLLM's structured_outputs, at most one constraint."""
    given = []
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            given.append(StructuredOutput("json_object"))
        elif response_format.json_schema is None:
            raise bad_request("response_format", "type json_schema needs json_schema: {name, schema}")
        else:
            given.append(StructuredOutput("json_schema", json.dumps(response_format.json_schema.json_schema)))
    if body.structured_outputs is not None:
        s = body.structured_outputs
        fields = [StructuredOutput("json_schema", s.json if isinstance(s.json, str) else json.dumps(s.json))
                  if s.json is not None else None,
                  StructuredOutput("json_object") if s.json_object else None,
                  StructuredOutput("regex", s.regex) if s.regex is not None else None,
                  StructuredOutput("choice", tuple(s.choice)) if s.choice is not None else None,
                  StructuredOutput("grammar", s.grammar) if s.grammar is not None else None]
        chosen = [f for f in fields if f is not None]
        if len(chosen) != 1:
            raise bad_request("structured_outputs", "give exactly one of json, json_object, regex, choice, grammar")
        given += chosen
    if len(given) > 1:
        raise bad_request("structured_outputs", "give response_format or structured_outputs, not both")
    return given[0] if given else None


def _choice_sampling(sampling: SamplingParams, body, choice: int) -> SamplingParams:
    """Choice `choice` of a request with n > 1 draws with the seed + `choice`."""
    return replace(sampling, seed=None if body.seed is None else (body.seed + choice) % SEED_LIMIT)


def _sampling(body, max_tokens: int | None, logprobs: int | None = None,
              prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's sampling (built once; each choice then takes its own seed)."""
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k in (None, -1) else body.top_k,
        stop=_stop(body.stop),
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logit_bias=_logit_bias(body.logit_bias),
        min_tokens=body.min_tokens or 0,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        structured=_structured(body),
    )


def _mixture(body, model: ServedModel) -> AdapterMixture | None:
    """The `mixture` extension (the engine checks the recipe); `model` must then be the base."""
    mix = body.mixture
    if mix is None:
        return None
    if model.ref is not None:
        raise bad_request("mixture", f"give the base as model ('' or its name) when mixing adapters, "
                          f"not {model.id!r}")
    return AdapterMixture(tuple(MixtureComponent(c.adapter, c.weight) for c in mix.components), mix.strategy,
                          mix.density, mix.majority_sign_method, mix.seed)


def _log_identity(body, kind: str) -> None:
    ids = {k: getattr(body, k, None) for k in ("user", "safety_identifier", "prompt_cache_key", "metadata")}
    ids = {k: v for k, v in ids.items() if v}
    if ids:
        log.debug("%s request from %s", kind, ids)


def tokenize_request(body: TokenizeRequest) -> GenerationRequest:
    """What `/tokenize` encodes: the text, or the messages as a chat would render them."""
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("prompt", "give exactly one of prompt, messages")
    if body.prompt is not None:
        return GenerationRequest(prompt=body.prompt)
    return GenerationRequest(messages=_messages(body))


def _messages(body: ChatCompletionRequest | TokenizeRequest) -> tuple[ChatMessage, ...]:
    out = []
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        refuse_unimplemented(m, where + ".")
        if m.name is not None and m.role != "tool":  # a tool message's name is the function: the id says it
            raise unsupported(f"{where}.name", "participant names are not rendered by chat templates")
        if m.tool_calls and m.role != "assistant":
            raise bad_request(f"{where}.tool_calls", "only an assistant's message calls tools")
        if (m.tool_call_id is None) == (m.role == "tool"):
            raise bad_request(f"{where}.tool_call_id", "a tool message answers one call: give its id"
                              if m.role == "tool" else "only a tool message answers a call",
                              code="missing_required_parameter" if m.role == "tool" else None)
        calls = tuple(ToolCall(c.function.name, c.function.arguments, c.id) for c in m.tool_calls or ())
        if m.content is None and not calls:
            raise bad_request(f"{where}.content", "required (text)", code="missing_required_parameter")
        out.append(ChatMessage(ROLES[m.role], _text(m), calls, m.tool_call_id or ""))
    return tuple(out)


def _text(m: ChatMessageBody) -> str:
    """The message's text: its content, or its text parts joined (the schema admits no others)."""
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    return "".join(part.text for part in m.content)


def _tools(body: ChatCompletionRequest) -> dict:
    """The GenerationRequest fields of tool calling (the engine checks names and schemas)."""
    tools = tuple(Tool(t.function.name, t.function.description or "",
                       "" if t.function.parameters is None else json.dumps(t.function.parameters))
                  for t in body.tools or ())
    choice, name = body.tool_choice or ("auto" if tools else "none"), ""
    if not isinstance(choice, str):
        choice, name = "function", choice.function.name
    if choice != "none" and not tools:
        raise bad_request("tool_choice", f"{name or choice!r} needs tools")
    return {"tools": tools, "tool_choice": choice, "tool_name": name,
            "parallel_tool_calls": body.parallel_tool_calls is not False}


def chat_plan(body: ChatCompletionRequest, model: ServedModel) -> Plan:
    """Raises ApiError 400 naming the field for anything loradock cannot honour."""
    refuse_unimplemented(body)
    stream, include_usage = _stream_flags(body)
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise bad_request("max_completion_tokens", "give max_completion_tokens or max_tokens, not both")
    # OpenAI's default: until the context is full (None); a given value must fit the context.
    max_tokens = body.max_completion_tokens or body.max_tokens
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs", "needs logprobs: true")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    messages = _messages(body)
    _log_identity(body, "chat")
    n = body.n or 1
    plan = Plan(model, [], [0] * n, stream, include_usage)
    mixture = _mixture(body, model)
    sampling = _sampling(body, max_tokens, logprobs)
    tools = _tools(body)
    plan.requests = [GenerationRequest(adapter=model.ref, mixture=mixture, messages=messages,
                                       sampling=_choice_sampling(sampling, body, i), request_id=f"{plan.id}-{i}",
                                       **tools)
                     for i in range(n)]
    return plan


def completion_plan(body: CompletionRequest, model: ServedModel) -> Plan:
    refuse_unimplemented(body)
    stream, include_usage = _stream_flags(body)
    n = body.n or 1
    if body.best_of not in (None, n):
        raise unsupported("best_of", "ranking candidates needs log probabilities; use n")
    prompts = _prompts(body.prompt)
    prompt_logprobs = body.logprobs if body.echo else None  # echo + logprobs: the prompt's too
    if prompt_logprobs is not None and stream:
        raise unsupported("echo", "the prompt's log probabilities (echo with logprobs) are not streamed; ask "
                                  "without stream")
    max_tokens = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
    _log_identity(body, "completion")
    sampling = _sampling(body, max_tokens, body.logprobs, prompt_logprobs)
    plan = Plan(model, [], [], stream, include_usage)
    mixture = _mixture(body, model)
    for p, prompt in enumerate(prompts):
        for j in range(n):
            choice = len(plan.requests)
            text = prompt if isinstance(prompt, str) else None
            ids = None if isinstance(prompt, str) else tuple(prompt)
            plan.requests.append(GenerationRequest(adapter=model.ref, mixture=mixture, prompt=text,
                                                   prompt_token_ids=ids,
                                                   sampling=_choice_sampling(sampling, body, j),
                                                   request_id=f"{plan.id}-{choice}"))
            plan.prompt_of.append(p)
            plan.echo.append((prompt if isinstance(prompt, str) else tuple(prompt)) if body.echo else "")
    return plan


def _prompts(prompt: str | list) -> list[str | list[int]]:
    """One prompt or several: a string, a list of strings, a list of ids, a list of id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt", "must not be empty")
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    for i, p in enumerate(prompt):
        if not p:
            raise bad_request(f"prompt[{i}]", "must not be empty")
    return list(prompt)


# ---- results ----


def finish_reason(result: GenerationResult, request: GenerationRequest | None = None) -> str:
    """OpenAI's finish reasons: EOS and stop strings are both "stop"; an answer that called tools
    is "tool_calls" (a named tool_choice, as OpenAI, "stop")."""
    if result.tool_calls is not None and (request is None or request.tool_choice != "function"):
        return "tool_calls"
    return "length" if result.finish_reason is FinishReason.LENGTH else "stop"


def _tool_calls_out(result: GenerationResult) -> list[MessageToolCall] | None:
    if result.tool_calls is None:
        return None
    return [MessageToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in result.tool_calls.calls]


def assistant_message(result: GenerationResult) -> AssistantMessage:
    """The answer as a message: its text, or its tool calls and the text around them (null if none)."""
    if result.tool_calls is None:
        return AssistantMessage(content=result.text)
    return AssistantMessage(content=result.tool_calls.content or None, tool_calls=_tool_calls_out(result))


def usage(plan: Plan, results: Sequence[GenerationResult]) -> Usage:
    """Every prompt counted once (as OpenAI does for n > 1), every choice's completion tokens."""
    prompt_tokens = {plan.prompt_of[i]: r.prompt_tokens for i, r in enumerate(results)}
    prompt = sum(prompt_tokens.values())
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def served_id(plan: Plan, result: GenerationResult | None) -> str:
    """The concrete `name@N` that served it (the base: its name)."""
    if result is not None and result.adapter is not None:
        return result.adapter.ref
    return plan.model.id


class TokenTexts:
    """A token's text as OpenAI's log probabilities show it: the token decoded alone (cached)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._text = functools.lru_cache(maxsize=1 << 16)(lambda token_id: tokenizer.decode([token_id]))

    def __call__(self, token_id: int) -> str:
        return self._text(token_id)

    def echoed(self, echo: str | tuple[int, ...]) -> str:
        """An echoed prompt as text (a prompt given as token ids, decoded)."""
        return echo if isinstance(echo, str) else self._tokenizer.decode(list(echo))


def chat_logprobs(logprobs: Sequence[TokenLogprob] | None, texts: TokenTexts) -> ChatLogprobs | None:
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = texts(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return ChatLogprobs(content=[ChatTokenLogprob(**entry(lp.token_id, lp.logprob),
                                                  top_logprobs=[TopLogprob(**entry(i, v)) for i, v in lp.top])
                                 for lp in logprobs])


def completion_logprobs(logprobs: Sequence[TokenLogprob] | None, texts: TokenTexts, offset: int,
                        prompt: GenerationResult | None = None) -> CompletionLogprobs | None:
    """The legacy completions shape; `offset`: where the first token's text starts in the choice.
    With `prompt` (echo): its prompt tokens first, the first one with no log probability."""
    if logprobs is None:
        return None
    entries: list[tuple[int, TokenLogprob | None]] = []
    if prompt is not None and prompt.prompt_logprobs is not None:
        entries = list(zip(prompt.prompt_token_ids, prompt.prompt_logprobs, strict=True))
        offset = 0
    entries += [(lp.token_id, lp) for lp in logprobs]
    tokens = [texts(token_id) for token_id, _ in entries]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp and lp.logprob for _, lp in entries],
                              top_logprobs=[lp and {texts(i): v for i, v in lp.top} for _, lp in entries],
                              text_offset=offsets[:len(tokens)])


def chat_completion(plan: Plan, results: Sequence[GenerationResult], created: int,
                    texts: TokenTexts) -> ChatCompletion:
    return ChatCompletion(
        id=f"chatcmpl-{plan.id}", created=created, model=served_id(plan, results[0]),
        choices=[ChatChoice(index=i, message=assistant_message(r), logprobs=chat_logprobs(r.logprobs, texts),
                            finish_reason=finish_reason(r, plan.requests[i])) for i, r in enumerate(results)],
        usage=usage(plan, results),
    )


def completion(plan: Plan, results: Sequence[GenerationResult], created: int, texts: TokenTexts) -> Completion:
    return Completion(
        id=f"cmpl-{plan.id}", created=created, model=served_id(plan, results[0]),
        choices=[CompletionChoice(index=i, text=echo + r.text, finish_reason=finish_reason(r),
                                  logprobs=completion_logprobs(r.logprobs, texts, len(echo), r))
                 for i, (r, echo) in enumerate(zip(results, map(texts.echoed, plan.echo), strict=True))],
        usage=usage(plan, results),
    )


class ChunkWriter:
    """Streamed chunks of one plan, as JSON text (one SSE `data:` each)."""

    def __init__(self, plan: Plan, created: int, chat: bool, texts: TokenTexts, tool_format: str = "hermes") -> None:
        self.plan = plan
        self.created = created
        self.chat = chat
        self.texts = texts
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{plan.id}"
        self.echo = [texts.echoed(echo) for echo in plan.echo]
        self.offsets = [len(echo) for echo in self.echo]  # completions: text written so far per choice
        # chat with tools: the text so far per choice, and what of it may go out as content
        self.so_far = [""] * len(plan.requests)
        self.holdbacks = [ContentHoldback.for_request(r, tool_format) if chat else None for r in plan.requests]

    def _dump(self, choices: list, usage_: Usage | None = None) -> str:
        cls = ChatCompletionChunk if self.chat else Completion
        chunk = cls(id=self.id, created=self.created, model=self.plan.model.id, choices=choices, usage=usage_)
        return chunk.model_dump_json(exclude=None if self.plan.include_usage else {"usage"})

    def opening(self, index: int) -> str | None:
        """Before a choice's first token: the role (chat) or the echoed prompt (completions)."""
        if self.chat:
            return self._dump([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
        if self.echo[index]:
            return self._dump([CompletionChoice(index=index, text=self.echo[index])])
        return None

    def token(self, index: int, event: TokenEvent) -> str | None:
        """The token's chunk (None: a tool call may be starting, so its text waits for the end)."""
        logprobs = None if event.logprob is None else [event.logprob]
        if self.chat:
            text, holdback = event.text, self.holdbacks[index]
            if holdback is not None:
                self.so_far[index] += text
                text = holdback.release(self.so_far[index])
                if not text and logprobs is None:
                    return None
            return self._dump([ChatChunkChoice(index=index, delta=ChatDelta(content=text),
                                               logprobs=chat_logprobs(logprobs, self.texts))])
        choice = CompletionChoice(index=index, text=event.text,
                                  logprobs=completion_logprobs(logprobs, self.texts, self.offsets[index]))
        self.offsets[index] += len(event.text)
        return self._dump([choice])

    def finished(self, index: int, result: GenerationResult) -> list[str]:
        """The choice's last chunks: held text or tool calls, then its finish reason."""
        reason = finish_reason(result, self.plan.requests[index])
        if not self.chat:
            return [self._dump([CompletionChoice(index=index, text="", finish_reason=reason)])]
        out, holdback = [], self.holdbacks[index]
        if result.tool_calls is not None:
            calls = [ToolCallDelta(index=i, id=c.id, function=c.function)
                     for i, c in enumerate(_tool_calls_out(result))]
            out.append(self._dump([ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=calls))]))
        elif holdback is not None and (rest := holdback.rest(self.so_far[index])):
            out.append(self._dump([ChatChunkChoice(index=index, delta=ChatDelta(content=rest))]))
        out.append(self._dump([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason)]))
        return out

    def usage(self, results: Sequence[GenerationResult]) -> str:
        return self._dump([], usage(self.plan, results))


def error_event(error: ApiError) -> str:
    """An error after the stream started (its status is already 200): OpenAI clients raise it."""
    return error.body().model_dump_json()
