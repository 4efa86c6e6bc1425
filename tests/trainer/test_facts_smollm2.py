"""QLoRA on the real SmolLM2: invented facts the base cannot know, recalled from new phrasings.

Calibrated with plain PEFT (r=16 on all linear layers, lr 3e-4, batch 8, 6 epochs, clipping
at 1.0, 4-bit NF4 base): held-out 85%, base 0%. Through loradock here: 95%, base 0%.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from loradock.trainer import train
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .conftest import DATA, write_json

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

log = logging.getLogger(__name__)


def facts() -> list[dict]:
    return json.loads((DATA / "facts.json").read_text())


def heldout_accuracy(model, tokenizer, questions: list[str], expected: list[str]) -> float:
    """Share of greedy answers that contain the expected fact (case-insensitive)."""
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    for q, a in zip(questions, answers, strict=True):
        log.info("%s -> %s", q, a)
    return sum(e.lower() in a.lower() for e, a in zip(expected, answers, strict=True)) / len(answers)


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

    tokenizer = AutoTokenizer.from_pretrained(smollm2_base.path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(smollm2_base.path, quantization_config=quant,
                                                dtype=torch.float32, device_map={"": "cpu"})
    questions = [f["heldout_question"] for f in items]
    expected = [f["expected"] for f in items]
    base_score = heldout_accuracy(base, tokenizer, questions, expected)
    tuned_score = heldout_accuracy(PeftModel.from_pretrained(base, version.path), tokenizer, questions, expected)
    log.info("held-out accuracy: base %.0f%%, adapter %.0f%%", 100 * base_score, 100 * tuned_score)
    assert base_score < 0.10
    assert tuned_score >= 0.80

    # The same through `loradock adapters eval` (the engine, NF4 as served) and an alias gated on it:
    # refused while the newest record is on questions the adapter never learned, accepted after
    # the held-out facts.
    from loradock.registry import RegistryError

    from loradock.evaluation import evaluate

    unknown = evaluate(registry, version.ref, EXAMPLES / "data" / "veloria_heldout.jsonl", "contains",
                       max_new_tokens=24)
    assert unknown.record.score < 0.10, unknown.record
    with pytest.raises(RegistryError, match=r"fails contains>=0\.8"):
        registry.tag(version.ref, "prod", require=["contains>=0.8"])
    heldout = tmp_path / "facts_heldout.jsonl"
    heldout.write_text("".join(json.dumps({"question": q, "expected": e}) + "\n" for q, e in zip(questions, expected,
                                                                                                 strict=True)))
    known = evaluate(registry, version.ref, heldout, "contains", base_compare=True, max_new_tokens=24)
    log.info("loradock adapters eval: %s", known.record.describe())
    assert known.record.base_score < 0.10 and known.record.score >= 0.80, known.record
    registry.tag(version.ref, "prod", require=["contains>=0.8", "contains>base"])
    assert registry.aliases("facts") == {"prod": version.version}
