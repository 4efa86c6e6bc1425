"""A canary over the OpenAI API: `canary@prod` sends 10% of its traffic to a new version, each
caller (OpenAI's `user`, or the X-Loradock-Route-Key header) stays on one version, and every
answer names the concrete version that served it."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from loradock.cli import main
from tests.http.conftest import TINY_BASE, TOKEN

HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def test_a_ten_percent_canary_over_a_thousand_requests(api, http_registry, http_adapter_dirs, capsys):
    http_registry.publish(http_adapter_dirs["a2"], "canary", base=TINY_BASE, aliases=["prod"])
    http_registry.publish(http_adapter_dirs["a3"], "canary", base=TINY_BASE)
    http_registry.tag("canary@2", "prod", weight=10, reason="try v2 on a tenth")

    def served(user: str, header: str | None = None) -> str:
        headers = {**HEADERS, **({"X-Loradock-Route-Key": header} if header else {})}
        answer = httpx.post(f"{api.url}/v1/completions", headers=headers, timeout=60, json={
            "model": "canary@prod", "prompt": "Hi", "max_tokens": 1, "temperature": 0, "user": user})
        assert answer.status_code == 200, answer.text
        return answer.json()["model"]

    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(served, (f"user-{i}" for i in range(1000))))
    counts = Counter(models)
    assert set(counts) == {"canary@1", "canary@2"} and 70 <= counts["canary@2"] <= 130, counts
    assert {served("user-3") for _ in range(10)} == {models[3]}  # one caller, one version
    # the header wins over `user`: the version follows the header's key, whatever the user
    by_header = {served(f"someone-{i}", header="team-a") for i in range(10)}
    assert len(by_header) == 1

    # `loradock adapters canary` reads the server's per-version figures: every request above, on
    # the version that served it, with latencies
    assert main(["--home", str(http_registry.root), "adapters", "canary", "canary@prod", "--url",
                 f"{api.url}/metrics", "--json"]) == 0
    table = {row["VERSION"]: row for row in json.loads(capsys.readouterr().out)}
    served_by = Counter(models) + Counter([models[3]] * 10) + Counter([by_header.pop()] * 10)
    assert {v: int(row["REQUESTS"]) for v, row in table.items()} == dict(served_by), table
    assert table["canary@2"]["WEIGHT"] == "10%" and table["canary@1"]["ERRORS"] == "0"
    assert all(float(row["TTFT P50 MS"]) > 0 for row in table.values())
    http_registry.rollback("canary", "prod", reason="done")
