"""Runtime adapter management over HTTP (vLLM's routes, on with --allow-adapter-updates), and
the HTTP port's metrics."""

from __future__ import annotations

import httpx
import pytest

from tests.http.conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(api, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{api.url}{path}", json=body, headers=AUTH, timeout=60)


def test_load_publishes_a_new_version_and_serves_it(api, client, http_adapter_dirs, http_registry, tmp_path):
    """Guards: load_lora_adapter not publishing through the registry (validated, versioned,
    digest-recorded), not loading, or the new model not showing in /v1/models and chat."""
    first = post(api, "/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": str(http_adapter_dirs["a3"])})
    assert first.status_code == 200, first.text
    assert (first.json()["id"], first.json()["version"]) == ("hot@1", 1)
    assert http_registry.resolve("hot@1").digest == first.json()["digest"]  # it is a real registry version
    resident = {m.id for m in client.models.list().data}
    assert {"hot", "hot@1"} <= resident
    answer = client.chat.completions.create(model="hot", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0)
    same = client.chat.completions.create(model="a3", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0)
    assert answer.model == "hot@1" and answer.choices[0].message.content == same.choices[0].message.content

    again = post(api, "/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": str(http_adapter_dirs["a3"])})
    assert again.json()["id"] == "hot@1" and "already holds these files" in again.json()["message"]  # no hot@2
    second = post(api, "/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": str(http_adapter_dirs["a4"])})
    assert second.json()["id"] == "hot@2"
    assert client.chat.completions.create(model="hot", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).model == "hot@2"

    assert post(api, "/v1/unload_lora_adapter", {"lora_name": "hot@2"}).json()["was_resident"] is True
    assert post(api, "/v1/unload_lora_adapter", {"lora_name": "hot@2"}).json()["was_resident"] is False
    assert "hot@2" in {m.id for m in client.models.list().data}  # unloaded from memory, still in the registry


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"lora_name": "x", "lora_path": "/nonexistent/adapter"}, 400, "lora_path"),
    ({"lora_name": "x", "lora_path": "NOT_AN_ADAPTER"}, 400, "lora_path"),
    ({"lora_name": "bad name!", "lora_path": "ADAPTER"}, 400, "lora_name"),
    ({"lora_name": "x"}, 400, "lora_path"),
    ({"lora_name": "x", "lora_path": "ADAPTER", "lora_int_id": 3}, 400, "lora_int_id"),
    ({"lora_name": "x", "lora_path": "relative/adapter"}, 400, "lora_path"),  # the server's cwd would decide
])
def test_bad_load_requests_name_the_field(api, http_adapter_dirs, tmp_path, body, status, param):
    not_an_adapter = tmp_path / "empty"
    not_an_adapter.mkdir()
    paths = {"NOT_AN_ADAPTER": str(not_an_adapter), "ADAPTER": str(http_adapter_dirs["a0"])}
    body = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    answer = post(api, "/v1/load_lora_adapter", body)
    assert answer.status_code == status and answer.json()["error"]["param"] == param, answer.text


def test_unload_of_unknown_or_base_names_the_field(api):
    unknown = post(api, "/v1/unload_lora_adapter", {"lora_name": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "lora_name"
    base = post(api, "/v1/unload_lora_adapter", {"lora_name": ""})
    assert base.status_code == 400 and base.json()["error"]["param"] == "lora_name"


def test_metrics_on_the_http_port_count_both_edges(api, client):
    """Guards: the HTTP edge's requests missing from the shared metrics (same names and labels
    as gRPC's), and the per-route HTTP counters."""
    before = api.metrics()
    client.chat.completions.create(model="a5", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                   temperature=0, extra_body={"ignore_eos": True})
    list(client.completions.create(model="a5", prompt="hi", max_tokens=3, stream=True,
                                   extra_body={"ignore_eos": True}))
    after = api.metrics()

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta('loradock_requests_total{adapter="a5",code="OK",method="ChatCompletions"}') == 1
    assert delta('loradock_requests_total{adapter="a5",code="OK",method="CompletionsStream"}') == 1
    assert delta('loradock_tokens_total{adapter="a5",kind="completion"}') == 6
    assert delta('loradock_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}') == 1
    assert delta('loradock_time_to_first_token_seconds_count{adapter="a5"}') == 2
    assert after['loradock_engine_requests_total{adapter="a5",version="1"}'] >= 2
    assert "loradock_engine_running" in after
