"""protobuf <-> plain types, both ways. The only module that knows both.

The server uses the `*_from_proto` request and `*_to_proto` response halves; the
client uses the opposite halves, so both ends agree on one mapping.
"""

from __future__ import annotations

import dataclasses

from loradock.proto.loradock.v1 import runtime_pb2 as pb
from loradock.runtime.errors import InvalidRequestError
from loradock.runtime.server.views import (
    AdapterVersionView,
    AdapterView,
    LoadResult,
    ServerInfo,
    TrustView,
)
from loradock.runtime.types import (
    AdapterMixture,
    ChatMessage,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    MixtureComponent,
    ResolvedAdapter,
    SamplingParams,
    StructuredOutput,
    Timings,
    TokenEvent,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCalls,
)

_DEFAULT_SAMPLING = SamplingParams()

FINISH_REASONS: dict[FinishReason, int] = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
_FINISH_FROM_PROTO = {v: k for k, v in FINISH_REASONS.items()}


# ---- sampling ----


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults; the engine validates ranges."""
    return SamplingParams(
        max_new_tokens=msg.max_new_tokens if msg.HasField("max_new_tokens") else _DEFAULT_SAMPLING.max_new_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.HasField("top_p") else _DEFAULT_SAMPLING.top_p,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        frequency_penalty=msg.frequency_penalty,
        presence_penalty=msg.presence_penalty,
        logit_bias=tuple(sorted(msg.logit_bias.items())),
        min_tokens=msg.min_tokens,
        stop_token_ids=tuple(msg.stop_token_ids),
        structured=structured_from_proto(msg.structured) if msg.HasField("structured") else None,
    )


def structured_from_proto(msg: pb.StructuredOutput) -> StructuredOutput | None:
    kind = msg.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "choice":
        return StructuredOutput("choice", tuple(msg.choice.options))
    return StructuredOutput(kind, getattr(msg, kind))


def structured_to_proto(s: StructuredOutput | None) -> pb.StructuredOutput | None:
    if s is None:
        return None
    if s.kind == "json_object":
        return pb.StructuredOutput(json_object=True)
    if s.kind == "choice":
        return pb.StructuredOutput(choice=pb.Choice(options=list(s.value)))
    return pb.StructuredOutput(**{s.kind: s.value})


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    if params.max_new_tokens is not None:  # None: left unset, the server's default (64)
        _check_unsigned("max_new_tokens", params.max_new_tokens)
    _check_unsigned("top_k", params.top_k)
    if params.seed is not None:
        _check_unsigned("seed", params.seed, bits=64)
    return pb.SamplingParams(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        stop=list(params.stop),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        logit_bias=dict(params.logit_bias),
        min_tokens=params.min_tokens,
        stop_token_ids=list(params.stop_token_ids),
        structured=structured_to_proto(params.structured),
    )


def _check_unsigned(name: str, value: int, bits: int = 32, field: str = "sampling") -> None:
    # protobuf would raise a bare ValueError; say which field is wrong instead.
    if not isinstance(value, int) or not 0 <= value < 2**bits:
        raise InvalidRequestError(f"{field}.{name}={value!r}: expected an integer in [0, 2**{bits})")


# ---- mixtures ----


def mixture_from_proto(msg: pb.AdapterMixture) -> AdapterMixture:
    """Empty strings take the defaults; the engine checks the recipe."""
    return AdapterMixture(
        components=tuple(MixtureComponent(c.adapter, c.weight) for c in msg.components),
        strategy=msg.strategy or "linear",
        density=msg.density if msg.HasField("density") else None,
        majority_sign_method=msg.majority_sign_method or "total",
        seed=msg.seed,
    )


def mixture_to_proto(mixture: AdapterMixture) -> pb.AdapterMixture:
    _check_unsigned("seed", mixture.seed, bits=64, field="mixture")
    return pb.AdapterMixture(
        components=[pb.MixtureComponent(adapter=c.adapter, weight=c.weight) for c in mixture.components],
        strategy=mixture.strategy, density=mixture.density,
        majority_sign_method=mixture.majority_sign_method, seed=mixture.seed,
    )


# ---- generation requests ----


def request_from_proto(msg: pb.GenerateRequest) -> GenerationRequest:
    """A wire request as the engine's GenerationRequest. Raises InvalidRequestError."""
    which = msg.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("the request has no input: set one of prompt, messages or prompt_token_ids")
    extra = {"request_id": msg.request_id} if msg.request_id else {}
    if msg.HasField("mixture"):
        if msg.adapter:
            raise InvalidRequestError("give adapter or mixture, not both")
        extra["mixture"] = mixture_from_proto(msg.mixture)
    if msg.HasField("parallel_tool_calls"):
        extra["parallel_tool_calls"] = msg.parallel_tool_calls
    return GenerationRequest(
        adapter=msg.adapter or None,
        prompt=msg.prompt if which == "prompt" else None,
        messages=tuple(ChatMessage(m.role, m.content, tuple(_call_from_proto(c) for c in m.tool_calls),
                                   m.tool_call_id) for m in msg.messages.messages)
        if which == "messages"
        else (),
        prompt_token_ids=tuple(msg.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
        sampling=sampling_from_proto(msg.sampling),
        tools=tuple(Tool(t.name, t.description, t.parameters) for t in msg.tools),
        tool_choice=msg.tool_choice or "auto",
        tool_name=msg.tool_name,
        route_key=msg.route_key,
        **extra,
    )


def _call_to_proto(call: ToolCall) -> pb.ToolCall:
    return pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments)


