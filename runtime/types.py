"""Plain request / result types the engine speaks. No protobuf here: the gRPC edge
(`runtime/server/convert.py`) maps these to and from the wire types."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field

STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """What the answer must be: `kind` json_schema (value: the schema as JSON text), json_object
    (any JSON object; value ""), regex (value: the expression), choice (value: the strings) or
    grammar (value: EBNF with a `root` rule)."""

    kind: str
    value: str | tuple[str, ...] = ""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. The defaults are greedy decoding."""

    max_new_tokens: int | None = 64  # None: until the context is full (max_model_len)
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks generate exactly max_new_tokens
    # None: no log probabilities; k: each generated token's and its k most likely alternatives'
    logprobs: int | None = None
    # The same for each prompt token after the first (what the model predicted there), as vLLM's
    # prompt_logprobs: a request asking for them takes nothing from the prefix cache.
    prompt_logprobs: int | None = None
    # Logits processors, applied in this order before temperature (OpenAI's and vLLM's meaning):
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output (HF's rule)
    frequency_penalty: float = 0.0  # minus this x each token's count in the output so far
    presence_penalty: float = 0.0  # minus this for each token that occurs in the output so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added
    min_tokens: int = 0  # end-of-sequence and stop_token_ids are impossible before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # also end the sequence (finish reason STOP)
    structured: StructuredOutput | None = None  # the answer held to a schema, regex, choice or grammar


@dataclass(frozen=True)
class Tool:
    """A function the model may call (OpenAI's `tools[].function`)."""

    name: str
    description: str = ""
    parameters: str = ""  # its arguments' JSON schema, as JSON text ("": no arguments)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = ""


@dataclass(frozen=True)
class ToolCalls:
    """The tool calls parsed from an answer and the rest of its text (the message's content)."""

    calls: tuple[ToolCall, ...]
    content: str


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's earlier calls
    tool_call_id: str = ""  # a tool message: the call it answers


@dataclass(frozen=True)
class MixtureComponent:
    adapter: str  # registry reference
    weight: float


@dataclass(frozen=True)
class AdapterMixture:
    """A weighted set of adapters served as one adapter, merged as PEFT's `add_weighted_adapter`
    merges them (`runtime/adapter_merge.py`). `density` is for ties / dare_*, `seed` for DARE."""

    components: tuple[MixtureComponent, ...]
    strategy: str = "linear"  # linear | cat | svd | ties | dare_linear | dare_ties
    density: float | None = None
    majority_sign_method: str = "total"  # total | frequency
    seed: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    """One request. Exactly one of `prompt`, `messages`, `prompt_token_ids` is given.

    `adapter` is a registry reference (`name`, `name@3`, `name@alias`); None or ""
    means the base model alone. `mixture`, instead of `adapter`, serves a weighted merge of
    several adapters. `messages` are rendered with the base's chat template; `prompt` is used
    verbatim.
    """

    adapter: str | None = None
    mixture: AdapterMixture | None = None
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    prompt_token_ids: tuple[int, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Tool calling (chat messages only): the functions offered, rendered by the chat template, and
    # whether the model may (auto), must not (none), must (required) call one, or must call
    # `tool_name` (function). The result's tool_calls holds what it called.
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"
    tool_name: str = ""
    parallel_tool_calls: bool = True
    # A weighted alias (canary) sends a request with this key always to the same version (a
    # stable hash of the key); without one, at random by the weights.
    route_key: str = ""


class FinishReason(enum.Enum):
    EOS = "eos"
    STOP = "stop"  # a stop string matched
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class ResolvedAdapter:
    """The concrete version a request was served with."""

    name: str
    version: int
    digest: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


MIXTURE_PREFIX = "mixture-"


@dataclass(frozen=True)
class ResolvedMixture(ResolvedAdapter):
    """A mixture with its components resolved to concrete versions: the cache key of the merged
    adapter. `name` is "mixture-" + the start of `digest`, a sha256 over the canonical recipe, so
    identical recipes share one cache entry; `version` is 0."""

    components: tuple[tuple[ResolvedAdapter, float], ...] = ()
    strategy: str = "linear"
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int = 0

    @property
    def ref(self) -> str:
        return self.name


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability and its most likely alternatives', from the model's
    logits for that step (after the adapter; before temperature, top-k and top-p: vLLM's raw
    logprobs)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class TokenEvent:
    """One step's output for one request, streamed as soon as it is produced."""

    request_id: str
    token_id: int
    text: str  # newly completed text (may be "" while a multi-byte character is incomplete)
    index: int  # 0-based position among the generated tokens
    logprob: TokenLogprob | None = None  # when the request asked for log probabilities


@dataclass(frozen=True)
class Timings:
    queue_ms: float  # submit -> admitted
    ttft_ms: float  # submit -> first token
    total_ms: float  # submit -> finished


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    adapter: ResolvedAdapter | None  # None when served by the base alone
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per generated token, when asked for
    # one per prompt token, the first None (nothing predicts it), when asked for
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    prompt_token_ids: tuple[int, ...] = ()  # the prompt as served (chat template applied)
    tool_calls: ToolCalls | None = None  # the tools the answer called (None: no call, or no tools offered)


@dataclass(frozen=True)
class ResidentAdapter:
    """An adapter version held by the engine: in a device slot and/or in host memory."""

    adapter: ResolvedAdapter
    tier: str  # "device" | "host"
    slot: int | None  # device slot index (None on the host tier)
    in_use: int  # running sequences using it (device tier)
    pinned: bool  # kept resident by load_adapter(pin=True)
    bytes: int  # host-memory size of its weights (0 when only the device copy remains)


@dataclass(frozen=True)
class EngineInfo:
    """What is served and with which capacities."""

    base_name: str
    base_fingerprint: str
    quantization: str  # "nf4" | "int8" | "none"
    device: str
    dtype: str  # activations and LoRA buffers
    compute_dtype: str  # the quantized base's matmuls (what runs, on every CPU kind)
    max_slots: int
    max_rank: int
    host_cache_bytes: int
    max_host_adapters: int
    max_running: int
    max_batch_tokens: int
    max_queue: int
    max_prompt_tokens: int
    max_model_len: int
    kv_cache_tokens: int
    lora_ops: str
    tool_call_parser: str  # how tool calls are rendered and parsed (runtime/tool_calls.py)
    vocab_size: int  # token ids are in [0, vocab_size)
    attention: str = "sdpa"  # the attention backend in use ("sdpa", "triton"; a fallback says why)
    compile: str = "off"  # the forward under torch.compile: "on", "off" (a failed compile says why)
