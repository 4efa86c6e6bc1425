"""Bad input through a real server: each case gets one specific gRPC code and a message that
names the problem, nothing crashes, and the server keeps serving the good adapter afterwards."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import grpc
import pytest
from loradock.proto.loradock.v1 import runtime_pb2 as pb

from loradock.client import Client, LoradockError
from tests.reliability.grpc_raw import (
    GENERATE,
    GENERATE_STREAM,
    call_message,
    call_raw,
    length_delimited,
)

NOT_FOUND, INVALID, FAILED = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                              grpc.StatusCode.FAILED_PRECONDITION)

# (adapter reference, code, words the details must contain)
BAD_ADAPTERS = [
    ("nosuch", NOT_FOUND, "unknown adapter 'nosuch'"),
    ("good@99", NOT_FOUND, "no version 99"),
    ("good@staging", NOT_FOUND, "no alias 'staging'"),
    ("acme/nosuch", NOT_FOUND, "acme/nosuch"),
    ("../etc/passwd", INVALID, "invalid name"),
    ("good/../../bases", INVALID, "invalid name"),
    ("/etc/passwd", INVALID, "invalid name"),
    ("acme/other/../../x", INVALID, "invalid name"),
    ("good@../1", INVALID, "invalid alias"),
    ("..", INVALID, "invalid name"),
    ("good\x00", INVALID, "invalid name"),
    ("truncated", FAILED, "adapter_model.safetensors"),
    ("notsafetensors", FAILED, "adapter_model.safetensors"),
    ("pickled", FAILED, "adapter_model.safetensors"),
    ("wrongshape", FAILED, "do not fit"),
    ("otherbase", FAILED, "llama-70b"),
    ("toobig", FAILED, "rank 32 exceeds"),
    ("badconfig", FAILED, "adapter_config.json"),
    ("dora", FAILED, "dora"),
]


def _sampling(**fields) -> pb.SamplingParams:
    return pb.SamplingParams(**{"max_new_tokens": 3, **fields})


# (case id, request, code, words): request fields the typed client would not let through
BAD_REQUESTS = [
    ("no-input", pb.GenerateRequest(adapter="good", sampling=_sampling()), INVALID, "prompt"),
    ("empty-prompt", pb.GenerateRequest(adapter="good", prompt="", sampling=_sampling()), INVALID, "prompt"),
    ("empty-messages", pb.GenerateRequest(adapter="good", messages=pb.ChatMessages(), sampling=_sampling()),
     INVALID, "prompt"),
    ("bad-role", pb.GenerateRequest(adapter="good", messages=pb.ChatMessages(
        messages=[pb.ChatMessage(role="root", content="hi")]), sampling=_sampling()), INVALID, "role"),
    ("long-token-prompt", pb.GenerateRequest(adapter="good", prompt_token_ids=pb.TokenIds(ids=[42] * 1600),
                                             sampling=_sampling()), INVALID, "max_prompt_tokens"),
    ("long-text-prompt", pb.GenerateRequest(adapter="good", prompt="hello " * 4000, sampling=_sampling()),
     INVALID, "max_prompt_tokens"),
    ("token-outside-vocab", pb.GenerateRequest(adapter="good", prompt_token_ids=pb.TokenIds(ids=[5, 49152]),
                                               sampling=_sampling()), INVALID, "prompt_token_ids"),
    ("max-new-tokens-0", pb.GenerateRequest(prompt="hi", sampling=_sampling(max_new_tokens=0)),
     INVALID, "max_new_tokens"),
    ("temperature-negative", pb.GenerateRequest(prompt="hi", sampling=_sampling(temperature=-0.5)),
     INVALID, "temperature"),
    ("temperature-nan", pb.GenerateRequest(prompt="hi", sampling=_sampling(temperature=math.nan)),
     INVALID, "temperature"),
    ("temperature-inf", pb.GenerateRequest(prompt="hi", sampling=_sampling(temperature=math.inf)),
     INVALID, "temperature"),
    ("top-p-0", pb.GenerateRequest(prompt="hi", sampling=_sampling(top_p=0.0)), INVALID, "top_p"),
    ("top-p-above-1", pb.GenerateRequest(prompt="hi", sampling=_sampling(top_p=1.5)), INVALID, "top_p"),
    ("top-p-nan", pb.GenerateRequest(prompt="hi", sampling=_sampling(top_p=math.nan)), INVALID, "top_p"),
    ("seed-2^63", pb.GenerateRequest(prompt="hi", sampling=_sampling(seed=2**63, temperature=1.0)),
     INVALID, "seed"),
    ("empty-stop", pb.GenerateRequest(prompt="hi", sampling=_sampling(stop=[""])), INVALID, "stop"),
]


@pytest.fixture(scope="module")
def client(rel_server):
    with Client(rel_server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def good_answer(client):
    """The good adapter's answer before any bad input: it must not change afterwards."""
    return client.generate("The quick brown fox", adapter="good@prod", max_new_tokens=6).token_ids


