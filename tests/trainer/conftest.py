"""Trainer fixtures: small datasets on disk and a quick config for the tiny Llama."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def color_records(n: int = 24) -> list[dict]:
    """Alpaca records with one learnable pattern (item i -> a colour), for the tiny model."""
    colors = ["red", "blue", "green", "yellow", "purple", "orange"]
    return [
        {"instruction": f"What color is item {i}?", "input": "", "output": f"Item {i} is {colors[i % 6]}."}
        for i in range(n)
    ]


def write_json(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_config(root: Path, base_name: str) -> dict:
    """A config that trains the tiny Llama for a few seconds on 24 alpaca records under `root`."""
    write_json(root / "data" / "colors.json", color_records())
    return {
        "model_name_or_path": base_name,
        "dataset": "colors.json",
        "dataset_dir": str(root / "data"),
        "adapter_name": "colors",
        "lora_rank": 4,
        "learning_rate": 2.0e-2,
        "per_device_train_batch_size": 8,
        "max_steps": 12,
        "val_size": 4,
        "logging_steps": 4,
        "save_steps": 0,
        "lr_scheduler_type": "constant",
        "cutoff_len": 64,
        "output_dir": str(root / "run"),
    }


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_base, home: Path) -> dict:
    """make_tiny_config in this test's tmp_path, with LORADOCK_HOME set to a fresh registry."""
    return make_tiny_config(tmp_path, tiny_base.name)


@pytest.fixture(autouse=True)
def every_core():
    """Training runs on every core: an engine started earlier in the session with cpu_threads=1
    leaves torch on one thread process-wide, which made the facts test half again as slow."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)
