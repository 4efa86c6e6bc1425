"""QLoRA on the real SmolLM2: invented facts the base cannot know, recalled from new phrasings.

Calibrated with plain PEFT (r=16 on all linear layers, lr 3e-4, batch 8, 6 epochs, clipping
at 1.0, 4-bit NF4 base): held-out 85%, base 0%. Through loradock here: 95% with HF generate +
PeftModel, 90% through `loradock adapters eval` (which this test now uses), base 0%.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from loradock.trainer import train

from .conftest import DATA, write_json

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

log = logging.getLogger(__name__)


def facts() -> list[dict]:
    return json.loads((DATA / "facts.json").read_text())


def test_facts_dataset_holds_out_new_phrasings():
    items = facts()
    assert len(items) == 20
    trained = {q for f in items for q in f["train_questions"]}
    assert len(trained) == 80
    for f in items:
        assert f["heldout_question"] not in trained
        assert f["expected"] in f["answer"]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 60 QLoRA steps: ~3 min on 2 idle cores, over 20 when they are shared
def test_qlora_learns_invented_facts_the_base_does_not_know(smollm2_base, registry, tmp_path: Path):
    items = facts()
    records = [{"instruction": q, "input": "", "output": f["answer"]} for f in items for q in f["train_questions"]]
    write_json(tmp_path / "facts.json", records)
    version = train({
        "model_name_or_path": smollm2_base.name,
        "dataset": "facts.json",
        "dataset_dir": str(tmp_path),
        "adapter_name": "facts",
        "quantization_bit": 4,
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_target": "all",
        "learning_rate": 3e-4,
        "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 8,
        "num_train_epochs": 6,
        "max_grad_norm": 1.0,
        "cutoff_len": 128,
        "save_steps": 0,
        "output_dir": str(tmp_path / "run"),
    })
    metrics = version.manifest["metrics"]
    log.info("facts: %s", metrics)
    assert metrics["steps"] == 60 and metrics["quantization_bit"] == 4
    assert metrics["initial_loss"] > 1.0 and metrics["train_loss"] < 0.1, metrics

    # Held-out accuracy through `loradock adapters eval` (the engine serving NF4, which the oracle
    # tests hold equal to PeftModel), and an alias gated on it: refused while the newest record is
    # on questions the adapter never learned, accepted after the held-out facts.
    from loradock.registry import RegistryError

    from loradock.evaluation import evaluate

    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text("".join((EXAMPLES / "data" / "veloria_heldout.jsonl").read_text().splitlines(True)[:5]))
    record = evaluate(registry, version.ref, unknown, "contains", max_new_tokens=24).record
    assert record.score < 0.10, record
    with pytest.raises(RegistryError, match=r"fails contains>=0\.8"):
        registry.tag(version.ref, "prod", require=["contains>=0.8"])
    heldout = tmp_path / "facts_heldout.jsonl"
    heldout.write_text("".join(json.dumps({"question": f["heldout_question"], "expected": f["expected"]}) + "\n"
                               for f in items))
    record = evaluate(registry, version.ref, heldout, "contains", base_compare=True, max_new_tokens=24).record
    log.info("held-out accuracy (loradock adapters eval): %s", record.describe())
    assert record.base_score < 0.10 and record.score >= 0.80, record
    registry.tag(version.ref, "prod", require=["contains>=0.8", "contains>base"])
    assert registry.aliases("facts") == {"prod": version.version}
