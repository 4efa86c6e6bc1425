"""Checkpoints: resuming gives exactly the weights of a run that was never stopped."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from loradock.trainer import CheckpointError, train
from safetensors.torch import load_file, save_file


def weights(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def log(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in log(run_dir) if "loss" in r}


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
    # Guards against a resume that restores nothing and retrains from step 0 (which ends with the
    # same weights): the resumed run's log begins right after the checkpoint's step.
    assert [r["step"] for r in log(resumed)] == [4, 5, 6]
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name
    assert [losses(resumed)[s] for s in (4, 5, 6)] == [losses(whole)[s] for s in (4, 5, 6)]

    # `latest` finds the newest checkpoint in output_dir; a different config is refused by name.
    with pytest.raises(CheckpointError, match=r"different config \(lora_rank: 4 -> 8\)"):
        train({**config, "output_dir": str(whole), "resume_from_checkpoint": "latest", "lora_rank": 8})
    assert registry.list() == []


def test_resume_continues_from_what_the_checkpoint_holds(tiny_config, tmp_path):
    """Guards against a resume that validates the checkpoint but ignores its weights or optimizer."""
    config = {**tiny_config, "publish": False, "max_steps": 3, "save_steps": 2, "val_size": 0}
    train({**config, "output_dir": str(tmp_path / "whole")})

    def resume_from(checkpoint):
        out = tmp_path / f"resumed-{checkpoint.name}"
        train({**config, "output_dir": str(out), "resume_from_checkpoint": str(checkpoint)})
        return weights(out)

    def bump_lora_weight(checkpoint):
        path = checkpoint / "adapter_model.safetensors"
        saved = load_file(str(path))
        name = sorted(k for k in saved if "lora_A" in k)[0]
        saved[name] += 0.5
        save_file(saved, str(path))
        return name

    def bump_optimizer_moment(checkpoint):
        path = checkpoint / "optimizer.pt"
        saved = torch.load(path, weights_only=True)
        saved["state"][0]["exp_avg"] += 1.0
        torch.save(saved, path)

    # The baseline is a resume from the untouched checkpoint under the same code, so a resume
    # that ignores a file gives the same weights with and without the change to it.
    baseline = resume_from(tmp_path / "whole" / "checkpoint-2")
    for perturb in (bump_lora_weight, bump_optimizer_moment):
        checkpoint = tmp_path / perturb.__name__
        shutil.copytree(tmp_path / "whole" / "checkpoint-2", checkpoint)
        bumped = perturb(checkpoint)
        b = resume_from(checkpoint)
        assert any(not torch.equal(baseline[k], b[k]) for k in baseline), perturb.__name__
        if bumped:  # one more AdamW step (lr 2e-2) cannot undo most of the +0.5
            assert (b[bumped] - baseline[bumped]).mean().item() == pytest.approx(0.5, abs=0.1)


def test_an_existing_run_folder_is_not_overwritten_by_accident(tiny_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(Exception, match="already holds a run; set resume_from_checkpoint: latest"):
        train({**tiny_config, "publish": False})
    assert (run / "train_log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        train({**tiny_config, "publish": False, "resume_from_checkpoint": "latest"})
