"""End to end on the tiny Llama: `loradock train` -> a registry version PEFT can load."""

from __future__ import annotations

import contextlib
import io
import json
import os
from types import SimpleNamespace

import pytest
import torch
import yaml
from loradock.registry import Registry
from loradock.trainer import train
from loradock.trainer.datasets import load_datasets
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loradock.cli import main

from .conftest import make_tiny_config


@pytest.fixture(scope="module")
def published(tmp_path_factory, session_home, tiny_base):
    """Train once through the CLI into a registry of its own, shared by this module's tests."""
    root = tmp_path_factory.mktemp("train-tiny")
    (root / "home").mkdir()
    os.symlink(session_home / "bases", root / "home" / "bases")
    config = make_tiny_config(root, tiny_base.name)
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "adapter_name"}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--home", str(root / "home"), "train", str(path), "adapter_name=colors", "aliases=staging"])
    assert code == 0
    return SimpleNamespace(stdout=out.getvalue(), config=config, root=root, registry=Registry(root / "home"))


def test_loss_falls_and_the_version_records_how_it_was_made(published, tiny_base):
    assert published.stdout == "colors@1\n"  # the new ref is all the command prints
    version = published.registry.resolve("colors@staging")
    assert version.ref == "colors@1"
    manifest = version.manifest
    metrics = manifest["metrics"]
    assert metrics["steps"] == 12
    # A random tiny Llama starts near ln(vocab) = 10.8 and, behind its final RMSNorm and a
    # random head, cannot fall far in a few steps; half a nat is far beyond noise.
    assert metrics["train_loss"] < metrics["initial_loss"] - 0.5, metrics
    assert metrics["eval_loss"] < metrics["initial_loss"] - 0.3, metrics
    assert metrics["tokens_seen"] > 0 and metrics["wall_time_s"] > 0
    assert manifest["base"] == {"name": tiny_base.name, "fingerprint": tiny_base.fingerprint}
    assert manifest["training"]["base_fingerprint"] == tiny_base.fingerprint
    assert manifest["training"]["lora_rank"] == 4 and manifest["training"]["learning_rate"] == 2e-2
    assert manifest["source"] == {"kind": "trained"} and manifest["parent"] is None
    data = load_datasets(["colors.json"], published.config["dataset_dir"])
    assert manifest["dataset"]["digest"] == data.digest
    assert (manifest["dataset"]["records"], manifest["dataset"]["eval_examples"]) == (24, 4)
    assert manifest["dataset"]["truncated"] == 0
    assert (manifest["rank"], manifest["alpha"]) == (4, 8)
    assert sorted(manifest["target_modules"]) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"
    ]
    # The run folder describes itself: per-step log and the resolved config.
    run = published.root / "run"
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))
    assert log[-1] == {"step": 12, "eval_loss": metrics["eval_loss"]}
    # The manifest keeps the curve the console draws: every logged loss and eval loss, by step.
    assert metrics["curve"]["loss"] == [[r["step"], r["loss"]] for r in log if "loss" in r]
    assert metrics["curve"]["eval_loss"] == [[r["step"], r["eval_loss"]] for r in log if "eval_loss" in r]
    assert yaml.safe_load((run / "train_config.yaml").read_text())["adapter_name"] == "colors"


def test_published_adapter_loads_in_peft_and_changes_the_output(published, tiny_base):
    version = published.registry.resolve("colors@1")
    base = AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.float32)
    ids = torch.tensor([[1, 523, 1059, 314, 2103, 216, 34, 47]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, version.path)
        after = model(input_ids=ids).logits
        with model.disable_adapter():
            again = model(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(before, again)  # never merged: the base is untouched


def test_training_from_a_parent_starts_from_its_weights(published, tmp_path):
    registry = published.registry
    parent = registry.resolve("colors@1")
    child = train(
        {**published.config, "parent": "colors@staging", "adapter_name": None, "max_steps": 2,
         "output_dir": str(tmp_path / "child")},
        registry=registry,
    )
    assert child.ref == "colors@2"
    assert child.manifest["parent"] == "colors@1"
    # Starting from the parent's weights, the first loss is where the parent ended, not where it began.
    first = child.manifest["metrics"]["initial_loss"]
    assert first < parent.manifest["metrics"]["initial_loss"] - 0.5
    assert first == pytest.approx(parent.manifest["metrics"]["train_loss"], abs=0.25)
    assert registry.aliases("colors") == {"staging": 1}  # aliases move only when asked
