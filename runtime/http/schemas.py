"""The OpenAI request and response bodies, as pydantic models (the HTTP edge's only schemas).

Requests list every field OpenAI defines. Fields loradock implements are typed and checked
here; fields it does not implement are marked `Unimplemented` with their "off" values, which
the OpenAPI document shows as the only ones allowed, and `convert.py` refuses anything else by
name, so nothing a client asks for is silently ignored. Fields that are in neither list are
refused by pydantic (`extra="forbid"`), except vLLM's extensions loradock honours and its own
`mixture` (a weighted merge of adapters). Rules between fields (both max_tokens and
max_completion_tokens, top_logprobs without logprobs, ...) are in the document too, as JSON
Schema `not` / `if`-`then`, and checked by `convert.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_serializer

SEED_LIMIT = 2**63


def _whole_number(value: Any) -> Any:
    """JSON Schema's integers include 4.0, so a whole float is taken as its integer (a string
    such as "4" or a boolean still is not)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(schema: dict | None = None, **bounds: int) -> Any:
    """An integer within `bounds` (ge, gt, le, lt); whole floats count. The bounds sit inside the
    annotation, before the validator, so that the schema shows them as minimum / maximum."""
    return Annotated[int, Field(json_schema_extra=schema, **bounds), BeforeValidator(_whole_number)]


NonEmpty = Annotated[str, Field(min_length=1)]
TOKEN_ID_MARK = "x-loradock-token-id"  # openapi.py turns it into the served vocabulary's maximum
TokenId = Int({TOKEN_ID_MARK: True}, ge=0)


@dataclass(frozen=True)
class Unimplemented:
    """Marks a field loradock does not implement: it accepts only the values in `off` (the first
    is the default) and refuses anything else saying `why` (convert.refuse_unimplemented)."""

    why: str
    off: tuple = (None,)

    def __get_pydantic_json_schema__(self, core_schema, handler) -> dict:
        return {"anyOf": [{"type": "null"} if v is None else {"const": v} for v in self.off],
                "description": f"not implemented by loradock ({self.why}): only its off value"}


def unimplemented(why: str, *off) -> Any:
    """The annotation of an unimplemented field whose off values are None and `off`."""
    return Annotated[Any, Unimplemented(why, (None, *off))]


def unimplemented_fields(model: type[BaseModel]) -> dict[str, Unimplemented]:
    return {name: mark for name, info in model.model_fields.items()
            for mark in info.metadata if isinstance(mark, Unimplemented)}


def _implies(field: str, value_schema: dict, then: dict) -> dict:
    """JSON Schema: if `field` is present with a value matching `value_schema`, `then` holds."""
    return {"if": {"properties": {field: value_schema}, "required": [field]}, "then": then}


def _not_both(a: str, b: str) -> dict:
    non_null = {"not": {"type": "null"}}
    return {"not": {"properties": {a: non_null, b: non_null}, "required": [a, b]}}


class _Request(BaseModel):
    # strict: no "4" or 4.0 taken as an integer, no "true" as a boolean (an int is still a float)
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = None
    """Send one more chunk before `data: [DONE]` with `choices: []` and the request's usage."""
    include_obfuscation: unimplemented("no obfuscation padding", False) = None


class FunctionCall(_Request):
    name: str = Field(min_length=1)
    arguments: str = Field(description="the arguments as a JSON object, in text")


