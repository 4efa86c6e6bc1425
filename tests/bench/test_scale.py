"""The 8B scale benchmark's script (`make gpu-bench-scale`), run whole at its tiny shape: every
phase runs and every figure the GPU run reports is written (the figures themselves mean nothing here)."""

from __future__ import annotations

import json

from loradock.benchmarks import scale


def test_the_scale_script_runs_every_phase_and_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "results"
    assert scale.main(["--shape", "tiny", "--adapters", "4", "--requests", "8", "--concurrency", "4",
                       "--work", str(tmp_path / "work"), "--out-dir", str(out)]) == 0
    figures = json.loads((out / "scale-tiny.summary.json").read_text())
    assert figures["errors"] == 0 and figures["tokens_per_s"] > 0
    for key in ("fraction_of_bandwidth_floor", "fraction_of_compute_floor", "lora_overhead_vs_base",
                "ttft_p50_over_single_prefill", "ratio_vs_hf_peft", "copy_bandwidth_gb_s", "matmul_tflops"):
        assert figures[key] > 0, key
    assert figures["decode_step_ms"]["sequences"] == 4 and figures["device"] and figures["base"]
    assert set(figures["setup_s"]) >= {"device floors", "base", "4 adapters", "engine start", "decode steps"}
    assert "| tokens_per_s |" in (out / "scale-tiny.md").read_text()


def test_lora_bytes_count_every_projection_at_the_adapters_rank():
    from types import SimpleNamespace

    llama8b = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                              num_key_value_heads=8, num_hidden_layers=32)
    # per layer: q, o 4096+4096; k, v 4096+1024; gate, up, down 4096+14336 -> 81,920 x rank
    assert scale.lora_bytes(llama8b, 16, 2) == 16 * 81920 * 32 * 2
