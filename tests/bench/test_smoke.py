"""One tiny end-to-end run of `loradock bench` on the tiny random Llama: every system,
real worker processes, a real `loradock serve` child, real files out."""

from __future__ import annotations

import json

import pytest

from loradock.cli import main

pytestmark = pytest.mark.slow  # ~1-2 minutes: six Python processes each load torch and a model


def test_bench_smoke_every_system(tiny_base, home, tmp_path, capsys):
    out, summary_path = tmp_path / "results", tmp_path / "summary.json"
    code = main([
        "--home", str(home), "bench", "--name", "smoke", "--base", tiny_base.name,
        "--bench-home", str(tmp_path / "bench-registry"), "--out-dir", str(out),
        "--json", str(summary_path), "--adapters", "3", "--requests", "6", "--clients", "3",
        "--max-running", "3", "--prompt-len", "16", "24", "--output-len", "4", "8",
        "--cold-samples", "2", "--registry-versions", "12",
    ])
    assert code == 0
    summary = json.loads(summary_path.read_text())
    systems = {"loradock", "loradock-grpc", "loradock-http", "peft-static", "peft-naive", "base-only"}
    assert set(summary["tokens_per_s"]) == systems
    assert summary["errors"] == dict.fromkeys(systems, 0)
    assert all(v > 0 for v in summary["tokens_per_s"].values())
    assert summary["n_adapters"] == 3
    for key in ("ratio_vs_peft_static", "ratio_vs_naive", "overhead_vs_base", "cold_load_p50_ms"):
        assert isinstance(summary[key], float), key
    assert summary["fraction_of_limit"]["loradock"] > 0
    assert summary["machine_limit_dtype"] in ("float32", "bfloat16")
    assert 0 < summary["fraction_of_machine_limit"] == summary["fraction_of_limit"]["loradock"]
    assert set(summary["ops_per_decode_step"]) == {"1", "8", "32"}
    assert summary["ops_per_decode_step_growth"] < 1.5, "per-step ops must not grow with the batch"
    assert summary["kv_concurrency_ratio"] >= 2, "the paged pool runs more sequences on the same bytes"
    assert summary["registry_ops"]["versions"] == 12

    doc = json.loads((out / "smoke.json").read_text())
    run = doc["runs"][0]
    # every request of every system produced exactly its requested number of tokens
    assert all(s["n_requests"] == 6 and s["errors"] == 0 for s in run["systems"].values())
    outputs = {s["output_tokens"] for s in run["systems"].values()}
    assert len(outputs) == 1, f"systems disagree on the workload's output tokens: {outputs}"
    assert run["probes"]["alias_move"]["version_before"] == 1
    assert run["probes"]["decode_step"]["distinct_adapters"] == 3
    # 3 of each adapter's 4 requests take its 192-token system prompt from the prefix cache.
    assert run["probes"]["prefix_cache"]["cached_prompt_fraction"] == pytest.approx(3 * 192 / (4 * 208))
    assert summary["prefix_cache_speedup"] > 0
    assert (out / "smoke.png").stat().st_size > 0
    assert "| loradock-grpc |" in (out / "smoke.md").read_text()
    assert "| loradock-http |" in (out / "smoke.md").read_text()
    assert "| loradock |" in capsys.readouterr().out