class MessageToolCall(_Request):
    """A call an assistant made (in an answer, or earlier in the conversation)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Request):
    type: Literal["text"]
    text: str


_NULL = {"type": "null"}
_PRESENT = {"not": _NULL}


class ChatMessage(_Request):
    """One message. `content` is a string or a list of `{"type": "text", "text": ...}` parts; an
    assistant message that called tools may have no content; a `tool` message answers the call
    `tool_call_id`."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"role": {"const": "tool"}}},
         "then": {"properties": {"tool_call_id": {"type": "string"}, "content": _PRESENT},
                  "required": ["tool_call_id", "content"]},
         "else": {"properties": {"tool_call_id": _NULL, "name": _NULL}}},
        {"if": {"properties": {"role": {"const": "assistant"}}},
         "then": {"anyOf": [{"properties": {"content": _PRESENT}, "required": ["content"]},
                            {"properties": {"tool_calls": {"type": "array", "minItems": 1}},
                             "required": ["tool_calls"]}]},
         "else": {"properties": {"tool_calls": _NULL, "content": _PRESENT}, "required": ["content"]}},
    ]})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, description="text (images and audio are not served)")
    name: str | None = Field(None, description="a tool message: the function that answered (the others: refused)")
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    function_call: unimplemented("no legacy function calling; use tool_calls") = None
    refusal: unimplemented("not an input field") = None
    audio: unimplemented("text only") = None


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="the arguments' JSON schema (none: no arguments)")
    strict: bool | None = Field(None, description="accepted; the arguments are held to the schema when "
                                "tool_choice is required or names the function")


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    """Call this function (the answer is held to its parameters' schema)."""

    type: Literal["function"]
    function: FunctionName


class MixtureComponent(_Request):
    adapter: NonEmpty = Field(description="a registry reference: name, name@N or name@alias")
    weight: float = Field(gt=0)


class Mixture(_Request):
    """loradock's extension: serve a weighted merge of adapters instead of one (PEFT's
    add_weighted_adapter semantics; `model` then names the base)."""

    components: list[MixtureComponent] = Field(min_length=1)
    strategy: Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"] = "linear"
    density: float | None = Field(None, gt=0, le=1, description="fraction kept by ties and dare_*")
    majority_sign_method: Literal["total", "frequency"] = Field("total", description="ties and dare_ties")
    seed: Int(ge=0, lt=SEED_LIMIT) = Field(0, description="seed of DARE's random pruning")


class JsonSchemaFormat(_Request):
    name: str = Field(max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema", description="the JSON schema the answer must satisfy")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(json_schema_extra=_implies(
        "type", {"const": "json_schema"}, {"properties": {"json_schema": _PRESENT}, "required": ["json_schema"]}))

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


_STRUCTURED = ("json", "json_object", "regex", "choice", "grammar")


class StructuredOutputs(_Request):
    """vLLM's extension (exactly one field): the answer matches a JSON schema, any JSON object, a
    regular expression, one of some strings, or an EBNF grammar with a `root` rule."""

    json: dict[str, Any] | str | None = None
    json_object: Literal[True] | None = None
    regex: str | None = None
    choice: list[NonEmpty] | None = Field(None, min_length=1)
    grammar: str | None = None

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"properties": {name: _PRESENT}, "required": [name]} for name in _STRUCTURED]})


_STREAM_OPTIONS_NEED_STREAM = _implies("stream_options", {"type": "object"},
                                      {"properties": {"stream": {"const": True}}, "required": ["stream"]})


