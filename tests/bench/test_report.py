"""Report writing: JSON keys (no NaN), markdown tables, the PNG plot, target checks."""

from __future__ import annotations

import json
import math

import pytest
from loradock.benchmarks.metrics import RequestRecord, summarize
from loradock.benchmarks.report import flat_summary, markdown, target_checks, write_reports
from loradock.benchmarks.run import assemble_run

SUMMARY_KEYS = {"tokens_per_s", "ratio_vs_peft_static", "ratio_vs_naive", "overhead_vs_base",
                "cold_load_p50_ms", "fraction_of_limit", "n_adapters", "errors",
                "machine_limit_tokens_per_s", "fraction_of_machine_limit", "ops_per_decode_step"}


def system(name: str, tokens_per_request: int, seconds: float, errors: int = 0) -> dict:
    records = [RequestRecord(i, 0, 16, tokens_per_request, 0.0, 0.1, seconds) for i in range(4)]
    records += [RequestRecord(9, 0, 16, 0, 0.0, None, seconds, "boom")] * errors
    return summarize(name, records, peak_rss_mb=300.0).to_json() | {"failure": None}


def results_doc(with_probes: bool = True) -> dict:
    runs = []
    for n in (8, 32):
        systems = {
            "loradock": system("loradock", 40, 1.0),  # 160 tokens/s
            "peft-static": system("peft-static", 40, 4.0),  # 40
            "peft-naive": system("peft-naive", 40, 16.0, errors=1),  # 10
            "base-only": system("base-only", 40, 0.8),  # 200
        }
        probes = {
            "decode_step": {"batch": 32, "adapters_step_ms": 12.0, "base_step_ms": 10.0, "ratio": 1.2},
            "cold_load": {"n": 5, "load_p50_ms": 45.0, "adapters": ["a@1"]},
            "ops_per_decode_step": {"1": 1000, "8": 1100, "32": 1300},
            "kv_concurrency": {"paged_concurrency": 40, "preallocated_concurrency": 8, "ratio": 5.0},
        } if with_probes else {}
        runs.append(assemble_run(n, systems, probes, {"tokens_per_s": 400.0}))
    return {
        "name": "unit", "created_at": "2026-01-01T00:00:00Z", "duration_s": 12.0,
        "config": {"quantize": "nf4", "dtype": "float32", "requests": 4, "rate": None, "clients": 4,
                   "max_running": 4, "prompt_len": [16, 128], "output_len": [16, 64], "seed": 0,
                   "headline_adapters": 32},
        "machine": {"cpus": 2, "torch": "2.13"},
        "base": {"name": "tiny", "fingerprint": "f", "parameters": 1},
        "limit": {"tokens_per_s": 400.0, "step_ms": 10.0, "batch": 4, "dtype": "float32", "linear_layers": 15},
        "runs": runs,
        "registry_ops": {"versions": 100, "names": 10, "publish_p50_ms": 30.0, "list_ms": 5.0},
    }


def test_flat_summary_figures():
    s = flat_summary(results_doc())
    assert set(s) >= SUMMARY_KEYS
    assert s["n_adapters"] == 32
    assert s["tokens_per_s"] == pytest.approx({"loradock": 160, "peft-static": 40, "peft-naive": 160 / 16,
                                               "base-only": 200})
    assert s["ratio_vs_peft_static"] == pytest.approx(4.0)
    assert s["ratio_vs_naive"] == pytest.approx(16.0)
    assert s["overhead_vs_base"] == pytest.approx(1.2)
    assert s["fraction_of_limit"]["loradock"] == pytest.approx(0.4)
    assert s["machine_limit_tokens_per_s"] == 400.0 and s["fraction_of_machine_limit"] == pytest.approx(0.4)
    assert s["ops_per_decode_step"] == {"1": 1000, "8": 1100, "32": 1300}
    assert s["ops_per_decode_step_growth"] == pytest.approx(1.3)
    assert s["kv_concurrency_ratio"] == 5.0
    assert s["errors"] == {"loradock": 0, "peft-static": 0, "peft-naive": 1, "base-only": 0}


def test_targets_met_and_missed():
    checks = {c["key"]: c["met"] for c in target_checks(flat_summary(results_doc()))}
    assert checks == {"ratio_vs_peft_static": True, "ratio_vs_naive": True, "overhead_vs_base": False,
                      "cold_load_p50_ms": False, "fraction_of_machine_limit": False,
                      "ops_per_decode_step_growth": False, "kv_concurrency_ratio": True}


def test_unmeasured_figures_become_null_not_nan(tmp_path):
    doc = results_doc(with_probes=False)
    paths = write_reports(doc, tmp_path, tmp_path / "summary.json")
    summary = json.loads(paths["summary"].read_text())  # strict JSON: NaN would not parse as null
    assert summary["overhead_vs_base"] is None and summary["cold_load_p50_ms"] is None
    assert "NaN" not in paths["json"].read_text()
    assert {c["key"]: c["met"] for c in json.loads(paths["json"].read_text())["targets"]}["cold_load_p50_ms"] is None


def test_write_reports_files(tmp_path):
    paths = write_reports(results_doc(), tmp_path / "out", tmp_path / "flat.json")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"unit.json", "unit.md", "unit.png"}
    doc = json.loads(paths["json"].read_text())
    assert {"config", "machine", "limit", "runs", "registry_ops", "summary", "targets"} <= set(doc)
    assert [r["n_adapters"] for r in doc["runs"]] == [8, 32]
    assert set(json.loads(paths["summary"].read_text())) >= SUMMARY_KEYS
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["plot"].stat().st_size > 10_000


def test_markdown_tables():
    text = markdown(results_doc())
    assert "## 8 adapters" in text and "## 32 adapters" in text
    rows = [line for line in text.splitlines() if line.startswith("| loradock |")]
    assert len(rows) == 2 and "160.0" in rows[0] and "0.400" in rows[0]
    assert "| peft-naive |" in text and text.count("| base-only |") == 2
    assert "| cold load p50 (ms), rank-16 attn+MLP | <= 30 | 45.00 | **no** |" in text
    assert "Registry at 100 versions" in text


def test_ratios_of_missing_systems_are_nan():
    run = assemble_run(4, {"loradock": system("loradock", 10, 1.0)}, {}, {})
    assert math.isnan(run["ratios"]["loradock_vs_peft_static"])
    assert math.isnan(run["fraction_of_limit"]["loradock"])