def _call_from_proto(msg: pb.ToolCall) -> ToolCall:
    return ToolCall(msg.name, msg.arguments, msg.id)


def request_to_proto(req: GenerationRequest) -> pb.GenerateRequest:
    """The engine request on the wire (the client's half). Raises InvalidRequestError."""
    given = [n for n, v in (("prompt", req.prompt is not None), ("messages", bool(req.messages)),
                            ("prompt_token_ids", req.prompt_token_ids is not None)) if v]
    if len(given) != 1:
        raise InvalidRequestError(
            f"give exactly one of prompt, messages or prompt_token_ids (got {', '.join(given) or 'none'})"
        )
    msg = pb.GenerateRequest(
        adapter=req.adapter or "",
        sampling=sampling_to_proto(req.sampling),
        request_id=req.request_id,
        tools=[pb.Tool(name=t.name, description=t.description, parameters=t.parameters) for t in req.tools],
        tool_choice=req.tool_choice,
        tool_name=req.tool_name,
        parallel_tool_calls=req.parallel_tool_calls,
        route_key=req.route_key,
    )
    if req.mixture is not None:
        msg.mixture.CopyFrom(mixture_to_proto(req.mixture))
    if req.prompt is not None:
        msg.prompt = req.prompt
    elif req.messages:
        msg.messages.messages.extend(
            pb.ChatMessage(role=m.role, content=m.content, tool_calls=[_call_to_proto(c) for c in m.tool_calls],
                           tool_call_id=m.tool_call_id) for m in req.messages)
    else:
        ids = list(req.prompt_token_ids or ())
        if any(not isinstance(i, int) or not 0 <= i < 2**32 for i in ids):
            raise InvalidRequestError("prompt_token_ids must be non-negative integers")
        msg.prompt_token_ids.ids.extend(ids)
    return msg


# ---- generation results ----


def resolved_to_proto(adapter: ResolvedAdapter | None) -> pb.ResolvedAdapter | None:
    if adapter is None:
        return None
    return pb.ResolvedAdapter(name=adapter.name, version=adapter.version, digest=adapter.digest)


def resolved_from_proto(msg: pb.ResolvedAdapter) -> ResolvedAdapter:
    return ResolvedAdapter(name=msg.name, version=msg.version, digest=msg.digest)


def result_to_proto(result: GenerationResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=result.request_id,
        text=result.text,
        token_ids=list(result.token_ids),
        finish_reason=FINISH_REASONS[result.finish_reason],
        adapter=resolved_to_proto(result.adapter),
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        timings=pb.Timings(**dataclasses.asdict(result.timings)),
        logprobs=[logprob_to_proto(lp) for lp in result.logprobs or ()],
        prompt_token_ids=list(result.prompt_token_ids),
        prompt_logprobs=[logprob_to_proto(lp) for lp in (result.prompt_logprobs or (None,))[1:]],
        tool_calls=[_call_to_proto(c) for c in result.tool_calls.calls] if result.tool_calls else [],
        content=result.text if result.tool_calls is None else result.tool_calls.content,
    )