class _Sampling(_Request):
    """Fields chat and text completions share."""

    model: str = Field(description="a registry reference (name, name@N, name@alias), the base's "
                       "name or '' for the base, or BASE:ADAPTER")
    max_tokens: Int(ge=1) | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Int(ge=1, le=128) | None = None
    seed: Int(ge=0, lt=SEED_LIMIT) | None = None
    stop: NonEmpty | list[NonEmpty] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="identifies the caller; also keeps them on one version of a "
                             "canary alias (the X-Loradock-Route-Key header, when given, does instead)")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="minus this x each token's count "
                                            "in the output so far")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="minus this for each token in the "
                                           "output so far")
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]+$")], Annotated[float, Field(ge=-100, le=100)]] | None = \
        Field(None, description="token id (as a string) -> bias added to its logit")
    # vLLM's extensions, honoured
    top_k: Int(ge=-1) | None = Field(None, description="keep the k most likely tokens (0 or -1: off)")
    ignore_eos: bool | None = Field(None, description="generate max_tokens tokens even past EOS")
    repetition_penalty: float | None = Field(None, ge=0.01, le=100, description="> 1 discourages tokens of the "
                                             "prompt and the output (1: off)")
    min_tokens: Int(ge=0) | None = Field(None, description="no end of sequence before this many tokens")
    stop_token_ids: list[TokenId] | None = Field(None, description="token ids that also end the answer")
    structured_outputs: StructuredOutputs | None = None
    # vLLM's extensions, accepted at their defaults only
    min_p: unimplemented("no min-p cut; use top_p or top_k", 0, 0.0) = None
    skip_special_tokens: unimplemented("special tokens are always left out of the text", True) = None
    spaces_between_special_tokens: unimplemented("special tokens are left out of the text", True) = None
    include_stop_str_in_output: unimplemented("the stop string is never part of the text", False) = None
    length_penalty: unimplemented("no beam search", 1, 1.0) = None
    use_beam_search: unimplemented("no beam search", False) = None
    truncate_prompt_tokens: unimplemented("a prompt over max_prompt_tokens is refused, not cut") = None
    allowed_token_ids: unimplemented("use logit_bias") = None
    bad_words: unimplemented("use logit_bias", []) = None
    priority: unimplemented("one priority", 0) = None
    return_tokens_as_token_ids: unimplemented("tokens are shown as text", False) = None
    prompt_logprobs: unimplemented("use /v1/completions with echo and logprobs") = None
    # loradock's extension
    mixture: Mixture | None = None


class ChatCompletionRequest(_Sampling):
    # At most four such rules: schemathesis' generator gives up on more (so "not with
    # structured_outputs" is said in response_format's description only).
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _STREAM_OPTIONS_NEED_STREAM,
        _not_both("max_tokens", "max_completion_tokens"),
        _implies("top_logprobs", {"type": "integer"}, {"properties": {"logprobs": {"const": True}},
                                                       "required": ["logprobs"]}),
        _implies("tool_choice", {"anyOf": [{"enum": ["auto", "required"]}, {"type": "object"}]},
                 {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"]}),
    ]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int(ge=1) | None = None
    logprobs: bool | None = Field(None, description="return each generated token's log probability")
    top_logprobs: Int(ge=0, le=20) | None = Field(None, description="and this many most likely alternatives "
                                     "per token (needs logprobs: true)")
    response_format: ResponseFormat | None = Field(None, description="not with structured_outputs")
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call (tool_choice required)")
    functions: unimplemented("no legacy function calling; use tools", []) = None
    function_call: unimplemented("no legacy function calling; use tool_choice", "none") = None
    audio: unimplemented("text only") = None
    modalities: unimplemented("text only", ["text"]) = None
    prediction: unimplemented("no predicted outputs") = None
    reasoning_effort: unimplemented("the served models do not reason") = None
    verbosity: unimplemented("no verbosity control") = None
    web_search_options: unimplemented("no web search") = None
    store: unimplemented("completions are not stored", False) = None
    service_tier: unimplemented("one service tier", "auto", "default") = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: unimplemented("prompts are not cached") = None
    # vLLM's chat extensions, accepted at their defaults only
    add_generation_prompt: unimplemented("the assistant's turn is always opened", True) = None
    continue_final_message: unimplemented("the assistant's turn is always a new one", False) = None
    echo: unimplemented("use /v1/completions with echo", False) = None
    add_special_tokens: unimplemented("the chat template places the special tokens", False) = None
    chat_template: unimplemented("the base's own chat template renders every chat") = None
    chat_template_kwargs: unimplemented("the base's own chat template renders every chat", {}) = None
    documents: unimplemented("no document rendering; put documents in a message") = None
    guided_json: unimplemented("vLLM's older name; use structured_outputs or response_format") = None
    guided_regex: unimplemented("vLLM's older name; use structured_outputs") = None
    guided_choice: unimplemented("vLLM's older name; use structured_outputs") = None
    guided_grammar: unimplemented("vLLM's older name; use structured_outputs") = None


class CompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _STREAM_OPTIONS_NEED_STREAM,
        {"not": {"properties": {"echo": {"const": True}, "logprobs": {"type": "integer"},
                                "stream": {"const": True}}, "required": ["echo", "logprobs", "stream"]}},
    ]})

    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] \
            | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)] = Field(
        description="text, several texts, token ids, or several lists of token ids")
    echo: bool | None = None
    best_of: Int(ge=1) | None = Field(None, description="only equal to n (candidates are not ranked)")
    logprobs: Int(ge=0, le=5) | None = Field(None, description="return each generated token's log probability "
                                 "and this many most likely alternatives")
    suffix: unimplemented("no insertion (suffix) mode", "") = None