def _still_serving(client: Client, good_answer) -> None:
    again = client.generate("The quick brown fox", adapter="good@prod", max_new_tokens=6)
    assert again.token_ids == good_answer and again.adapter.ref == "good@1"


@pytest.mark.parametrize(("ref", "code", "words"), BAD_ADAPTERS, ids=[repr(c[0]) for c in BAD_ADAPTERS])
def test_bad_adapter_reference_or_files(client, good_answer, pickle_marker: Path, ref, code, words):
    calls = [lambda: client.generate("Hello", adapter=ref, max_new_tokens=3),
             lambda: list(client.stream("Hello", adapter=ref, max_new_tokens=3))]
    if code is not INVALID:  # LoadAdapter checks the same files (an empty-name trick is a name error there too)
        calls.append(lambda: client.load_adapter(ref))
    for call in calls:
        with pytest.raises(LoradockError) as info:
            call()
        assert info.value.code == code, info.value
        assert words.lower() in info.value.details.lower(), info.value.details
    assert not pickle_marker.exists(), "a planted pickle file was unpickled"
    _still_serving(client, good_answer)


@pytest.mark.parametrize(("case", "request_msg", "code", "words"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_fields(rel_server, client, good_answer, case, request_msg, code, words):
    for stream in (False, True):
        got, details = call_message(rel_server.address, request_msg, stream=stream)
        assert got == code, (case, got, details)
        assert words in details, details
    _still_serving(client, good_answer)


@pytest.mark.parametrize("field", [1, 2, 6], ids=["adapter", "prompt", "request_id"])
@pytest.mark.parametrize("method", [GENERATE, GENERATE_STREAM], ids=["unary", "stream"])
def test_invalid_utf8_in_a_string_field(rel_server, client, good_answer, method, field):
    """proto3 strings must be UTF-8; a hand-built message puts raw bytes there."""
    fields = {1: b"good", 2: b"Hello", 6: b"req-1"}
    fields[field] = b"caf\xc3(\xff\xfe"
    payload = b"".join(length_delimited(f, v) for f, v in sorted(fields.items()))
    payload += length_delimited(5, b"\x08\x02")  # sampling { max_new_tokens: 2 }
    code, details = call_raw(rel_server.address, method, payload)
    assert code == INVALID, (code, details)
    assert details
    _still_serving(client, good_answer)


def test_oversized_message(rel_server, client, good_answer):
    huge = pb.GenerateRequest(adapter="good", prompt="x" * (17 * 1024 * 1024))  # the server caps at 16 MiB
    with grpc.insecure_channel(rel_server.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        rpc = ch.unary_unary(GENERATE, request_serializer=pb.GenerateRequest.SerializeToString,
                             response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            rpc(huge, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()
    _still_serving(client, good_answer)


# Extreme sampling values the validator lets through: served (OK), or refused up front naming the
# field; never an INTERNAL error from the sampler.
EXTREME_SAMPLING = [
    ("tiny-temperature", dict(temperature=1e-45), "temperature"),
    ("denormal-temperature", dict(temperature=5e-324), "temperature"),
    ("huge-temperature", dict(temperature=1e300), "temperature"),
    ("tiny-top-p", dict(temperature=0.7, top_p=1e-300), "top_p"),
    ("top-k-1", dict(temperature=0.7, top_k=1), "top_k"),
    ("huge-top-k", dict(temperature=0.7, top_k=2**32 - 1), "top_k"),
]


@pytest.mark.parametrize(("case", "fields", "field"), EXTREME_SAMPLING, ids=[c[0] for c in EXTREME_SAMPLING])
def test_extreme_sampling_is_served_or_refused_never_internal(rel_server, case, fields, field):
    request = pb.GenerateRequest(adapter="good@prod", prompt="Hello", sampling=_sampling(seed=1, **fields))
    for stream in (False, True):
        code, details = call_message(rel_server.address, request, stream=stream)
        assert code == grpc.StatusCode.OK or (code == INVALID and field in details), (case, code, details)


@pytest.mark.parametrize("manifest", ["{}", "null", '{"files": "x"}'], ids=["empty", "null", "files-not-a-map"])
def test_malformed_manifest_fails_only_that_adapter(rel_server, rel_home, client, good_answer, manifest):
    """A version whose manifest.json parses but is malformed (written by a buggy tool): its own
    requests fail with FAILED_PRECONDITION, listing and every other adapter keep working."""
    from loradock.registry import Registry

    from tests.reliability.conftest import plant_version

    path = plant_version(Registry(rel_home), "badmanifest", "good@1")
    (path / "manifest.json").write_text(manifest)
    try:
        for call in (lambda: client.generate("Hello", adapter="badmanifest", max_new_tokens=2),
                     lambda: client.load_adapter("badmanifest")):
            with pytest.raises(LoradockError) as info:
                call()
            assert info.value.code == FAILED, info.value
            assert "manifest" in info.value.details
        assert "good" in {a.name for a in client.list_adapters()}
        _still_serving(client, good_answer)
    finally:
        shutil.rmtree(path.parent.parent)
