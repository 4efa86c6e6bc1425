"""Per-request mixtures on the wire: the OpenAI API's `mixture` extra body and gRPC
`GenerateRequest.mixture`, answered by one engine (the `api` server serves both edges)."""

from __future__ import annotations

import grpc
import httpx
import pytest
from loradock.proto.loradock.v1 import runtime_pb2_grpc as pb_grpc
from loradock.runtime.server.convert import request_to_proto, result_from_proto
from loradock.runtime.types import (
    AdapterMixture,
    GenerationRequest,
    MixtureComponent,
    SamplingParams,
)

from tests.http.conftest import TOKEN, Served

HEADERS = {"Authorization": f"Bearer {TOKEN}"}
MIX = {"components": [{"adapter": "a1", "weight": 0.6}, {"adapter": "a4@1", "weight": 0.4}],
       "strategy": "ties", "density": 0.7}
BODY = {"model": "", "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


def complete(api: Served, body: dict) -> httpx.Response:
    return httpx.post(f"{api.url}/v1/completions", json=body, headers=HEADERS, timeout=120)


def grpc_generate(api: Served, mixture: AdapterMixture):
    request = GenerationRequest(mixture=mixture, prompt=BODY["prompt"],
                                sampling=SamplingParams(max_new_tokens=6, ignore_eos=True))
    with grpc.insecure_channel(api.grpc) as channel:
        reply = pb_grpc.RuntimeStub(channel).Generate(request_to_proto(request), timeout=120,
                                                      metadata=(("authorization", f"Bearer {TOKEN}"),))
    return result_from_proto(reply)


def test_a_mixture_is_served_alike_over_http_and_grpc(api):
    mixed = complete(api, {**BODY, "mixture": MIX})
    assert mixed.status_code == 200, mixed.text
    served_as = mixed.json()["model"]
    assert served_as.startswith("mixture-")
    alone = complete(api, {**BODY, "model": "a1"}).json()
    assert mixed.json()["choices"][0]["text"] != alone["choices"][0]["text"]  # the mixture did something

    mixture = AdapterMixture(tuple(MixtureComponent(c["adapter"], c["weight"]) for c in MIX["components"]),
                             strategy="ties", density=0.7)
    result = grpc_generate(api, mixture)
    assert result.text == mixed.json()["choices"][0]["text"]
    assert result.adapter.name == served_as  # the same recipe, the same cache entry


@pytest.mark.parametrize(("change", "words"), [
    ({"mixture": {**MIX, "components": [{"adapter": "a0", "weight": 1}, {"adapter": "a1", "weight": 1}],
                  "strategy": "linear", "density": None}}, "needs adapters of equal rank (a0@1 r=4, a1@1 r=8)"),
    ({"mixture": {**MIX, "density": None}}, "strategy ties needs a density"),
    ({"model": "a1", "mixture": MIX}, "give the base as model"),
])
def test_bad_mixtures_are_400_naming_the_mixture(api, change, words):
    answer = complete(api, {**BODY, **change})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "mixture" and words in error["message"]


def test_a_mixture_naming_an_unknown_adapter_is_404_naming_the_component(api):
    answer = complete(api, {**BODY, "mixture": {**MIX, "components": [{"adapter": "a1", "weight": 1},
                                                                      {"adapter": "nosuch", "weight": 1}]}})
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert error["param"] == "mixture.components" and "nosuch" in error["message"]
    assert "The model ''" not in error["message"]


def test_bad_mixture_over_grpc_is_invalid_argument(api):
    with pytest.raises(grpc.RpcError) as info:
        grpc_generate(api, AdapterMixture((MixtureComponent("a1", 1.0), MixtureComponent("a4", -2.0))))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "weights must be finite numbers > 0" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        grpc_generate(api, AdapterMixture((MixtureComponent("a1", 1.0), MixtureComponent("nosuch", 1.0))))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nosuch" in info.value.details()
    assert complete(api, {**BODY, "model": "a1"}).status_code == 200  # and the server keeps serving
