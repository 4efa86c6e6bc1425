"""The loradock Serve application on a local Ray: two engine replicas behind the OpenAI API."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from loradock.registry.canary import choose
from loradock.runtime import Engine
from loradock.runtime.types import ChatMessage, GenerationRequest, SamplingParams

from .conftest import ADAPTERS, REPLICAS, Cluster

pytestmark = pytest.mark.slow

QUESTION = "Name three colours."
MAX_TOKENS = 12


def chat(cluster: Cluster, model: str, question: str = QUESTION, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    return httpx.post(f"{cluster.url}/v1/chat/completions", timeout=120, json={
        "model": model, "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": question}]})


def reference(engine: Engine, ref: str | None, question: str = QUESTION, max_tokens: int = MAX_TOKENS) -> str:
    request = GenerationRequest(adapter=ref, messages=(ChatMessage("user", question),),
                                sampling=SamplingParams(max_new_tokens=max_tokens, temperature=0.0))
    return engine.generate(request, timeout=120).text


def test_greedy_answers_equal_the_single_engine(cluster: Cluster, reference_engine: Engine):
    answers = {}
    for model in ["", *ADAPTERS]:
        response = chat(cluster, model)
        assert response.status_code == 200, response.text
        body = response.json()
        ref = f"{model}@1" if model else None
        assert body["model"] == (ref or reference_engine.info().base_name)
        answers[model] = body["choices"][0]["message"]["content"]
        assert answers[model] == reference(reference_engine, ref), model
    assert len(set(answers.values())) == len(answers), "the adapters must change the answer"


def served_by(cluster: Cluster, adapter: str, version: str = "1") -> dict[str, dict[str, float]]:
    """{replica: counters} for one adapter version, as the replicas reported them."""
    return {replica: stats for (replica, name, v), stats in cluster.metrics().items()
            if name == adapter and v == version}


def test_requests_for_an_adapter_land_on_the_replica_holding_it(cluster: Cluster):
    for name in ADAPTERS:  # every adapter version is held by some replica (pinned there)
        assert chat(cluster, name, max_tokens=2).status_code == 200
    before = {name: served_by(cluster, name) for name in ADAPTERS}
    rounds = 5
    for _ in range(rounds):
        for name in ADAPTERS:
            assert chat(cluster, f"{name}@1", max_tokens=2).status_code == 200
    holders = set()
    for name in ADAPTERS:
        after = served_by(cluster, name)
        grew = {r: after[r]["requests"] - before[name].get(r, {}).get("requests", 0) for r in after}
        busy = [r for r, n in grew.items() if n]
        assert len(busy) == 1 and grew[busy[0]] == rounds, (name, grew)  # one replica took them all
        assert sum(s["loads"] for s in after.values()) == sum(s["loads"] for s in before[name].values())
        assert after[busy[0]]["cache_hits"] >= rounds
        holders.add(busy[0])
    assert len(holders) == 2, "two replicas, four adapters: the router spreads the versions"


def test_an_alias_move_is_served_by_the_new_version_on_every_replica(cluster: Cluster, reference_engine: Engine):
    registry = cluster.registry
    first = chat(cluster, "mover@prod").json()
    assert first["model"] == "mover@1"
    assert first["choices"][0]["message"]["content"] == reference(reference_engine, "mover@1")
    replicas_before = {r for (r, _, _) in cluster.metrics()}
    registry.tag("mover@2", "prod")
    try:
        expected = reference(reference_engine, "mover@2")
        assert expected != first["choices"][0]["message"]["content"]
        # Warm promotion: mover@1 answers until a replica has loaded mover@2, never an error
        models = [chat(cluster, "mover@prod", max_tokens=2).json()["model"]]
        deadline = time.monotonic() + 60
        while models[-1] != "mover@2" and time.monotonic() < deadline:
            models.append(chat(cluster, "mover@prod", max_tokens=2).json()["model"])
        assert models[-1] == "mover@2" and set(models[:-1]) <= {"mover@1"}, models
        # Concurrent requests past one replica's max_ongoing_requests (2) reach both replicas.
        with httpx.Client(timeout=120) as client:
            import concurrent.futures as cf

            def ask(_: int) -> dict:
                return client.post(f"{cluster.url}/v1/chat/completions", json={
                    "model": "mover@prod", "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                    "messages": [{"role": "user", "content": QUESTION}]}).json()

            with cf.ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(ask, range(16)))
        assert {a["model"] for a in answers} == {"mover@2"}
        replicas = served_by(cluster, "mover", "2")
        assert len(replicas) == REPLICAS, "served by both replicas"
        assert replicas_before <= set(replicas), "by the replicas that served before: no restart"
        assert all(s["requests"] > 0 for s in replicas.values())
        reference_ignoring_eos = reference_engine.generate(GenerationRequest(
            adapter="mover@2", messages=(ChatMessage("user", QUESTION),),
            sampling=SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))).text
        assert {a["choices"][0]["message"]["content"] for a in answers} == {reference_ignoring_eos}
    finally:
        registry.tag("mover@1", "prod")


def test_a_canary_splits_traffic_across_the_replicas_by_route_key(cluster: Cluster):
    """The ingress routes each request of a 10% canary once (by its `user`), the replicas serve
    the concrete version: ~10% of 1,000 requests on the canary, one caller on one version."""
    import concurrent.futures as cf

    registry = cluster.registry
    registry.tag("mover@2", "prod", weight=10, reason="cluster canary")
    try:
        with httpx.Client(timeout=120) as client:
            def ask(user: str) -> str:
                answer = client.post(f"{cluster.url}/v1/completions", json={
                    "model": "mover@prod", "prompt": "Hi", "max_tokens": 1, "temperature": 0, "user": user})
                assert answer.status_code == 200, answer.text
                return answer.json()["model"]

            # Warm promotion: the alias keeps its previous target until a replica has loaded the
            # versions the canary adds; go on once a caller of each version gets it.
            split = {1: 90, 2: 10}
            probes = {v: next(f"probe-{i}" for i in range(1000) if choose(split, "mover@prod", f"probe-{i}") == v)
                      for v in split}
            deadline = time.monotonic() + 60
            while any(ask(key) != f"mover@{v}" for v, key in probes.items()) and time.monotonic() < deadline:
                time.sleep(0.1)
            with cf.ThreadPoolExecutor(8) as pool:
                models = list(pool.map(ask, (f"user-{i}" for i in range(1000))))
            again = {ask("user-5") for _ in range(8)}
        canary = models.count("mover@2")
        assert set(models) == {"mover@1", "mover@2"} and 70 <= canary <= 130, canary
        assert again == {models[5]}
    finally:
        registry.tag("mover@1", "prod")


def test_a_version_a_replica_cannot_load_fails_only_its_requests(cluster: Cluster):
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(4) as pool:
        bad = pool.submit(chat, cluster, "broken")
        good = [pool.submit(chat, cluster, name) for name in ADAPTERS[:3]]
        response = bad.result()
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "model_unavailable" and "broken@1" in error["message"]
        assert "digest" in error["message"].lower() or "match" in error["message"].lower(), error["message"]
        assert [g.result().status_code for g in good] == [200, 200, 200]


def test_the_openai_client_works_against_the_cluster(cluster: Cluster, reference_engine: Engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    ids = {m.id for m in client.models.list().data}
    assert {"c0", "c0@1", "mover@prod", "mover@2", reference_engine.info().base_name} <= ids
    answer = client.chat.completions.create(model="c2", temperature=0, max_tokens=MAX_TOKENS,
                                            messages=[{"role": "user", "content": QUESTION}])
    assert answer.model == "c2@1"
    assert answer.choices[0].message.content == reference(reference_engine, "c2@1")
    stream = client.chat.completions.create(model="c3@1", temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                            messages=[{"role": "user", "content": QUESTION}])
    chunks = list(stream)
    assert {c.model for c in chunks} == {"c3@1"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(reference_engine, "c3@1")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nosuch", messages=[{"role": "user", "content": "hi"}])
    # The ingress serves the console too: the registry's pages, and a serving page that says where
    # a cluster's figures are (its replicas hold the engines).
    assert 'href="/ui/adapters/c2/1"' in httpx.get(f"{cluster.url}/ui/adapters", timeout=30).text
    serving = httpx.get(f"{cluster.url}/ui/serving", timeout=30)
    assert serving.status_code == 200 and "cluster's ingress" in serving.text
    assert 'value="c2"' in httpx.get(f"{cluster.url}/ui/playground", timeout=30).text


def test_the_busiest_adapter_gets_a_home_on_both_replicas(cluster: Cluster):
    """A version with 50 of the ingress's recent requests is hot (runtime/cluster/hot.py): its
    requests, spread by caller, then go to two homes, so both replicas serve it."""
    before = served_by(cluster, "c1")

    def ask(i: int) -> None:
        response = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=120, json={
            "model": "c1@1", "max_tokens": 2, "user": f"caller-{i}",
            "messages": [{"role": "user", "content": QUESTION}]})
        assert response.status_code == 200, response.text

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(ask, range(90)))
    after = served_by(cluster, "c1")
    grew = {r: after[r]["requests"] - before.get(r, {}).get("requests", 0) for r in after}
    assert sum(grew.values()) == 90 and len(grew) == REPLICAS, grew
    assert min(grew.values()) >= 8, grew  # the second home takes a real share, not a stray request


def test_a_killed_replica_loses_no_request_the_client_retries(cluster: Cluster, reference_engine: Engine):
    """Kill the replica holding `victim` while it serves victim's requests: each one either
    completes or gets a 503 whose retry completes on the other replica, with the single engine's
    answer."""
    import concurrent.futures as cf
    import threading

    import ray

    assert chat(cluster, "victim", max_tokens=2).status_code == 200
    (holder,) = served_by(cluster, "victim")  # the one replica that loaded it
    long_tokens = 160
    expected = reference_engine.generate(GenerationRequest(
        adapter="victim@1", messages=(ChatMessage("user", QUESTION),),
        sampling=SamplingParams(max_new_tokens=long_tokens, temperature=0.0, ignore_eos=True))).text
    retries = []
    lock = threading.Lock()

    def ask(_: int) -> str:
        for _attempt in range(10):
            response = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=180, json={
                "model": "victim", "temperature": 0, "max_tokens": long_tokens, "ignore_eos": True,
                "messages": [{"role": "user", "content": QUESTION}]})
            if response.status_code != 503:
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["message"]["content"]
            with lock:
                retries.append(response.json()["error"]["message"])
        raise AssertionError(f"no success after 10 tries: {retries[-1]}")

    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, i) for i in range(4)]
        time.sleep(0.5)  # the requests are decoding (160 tokens take seconds here)
        assert not any(f.done() for f in futures), "the requests finished before the kill"
        actor = ray.get_actor(f"SERVE_REPLICA::loradock#EngineReplica#{holder}", namespace="serve")
        ray.kill(actor, no_restart=True)
        answers = [f.result() for f in futures]
    assert answers == [expected] * 4
    assert retries, "no request was running on the killed replica: nothing was tested"
    assert all("replica" in m for m in retries), retries

