"""A canary over the OpenAI API: `canary@prod` sends 10% of its traffic to a new version, each
caller (OpenAI's `user`, or the X-Loradock-Route-Key header) stays on one version, and every
answer names the concrete version that served it."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.http.conftest import TINY_BASE, TOKEN

HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def test_a_ten_percent_canary_over_a_thousand_requests(api, http_registry, http_adapter_dirs):
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
    http_registry.rollback("canary", "prod", reason="done")
