"""The Runtime service end to end: a real `loradock serve` subprocess on the tiny base,
real adapters, real clients on a real port. The in-process engine is the reference."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from loradock.registry import Registry
from loradock.runtime import ChatMessage, EngineConfig, GenerationRequest, SamplingParams

from loradock.client import Client, LoradockError
from tests.conftest import TINY_BASE
from tests.server.conftest import ServerProcess, cli

# (adapter ref, prompt): several adapters, the base model, and one chat conversation.
CASES = [
    ("alpha", "The quick brown fox"),
    ("alpha@prod", "Once upon a time"),
    ("beta@1", "The quick brown fox"),
    ("beta@2", "Hello there, how"),
    ("gamma", "Numbers: one, two,"),
    ("", "The quick brown fox"),
    ("beta@1", [{"role": "user", "content": "What is the capital of France?"}]),
]
MAX_NEW = 12


def _request(ref: str, prompt) -> GenerationRequest:
    messages = () if isinstance(prompt, str) else tuple(ChatMessage(**m) for m in prompt)
    return GenerationRequest(adapter=ref or None, prompt=prompt if isinstance(prompt, str) else None,
                             messages=messages, sampling=SamplingParams(max_new_tokens=MAX_NEW))


@pytest.fixture(scope="module")
def reference(server_home: Path) -> dict[int, object]:
    """Each case's result from an in-process engine with the server's configuration."""
    from loradock.runtime import Engine

    engine = Engine(EngineConfig(base=TINY_BASE, quantize="none", device="cpu", max_rank=16, max_slots=2),
                    Registry(server_home)).start()
    try:
        return {i: engine.generate(_request(ref, prompt)) for i, (ref, prompt) in enumerate(CASES)}
    finally:
        engine.shutdown()


@pytest.fixture
def client(server: ServerProcess):
    with Client(server.address, timeout=60) as c:
        yield c


def test_unary_and_stream_from_concurrent_clients_match_the_engine(server, reference):
    def unary(i: int):
        ref, prompt = CASES[i]
        with Client(server.address, timeout=60) as c:
            return c.generate(prompt, adapter=ref, max_new_tokens=MAX_NEW)

    def streamed(i: int):
        ref, prompt = CASES[i]
        with Client(server.address, timeout=60) as c:
            stream = c.stream(prompt, adapter=ref, max_new_tokens=MAX_NEW)
            events = list(stream)
            return events, stream.result

    jobs = list(range(len(CASES))) * 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        unary_results = list(pool.map(unary, jobs))
        stream_results = list(pool.map(streamed, jobs))

    for i, result, (events, final) in zip(jobs, unary_results, stream_results, strict=True):
        expected = reference[i]
        assert result.token_ids == expected.token_ids, CASES[i]
        assert result.text == expected.text
        assert result.adapter == expected.adapter
        assert result.finish_reason == expected.finish_reason
        assert result.completion_tokens == len(result.token_ids)
        # streamed pieces add up to the unary text, token by token
        assert "".join(e.text for e in events) == result.text == final.text
        assert [e.token_id for e in events] == list(final.token_ids)
        assert [e.index for e in events] == list(range(len(events)))
        assert final.timings.ttft_ms <= final.timings.total_ms
    # the adapters really differ from each other and from the base (so equality above means something)
    texts = {CASES[i][0]: reference[i].token_ids for i in (0, 2, 3, 5)}
    assert len(set(texts.values())) == 4
    assert reference[1].adapter.ref == "alpha@1"
    assert reference[5].adapter is None


def test_resolved_adapter_names_version_and_digest(client, server_home):
    result = client.generate("Hi", adapter="beta@prod", max_new_tokens=2)
    expected = Registry(server_home).resolve("beta@prod")
    assert (result.adapter.name, result.adapter.version) == ("beta", 1)
    assert result.adapter.digest == expected.digest
    assert re.fullmatch(r"[0-9a-f]{64}", result.adapter.digest)


@pytest.mark.parametrize(
    ("kwargs", "code", "words"),
    [
        (dict(adapter="nosuch"), grpc.StatusCode.NOT_FOUND, "nosuch"),
        (dict(adapter="alpha@99"), grpc.StatusCode.NOT_FOUND, "99"),
        (dict(adapter="../etc"), grpc.StatusCode.INVALID_ARGUMENT, "name"),
        (dict(adapter="alpha", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(adapter="alpha", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (dict(adapter="alpha", max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (dict(adapter="broken"), grpc.StatusCode.FAILED_PRECONDITION, "broken"),
        (dict(adapter="big"), grpc.StatusCode.FAILED_PRECONDITION, "rank"),
    ],
)
def test_errors_map_to_codes_and_the_server_keeps_serving(client, kwargs, code, words):
    for call in (client.generate, lambda *a, **k: list(client.stream(*a, **k))):
        with pytest.raises(LoradockError) as info:
            call("Hello", **{"max_new_tokens": 4, **kwargs})
        assert info.value.code == code
        assert words in info.value.details.lower(), info.value.details
    assert client.generate("Hello", adapter="alpha", max_new_tokens=2).completion_tokens == 2


def test_request_without_input_and_empty_prompt_are_invalid(server, client):
    from loradock.proto.loradock.v1 import runtime_pb2 as pb
    from loradock.proto.loradock.v1 import runtime_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.RuntimeStub(channel).Generate(pb.GenerateRequest(adapter="alpha"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in info.value.details()
    with pytest.raises(LoradockError) as err:
        client.generate("", adapter="alpha")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_health_reflection_and_info(server, client):
    assert client.health() == "SERVING"
    assert client.health("loradock.v1.Runtime") == "SERVING"
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name for r in responses for s in r.list_services_response.service}
    assert {"loradock.v1.Runtime", "grpc.health.v1.Health"} <= services

    info = client.info()
    assert info.base_name == TINY_BASE and len(info.base_fingerprint) == 64
    assert (info.quantization, info.device, info.max_rank, info.max_slots) == ("none", "cpu", 16, 2)
    assert info.loradock_version


def test_list_load_and_unload_adapters(client):
    listed = {a.name: a for a in client.list_adapters()}
    assert set(listed) >= {"alpha", "beta", "gamma", "big", "broken"}
    beta = listed["beta"]
    assert [v.version for v in beta.versions] == [1, 2]
    assert beta.aliases.get("prod") in (1, 2)
    assert beta.base_name == TINY_BASE

    loaded = client.load_adapter("gamma", pin=True)
    assert loaded.adapter.ref == "gamma@1" and loaded.load_ms > 0
    (gamma,) = client.list_adapters("gamma")
    assert gamma.versions[0].on_device and gamma.versions[0].pinned
    assert client.unload_adapter("gamma") is True
    (gamma,) = client.list_adapters("gamma")
    assert not gamma.versions[0].on_device and not gamma.versions[0].pinned
    assert client.unload_adapter("gamma") is False  # nothing left to drop

    with pytest.raises(LoradockError) as info:
        client.load_adapter("broken")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(LoradockError) as info:
        client.list_adapters("nosuch")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_list_adapters_says_which_versions_the_runtime_cannot_serve(client, server_home, adapter_dirs, tmp_path):
    """A valid PEFT adapter this runtime does not serve is listed as such, with the reason, and
    loading it is refused with the same words."""
    import shutil

    src = tmp_path / "odd"
    shutil.copytree(adapter_dirs["alpha"], src)
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    Registry(server_home).publish(src, "odd", base=TINY_BASE)
    (odd,) = client.list_adapters("odd")
    assert not odd.versions[0].servable and "fan_in_fan_out=true" in odd.versions[0].not_servable_reason
    (alpha,) = client.list_adapters("alpha")
    assert alpha.versions[0].servable and alpha.versions[0].not_servable_reason == ""
    with pytest.raises(LoradockError) as info:
        client.load_adapter("odd")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "fan_in_fan_out=true" in str(info.value)


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_requests_per_adapter(server, client):
    requests_ok = 'loradock_requests_total{adapter="gamma",code="OK",method="%s"}'  # labels sorted, as prometheus_client writes them
    failed = 'loradock_request_errors_total{adapter="broken",code="FAILED_PRECONDITION"}'
    tokens = 'loradock_tokens_total{adapter="gamma",kind="completion"}'
    ttft_count = 'loradock_time_to_first_token_seconds_count{adapter="gamma"}'
    before = _scrape(server.metrics_url)

    for _ in range(3):
        client.generate("Count me", adapter="gamma", max_new_tokens=5)
    for _ in range(2):
        list(client.stream("Count me", adapter="gamma", max_new_tokens=5))
    with pytest.raises(LoradockError):
        client.generate("Count me", adapter="broken")

    after = _scrape(server.metrics_url)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta[requests_ok % "Generate"] == 3
    assert delta[requests_ok % "GenerateStream"] == 2
    assert delta[failed] == 1
    assert delta[tokens] == 5 * 5
    assert delta[ttft_count] == 5
    assert after['loradock_request_duration_seconds_bucket{adapter="gamma",le="+Inf"}'] == after[
        'loradock_request_duration_seconds_count{adapter="gamma"}']
    # engine counters, per adapter version
    assert after['loradock_engine_requests_total{adapter="gamma",version="1"}'] >= 5
    assert any(k.startswith("loradock_engine_loads_total{") for k in after)
    assert any(k.startswith("loradock_engine_evictions_total{") for k in after)


def test_alias_move_while_clients_stream(server, server_home):
    registry = Registry(server_home)
    assert registry.resolve("beta@prod").version == 1
    stop = threading.Event()
    seen: list[tuple[int, int]] = []  # (version, tokens) of every finished stream
    errors: list[BaseException] = []

    def stream_forever():
        with Client(server.address, timeout=60) as c:
            while not stop.is_set():
                try:
                    stream = c.stream("Streaming while the alias moves", adapter="beta@prod",
                                      max_new_tokens=16, ignore_eos=True)
                    n = sum(1 for _ in stream)
                    seen.append((stream.result.adapter.version, n))
                except BaseException as e:  # any failure fails the test
                    errors.append(e)
                    return

    threads = [threading.Thread(target=stream_forever) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    moved_at = len(seen)
    registry.tag("beta@2", "prod")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(v == 2 for v, _ in seen[moved_at:]):
        time.sleep(0.05)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(60)

    assert not errors, errors
    assert all(n == 16 for _, n in seen)
    assert any(v == 1 for v, _ in seen[:moved_at])
    versions_after = [v for v, _ in seen[moved_at:]]
    assert 2 in versions_after
    # once version 2 serves, later requests never go back to version 1
    assert 1 not in versions_after[versions_after.index(2) + len(threads):]
    with Client(server.address) as c:
        assert c.generate("After the move", adapter="beta@prod", max_new_tokens=2).adapter.version == 2


def test_cli_generate(server, client):
    expected = client.generate("The quick brown fox", adapter="alpha", max_new_tokens=8)
    done = cli("generate", "--server", server.address, "--adapter", "alpha", "--max-new-tokens", "8",
               "The quick brown fox")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"
    assert "alpha@1" in done.stderr and "8 generated tokens" in done.stderr

    streamed = cli("generate", "--server", server.address, "--adapter", "alpha", "--max-new-tokens", "8",
                   "--stream", "The quick brown fox")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == expected.text + "\n"

    as_json = json.loads(cli("generate", "--server", server.address, "--adapter", "alpha@prod", "--json",
                             "--max-new-tokens", "8", "The quick brown fox").stdout)
    assert as_json["text"] == expected.text and as_json["token_ids"] == list(expected.token_ids)
    assert as_json["adapter"]["digest"] == expected.adapter.digest and as_json["finish_reason"] == "length"

    missing = cli("generate", "--server", server.address, "--adapter", "nosuch", "hi")
    assert missing.returncode == 2
    assert "NOT_FOUND" in missing.stderr and "nosuch" in missing.stderr


def test_cli_chat_keeps_history_and_switches_adapter(server, client):
    script = ("Hello\n/adapter alpha\nWho are you?\n/adapter nosuch\nStill there?\n"
              "/adapter\n/reset\nHi again\n/quit\nnever sent\n")
    done = cli("chat", "--server", server.address, "--max-new-tokens", "6", stdin=script)
    assert done.returncode == 0, done.stderr

    history = [{"role": "user", "content": "Hello"}]
    first = client.generate(history, max_new_tokens=6)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Who are you?"}]
    second = client.generate(history, adapter="alpha", max_new_tokens=6)  # same history, new adapter
    third = client.generate([{"role": "user", "content": "Hi again"}], max_new_tokens=6)  # after /reset
    assert done.stdout.splitlines() == [first.text, second.text, third.text]
    summaries = [line.split(" |")[0] for line in done.stderr.splitlines() if line.startswith("[")]
    assert summaries == ["[base", "[alpha@1", "[base"]
    assert "NOT_FOUND" in done.stderr and "nosuch" in done.stderr  # the failed turn, reported


def test_oversized_message_is_refused_and_the_server_keeps_serving(server, client):
    from loradock.proto.loradock.v1 import runtime_pb2 as pb
    from loradock.proto.loradock.v1 import runtime_pb2_grpc as pb_grpc

    huge = pb.GenerateRequest(adapter="alpha", prompt="x" * (17 * 1024 * 1024))  # server limit: 16 MiB
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(server.address, options=options) as channel, \
            pytest.raises(grpc.RpcError) as info:
        pb_grpc.RuntimeStub(channel).Generate(huge, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.generate("Small", adapter="alpha", max_new_tokens=2).completion_tokens == 2


def test_log_probabilities_over_grpc(client):
    """SamplingParams.logprobs over the wire: per generated token, unary and streamed alike."""
    ref, prompt = CASES[0]
    result = client.generate(prompt, adapter=ref, max_new_tokens=3, logprobs=2)
    assert [lp.token_id for lp in result.logprobs] == list(result.token_ids)
    assert all(lp.logprob <= 0 and len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in result.logprobs)
    stream = client.stream(prompt, adapter=ref, max_new_tokens=3, logprobs=2)
    assert [event.logprob for event in stream] == list(result.logprobs) == list(stream.result.logprobs)
    assert client.generate(prompt, adapter=ref, max_new_tokens=1).logprobs is None