class TokenizeRequest(_Request):
    """vLLM's: a text, or chat messages rendered with the base's chat template (one of them)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"properties": {name: _PRESENT}, "required": [name]} for name in ("prompt", "messages")]})

    model: str = Field("", description="as in a completion; every model here shares the base's tokenizer")
    prompt: NonEmpty | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Request):
    model: str = ""
    tokens: list[TokenId] = Field(min_length=1)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionInfo(BaseModel):
    version: str


class LoadLoraAdapterRequest(_Request):
    """vLLM's body: publish the PEFT directory `lora_path` (on the server) as a new version of
    `lora_name`, then load it."""

    lora_name: NonEmpty
    lora_path: NonEmpty


class UnloadLoraAdapterRequest(_Request):
    """Drop what `lora_name` (any reference) means now from the engine's caches."""

    lora_name: NonEmpty


# ---- responses ----


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="the token's text as UTF-8")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """Log probabilities from the model's logits (after the adapter; before temperature, top-k, top-p)."""

    content: list[ChatTokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """With echo, the prompt's tokens come first; the first has no log probability (null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="null when the answer is only tool calls")
    refusal: None = None
    tool_calls: list[MessageToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="the concrete name@N (or the base's name) that served it")
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallDelta(MessageToolCall):
    """A streamed tool call: each call comes whole, in one delta."""

    index: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer
    def _present_only(self) -> dict:  # OpenAI omits what a delta does not carry
        out = {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}
        if self.tool_calls is not None:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return out


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A text completion, and also each streamed chunk of one (OpenAI uses one object type)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class EvalSummary(BaseModel):
    metric: str = Field(description="exact, contains, regex or rouge-l")
    score: float = Field(description="the version's mean score, in [0, 1]")
    base_score: float | None = Field(None, description="the base model's on the same data, when compared")
    examples: int
    dataset: str = Field(description="the held-out file's name")
    dataset_digest: str = Field(description="its sha256")
    time: str = Field(description="when it was recorded (ISO 8601, UTC)")


class ModelCard(BaseModel):
    id: str = Field(description="what to pass as `model`: the base's name, name, name@alias or name@N")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loradock"
    root: str = Field(description="the concrete name@N this id means now (the base: its own name)")
    parent: str | None = Field(None, description="the base model an adapter runs on")
    max_model_len: int = Field(description="tokens of context: the prompt plus max_tokens must fit")
    max_prompt_tokens: int = Field(description="the longest prompt accepted, in tokens")
    evals: list[EvalSummary] = Field(default_factory=list, description="an adapter version's newest evaluation "
                                     "per metric (`loradock adapters eval`)")
    residency: Literal["device", "host", "disk"] | None = Field(
        None, description="where an adapter version is now: a device slot, host memory, or only the registry")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class LoraAdapterLoaded(BaseModel):
    id: str = Field(description="the new version, name@N")
    lora_name: str
    version: int
    digest: str
    load_ms: float
    message: str


class LoraAdapterUnloaded(BaseModel):
    id: str
    was_resident: bool
    message: str


class Health(BaseModel):
    status: Literal["loading", "serving", "draining"]
