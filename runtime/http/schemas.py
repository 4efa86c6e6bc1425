"""The OpenAI request and response bodies, as pydantic models (the HTTP edge's only schemas).

Requests list every field OpenAI defines. Fields loradock implements are typed and checked
here; fields it does not implement are typed `Any` and refused by `convert.py` unless they
hold their "off" value, so nothing a client asks for is silently ignored. Fields that are in
neither list are refused by pydantic (`extra="forbid"`), except the two vLLM extensions
loradock honours, `top_k` and `ignore_eos`, and its own `mixture` (a weighted merge of adapters).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

SEED_LIMIT = 2**63


class _Request(BaseModel):
    # strict: no "4" or 4.0 taken as an integer, no "true" as a boolean (an int is still a float)
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = None
    """Send one more chunk before `data: [DONE]` with `choices: []` and the request's usage."""
    include_obfuscation: Any = None  # random padding against side channels: refused when true


class FunctionCall(_Request):
    name: str = Field(min_length=1)
    arguments: str = Field(description="the arguments as a JSON object, in text")


class MessageToolCall(_Request):
    """A call an assistant made earlier in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    """One message. `content` is a string or a list of `{"type": "text", "text": ...}` parts; an
    assistant message that called tools may have no content; a `tool` message answers the call
    `tool_call_id`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(None, description="a tool message: the function that answered (the others: refused)")
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None


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
    adapter: str = Field(description="a registry reference: name, name@N or name@alias")
    weight: float = Field(description="> 0")


class Mixture(_Request):
    """loradock's extension: serve a weighted merge of adapters instead of one (PEFT's
    add_weighted_adapter semantics; `model` then names the base)."""

    components: list[MixtureComponent] = Field(min_length=1)
    strategy: str = Field("linear", description="linear | cat | svd | ties | dare_linear | dare_ties")
    density: float | None = Field(None, description="fraction kept by ties and dare_*, in (0, 1]")
    majority_sign_method: str = Field("total", description="ties and dare_ties: total | frequency")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="seed of DARE's random pruning")


class JsonSchemaFormat(_Request):
    name: str = Field(max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema", description="the JSON schema the answer must satisfy")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's extension (exactly one field): the answer matches a JSON schema, any JSON object, a
    regular expression, one of some strings, or an EBNF grammar with a `root` rule."""

    json: dict[str, Any] | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None


class _Sampling(_Request):
    """Fields chat and text completions share."""

    model: str = Field(description="a registry reference (name, name@N, name@alias), the base's "
                       "name or '' for the base, or BASE:ADAPTER")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="minus this x each token's count "
                                            "in the output so far")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="minus this for each token in the "
                                           "output so far")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100] "
                                                "added to its logit")
    # vLLM's extensions, honoured
    top_k: int | None = Field(None, ge=-1, description="keep the k most likely tokens (0 or -1: off)")
    ignore_eos: bool | None = Field(None, description="generate max_tokens tokens even past EOS")
    repetition_penalty: float | None = Field(None, gt=0, description="> 1 discourages tokens of the prompt and "
                                             "the output (1: off)")
    min_tokens: int | None = Field(None, ge=0, description="no end of sequence before this many tokens")
    stop_token_ids: list[int] | None = Field(None, description="token ids that also end the answer")
    structured_outputs: StructuredOutputs | None = None
    # loradock's extension
    mixture: Mixture | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="return each generated token's log probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and this many most likely alternatives "
                                     "per token (needs logprobs: true)")
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call (tool_choice required)")
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    store: Any = None
    service_tier: Any = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Any = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, several texts, token ids, or several lists of token ids")
    echo: bool | None = None
    best_of: Any = None
    logprobs: int | None = Field(None, ge=0, le=5, description="return each generated token's log probability "
                                 "and this many most likely alternatives")
    suffix: Any = None


class TokenizeRequest(_Request):
    """vLLM's: a text, or chat messages rendered with the base's chat template (one of them)."""

    model: str = Field("", description="as in a completion; every model here shares the base's tokenizer")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Request):
    model: str = ""
    tokens: list[int] = Field(min_length=1)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionInfo(BaseModel):
    version: str


class LoadLoraAdapterRequest(_Request):
    """vLLM's body: publish the PEFT directory `lora_path` (on the server) as a new version of
    `lora_name`, then load it."""

    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(_Request):
    """Drop what `lora_name` (any reference) means now from the engine's caches."""

    lora_name: str


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


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, in text")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="null when the answer is only tool calls")
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None


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


class ToolCallDelta(BaseModel):
    """A streamed tool call: each call comes whole, in one delta."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


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


class ModelCard(BaseModel):
    id: str = Field(description="what to pass as `model`: the base's name, name, name@alias or name@N")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loradock"
    root: str = Field(description="the concrete name@N this id means now (the base: its own name)")
    parent: str | None = Field(None, description="the base model an adapter runs on")
    max_model_len: int = Field(description="tokens of context: the prompt plus max_tokens must fit")
    max_prompt_tokens: int = Field(description="the longest prompt accepted, in tokens")


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