def result_from_proto(msg: pb.GenerateResponse) -> GenerationResult:
    return GenerationResult(
        request_id=msg.request_id,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=_FINISH_FROM_PROTO.get(msg.finish_reason, FinishReason.ERROR),
        adapter=resolved_from_proto(msg.adapter) if msg.HasField("adapter") else None,
        prompt_tokens=msg.prompt_tokens,
        completion_tokens=msg.completion_tokens,
        timings=Timings(queue_ms=msg.timings.queue_ms, ttft_ms=msg.timings.ttft_ms,
                        total_ms=msg.timings.total_ms),
        logprobs=tuple(logprob_from_proto(lp) for lp in msg.logprobs) or None,
        prompt_logprobs=(None, *(logprob_from_proto(lp) for lp in msg.prompt_logprobs)) if msg.prompt_logprobs
        else None,
        prompt_token_ids=tuple(msg.prompt_token_ids),
        tool_calls=ToolCalls(tuple(_call_from_proto(c) for c in msg.tool_calls), msg.content) if msg.tool_calls
        else None,
    )


def logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=i, logprob=v) for i, v in lp.top])


def logprob_from_proto(msg: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(msg.token_id, msg.logprob, tuple((t.token_id, t.logprob) for t in msg.top))


def event_to_proto(event: TokenEvent) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        request_id=event.request_id,
        chunk=pb.TokenChunk(text=event.text, token_id=event.token_id, index=event.index,
                            logprob=None if event.logprob is None else logprob_to_proto(event.logprob)),
    )


def final_to_proto(result: GenerationResult) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(request_id=result.request_id, result=result_to_proto(result))


def stream_item_from_proto(msg: pb.GenerateStreamResponse) -> TokenEvent | GenerationResult:
    """One stream message: a TokenEvent, or the final GenerationResult."""
    if msg.WhichOneof("event") == "result":
        return result_from_proto(msg.result)
    chunk = msg.chunk
    return TokenEvent(request_id=msg.request_id, token_id=chunk.token_id, text=chunk.text, index=chunk.index,
                      logprob=logprob_from_proto(chunk.logprob) if chunk.HasField("logprob") else None)


# ---- adapters and server info ----


def adapter_view_to_proto(view: AdapterView) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        name=view.name,
        versions=[pb.AdapterVersionInfo(**dataclasses.asdict(v)) for v in view.versions],
        aliases=view.aliases,
        base_name=view.base_name,
    )


def adapter_view_from_proto(msg: pb.AdapterInfo) -> AdapterView:
    versions = tuple(
        AdapterVersionView(
            version=v.version, digest=v.digest, aliases=tuple(v.aliases), created_at=v.created_at,
            rank=v.rank, on_device=v.on_device, in_host_memory=v.in_host_memory, pinned=v.pinned,
            trained_quantization=v.trained_quantization, quantization_mismatch=v.quantization_mismatch,
            signer=v.signer, trust=TrustView(v.trust.state, v.trust.reason),
            servable=v.servable, not_servable_reason=v.not_servable_reason,
        )
        for v in msg.versions
    )
    return AdapterView(name=msg.name, versions=versions, aliases=dict(msg.aliases), base_name=msg.base_name)


def load_result_to_proto(result: LoadResult) -> pb.LoadAdapterResponse:
    return pb.LoadAdapterResponse(adapter=resolved_to_proto(result.adapter), load_ms=result.load_ms)


def load_result_from_proto(msg: pb.LoadAdapterResponse) -> LoadResult:
    return LoadResult(adapter=resolved_from_proto(msg.adapter), load_ms=msg.load_ms)


def info_to_proto(info: ServerInfo) -> pb.GetInfoResponse:
    return pb.GetInfoResponse(**dataclasses.asdict(info))


def info_from_proto(msg: pb.GetInfoResponse) -> ServerInfo:
    return ServerInfo(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(ServerInfo)})
