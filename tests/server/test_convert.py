"""proto <-> plain types, both ways, and the error -> status table."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from loradock.proto.loradock.v1 import runtime_pb2 as pb
from loradock.registry import DigestMismatchError, InvalidNameError, NotFoundError
from loradock.runtime.errors import (
    AdapterNotFoundError,
    AdapterUnavailableError,
    EngineShutdownError,
    InvalidRequestError,
    QueueFullError,
)
from loradock.runtime.server import convert
from loradock.runtime.server.status import status_for
from loradock.runtime.types import (
    ChatMessage,
    FinishReason,
    GenerationRequest,
    GenerationResult,
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

SAMPLING = SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=5, seed=2**40, stop=("\n", "END"),
                          ignore_eos=True, logprobs=3, repetition_penalty=1.2, frequency_penalty=0.5,
                          presence_penalty=-0.5, logit_bias=((3, -1.0), (9, 2.5)), min_tokens=2, stop_token_ids=(7,),
                          structured=StructuredOutput("choice", ("a", "b")))


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest(adapter="medical@prod", prompt="Hi", sampling=SAMPLING, request_id="r1"),
        GenerationRequest(messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")),
                          request_id="r2"),
        GenerationRequest(adapter="a@3", prompt_token_ids=(1, 2, 49151), request_id="r3"),
        GenerationRequest(prompt="", request_id="r4"),  # empty is the engine's to refuse, not the wire's
        GenerationRequest(prompt="x", request_id="r5", sampling=SamplingParams(
            structured=StructuredOutput("json_schema", '{"type": "object"}'))),
        GenerationRequest(prompt="x", request_id="r6", sampling=SamplingParams(structured=StructuredOutput("json_object"))),
        GenerationRequest(prompt="x", request_id="r7", sampling=SamplingParams(structured=StructuredOutput("regex", "a+"))),
        GenerationRequest(  # tool calling: the tools, the choice, an earlier call and its result
            messages=(ChatMessage("user", "Weather?"),
                      ChatMessage("assistant", "", (ToolCall("get_weather", '{"city": "Oslo"}', "call_1"),)),
                      ChatMessage("tool", "rain", tool_call_id="call_1")),
            tools=(Tool("get_weather", "Weather in a city", '{"type": "object"}'), Tool("get_time")),
            tool_choice="function", tool_name="get_weather", parallel_tool_calls=False, request_id="r8",
            adapter="m@prod", route_key="user-7"),
    ],
)
def test_requests_round_trip(request_):
    assert convert.request_from_proto(convert.request_to_proto(request_)) == request_


def test_unset_sampling_fields_take_the_defaults():
    req = convert.request_from_proto(pb.GenerateRequest(prompt="x"))
    assert req.sampling == SamplingParams()
    assert req.adapter is None and req.request_id  # the server picks an id


def test_results_and_stream_items_round_trip():
    result = GenerationResult("r1", "Paris.", (5, 6), FinishReason.STOP, ResolvedAdapter("geo", 2, "ab" * 32),
                              11, 2, Timings(1.5, 20.25, 40.0))
    assert convert.result_from_proto(convert.result_to_proto(result)) == result
    base_only = GenerationResult("r2", "", (), FinishReason.LENGTH, None, 3, 0, Timings(0, 0, 0))
    assert convert.result_from_proto(convert.result_to_proto(base_only)).adapter is None
    event = TokenEvent("r1", 6, "Par", 0)
    assert convert.stream_item_from_proto(convert.event_to_proto(event)) == event
    logprobs = (TokenLogprob(5, -0.25, ((5, -0.25), (9, -1.5))), TokenLogprob(6, -2.0, ()))
    with_logprobs = dataclasses.replace(result, logprobs=logprobs)
    assert convert.result_from_proto(convert.result_to_proto(with_logprobs)) == with_logprobs
    event = TokenEvent("r1", 5, "Par", 0, logprobs[0])
    assert convert.stream_item_from_proto(convert.event_to_proto(event)) == event
    assert convert.stream_item_from_proto(convert.final_to_proto(result)) == result
    called = dataclasses.replace(result, tool_calls=ToolCalls((ToolCall("f", "{}", "call_2"),), "Checking."))
    assert convert.result_from_proto(convert.result_to_proto(called)) == called
    for reason in FinishReason:
        assert pb.FinishReason.Name(convert.FINISH_REASONS[reason]) == f"FINISH_REASON_{reason.name}"


def test_bad_client_requests_fail_before_sending():
    with pytest.raises(InvalidRequestError, match="exactly one"):
        convert.request_to_proto(GenerationRequest(prompt="x", prompt_token_ids=(1,)))
    with pytest.raises(InvalidRequestError, match="no input"):
        convert.request_from_proto(pb.GenerateRequest(adapter="a"))
    with pytest.raises(InvalidRequestError, match="max_new_tokens"):
        convert.request_to_proto(GenerationRequest(prompt="x", sampling=SamplingParams(max_new_tokens=-1)))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (AdapterNotFoundError("no adapter 'x'"), grpc.StatusCode.NOT_FOUND),
        (NotFoundError("no adapter 'x'"), grpc.StatusCode.NOT_FOUND),
        (InvalidRequestError("temperature"), grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidNameError("bad name"), grpc.StatusCode.INVALID_ARGUMENT),
        (AdapterUnavailableError("rank 32 > 16"), grpc.StatusCode.FAILED_PRECONDITION),
        (DigestMismatchError("tampered"), grpc.StatusCode.FAILED_PRECONDITION),
        (QueueFullError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EngineShutdownError("stopping"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_errors_map_to_specific_codes(error, code):
    assert status_for(error) == (code, str(error))


def test_anything_else_is_internal_without_leaking_details():
    code, details = status_for(KeyError("secret internals"))
    assert code == grpc.StatusCode.INTERNAL
    assert "KeyError" in details and "secret" not in details
