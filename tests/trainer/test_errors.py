"""Bad input: errors name the key, file, line and field; nothing is ever published."""

from __future__ import annotations

import pytest
import yaml
from loradock.trainer import ConfigError, DatasetError, TrainerError, train

from loradock.cli import main

from .conftest import write_jsonl


def test_cli_reports_config_errors_without_a_traceback(tiny_config, tmp_path, registry, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({**tiny_config, "learning_rat": 1e-4, "lora_rank": "big"}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid training config (2 problems):")
    assert "learning_rat: unknown key; did you mean 'learning_rate'?" in err
    assert "lora_rank: expected a whole number, got 'big'" in err
    assert "Traceback" not in err
    assert main(["train", str(path), "learning_rat=", "lora_rank=4", "dataset=missing.json"]) == 2
    assert "error: invalid training config (1 problem):\n  - learning_rat: unknown key" in capsys.readouterr().err
    assert registry.list() == []


def test_bad_records_are_all_reported_and_nothing_is_trained(tiny_config, tmp_path, registry):
    bad = write_jsonl(tmp_path / "data" / "bad.jsonl", [
        {"instruction": "q", "output": "a"},
        {"instruction": "q2"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
    ])
    with pytest.raises(DatasetError) as e:
        train({**tiny_config, "dataset": "colors.json,bad.jsonl"})
    assert f"{bad} line 2: field 'output': missing" in str(e.value)
    assert f"{bad} line 3: field 'conversations[1].value': expected a non-empty string" in str(e.value)
    assert registry.list() == []
    assert not (tmp_path / "run").exists()  # no run folder for a run that never started


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model_name_or_path": "no-such-base"}, "model_name_or_path: unknown base 'no-such-base'; known bases: "),
        ({"parent": "ghost@1"}, "parent: "),
        ({"adapter_name": "../escape"}, "adapter_name: invalid name '../escape'"),
        ({"aliases": "1bad"}, "aliases: invalid alias '1bad'"),
        ({"dataset": "nope.json"}, "dataset 'nope.json': no such dataset name or file"),
        # Refused with the serving rules when the config is read, before the base is loaded ...
        ({"lora_target": "q_proj,lm_head"}, "lora_target: LoRA on lm_head (the embeddings or the output head) is "),
        # ... and a layer the base lacks once it is, with the base's real names.
        ({"lora_target": "q_proj,attn_out"}, "lora_target: attn_out not found in the base model; its linear layers "
                                            "are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        ({"val_size": 24}, "val_size 24 leaves no training records"),
        # LLaMA-Factory's cut keeps a share of every answer down to a couple of tokens.
        ({"cutoff_len": 2}, "no training examples left: all 20 lost their answers to cutoff_len 2"),
        ({"template": "qwen3_nothink"}, "template: 'qwen3_nothink' does not render conversations as the base"),
    ],
)
def test_bad_settings_are_named_before_training(tiny_config, registry, override, message):
    with pytest.raises(TrainerError) as e:
        train({**tiny_config, **override})
    assert message in str(e.value)
    assert registry.list() == []


def test_a_parent_of_another_shape_is_refused(tiny_config, tmp_path, registry):
    parent = train({**tiny_config, "max_steps": 1, "output_dir": str(tmp_path / "parent")})
    with pytest.raises(ConfigError, match=r"parent adapter .* does not fit this LoRA config \(shape differs"):
        train({**tiny_config, "parent": parent.ref, "lora_rank": 8, "output_dir": str(tmp_path / "child")})
    assert [v.ref for v in registry.versions("colors")] == [parent.ref]


def test_a_run_that_diverges_publishes_nothing(tiny_config, registry, monkeypatch):
    from loradock.trainer import loop

    real = loop.token_loss_sum
    monkeypatch.setattr(loop, "token_loss_sum", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(TrainerError, match=r"training diverged .* nothing was published"):
        train({**tiny_config, "max_steps": 2})
    assert registry.list() == []
