"""Checkpoints: resuming gives exactly the weights of a run that was never stopped."""

from __future__ import annotations

import json

import pytest
from loradock.trainer import CheckpointError, train
from safetensors.torch import load_file


def weights(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def losses(run_dir):
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tiny_config, tmp_path, registry):
    # Dropout and two epochs make the RNG and the position in the data matter.
    config = {**tiny_config, "publish": False, "max_steps": 6, "save_steps": 3, "val_size": 0,
              "lora_dropout": 0.2, "per_device_train_batch_size": 6, "gradient_accumulation_steps": 2,
              "lr_scheduler_type": "cosine", "warmup_ratio": 0.2}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train({**config, "output_dir": str(whole)}) is None
    assert sorted(p.name for p in whole.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    # The resumed run starts in a fresh folder from the step-3 checkpoint of the first.
    train({**config, "output_dir": str(resumed), "resume_from_checkpoint": str(whole / "checkpoint-3")})
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name
    assert [losses(resumed)[s] for s in (4, 5, 6)] == [losses(whole)[s] for s in (4, 5, 6)]

    # `latest` finds the newest checkpoint in output_dir; a different config is refused by name.
    with pytest.raises(CheckpointError, match=r"different config \(lora_rank: 4 -> 8\)"):
        train({**config, "output_dir": str(whole), "resume_from_checkpoint": "latest", "lora_rank": 8})
    assert registry.list() == []


def test_an_existing_run_folder_is_not_overwritten_by_accident(tiny_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(Exception, match="already holds a run; set resume_from_checkpoint: latest"):
        train({**tiny_config, "publish": False})
    assert (run / "train_log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        train({**tiny_config, "publish": False, "resume_from_checkpoint": "latest"})
