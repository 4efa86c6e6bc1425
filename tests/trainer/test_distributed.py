"""Data parallel on CPU: `torchrun --nproc_per_node 2 loradock train ...` (gloo) publishes once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from loradock.trainer.datasets import load_datasets
from loradock.trainer.templates import tokenize_split
from transformers import AutoTokenizer


def test_two_process_data_parallel_run_publishes_exactly_one_version(tiny_config, tiny_base, tmp_path, home, registry):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**tiny_config, "max_steps": 4, "per_device_train_batch_size": 4}))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "LORADOCK_HOME": str(home), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2",
         str(bin_dir / "loradock"), "train", str(config)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["colors@1"]  # one process reports, one version exists
    assert [v.ref for v in registry.versions("colors")] == ["colors@1"]
    metrics = registry.resolve("colors@1").manifest["metrics"]
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    # Every step's loss and token count are global: both ranks' batches, reduced.
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[-1]["tokens_seen"] == metrics["tokens_seen"]
    # 20 training examples split over 2 ranks = 10 each, in batches of 4, 4, 2 per epoch:
    # 4 steps use 14 examples per rank, 28 in all. The count must cover both ranks.
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    conversations = load_datasets(["colors.json"], tiny_config["dataset_dir"]).conversations
    lengths = [len(e.input_ids) for e in tokenize_split(tokenizer, conversations, 64).examples]
    assert 28 * min(lengths) > 14 * max(lengths)
    assert 28 * min(lengths) <= metrics["tokens_seen"] <= 28 * max(lengths)
