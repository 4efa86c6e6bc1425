"""Evaluation records beside versions, and alias moves gated on them (`tag --require`); the
`loradock adapters eval` command end to end on the tiny base."""

from __future__ import annotations

import doctest
import hashlib
import json
from types import SimpleNamespace

import pytest
from loradock.registry import EvalRecord, Registry, RegistryError, evals

from loradock import heldout
from loradock.cli import main

DIGEST = hashlib.sha256(b"questions").hexdigest()


def record(score: float, metric: str = "contains", base: float | None = None) -> EvalRecord:
    return EvalRecord(metric=metric, score=score, examples=20, dataset="qa.jsonl", dataset_digest=DIGEST,
                      base_score=base, settings={"max_new_tokens": 24})


@pytest.fixture
def published(home, lora_dir, lora_dir_2) -> Registry:
    registry = Registry(home)
    registry.publish(lora_dir, "medical", aliases=["prod"])
    registry.publish(lora_dir_2, "medical")
    return registry


def test_records_are_kept_beside_the_version_oldest_first(published):
    generation = published.generation()
    kept = published.record_eval("medical@2", record(0.4))
    published.record_eval("medical", record(0.9, base=0.05))  # latest = 2
    assert published.generation() > generation, "readers caching per generation must see new records"
    assert [r.score for r in published.evals("medical@2")] == [0.4, 0.9]
    assert published.evals("medical@1") == []
    assert kept.time.endswith("+00:00") and "@" in kept.by
    # the version's own files are untouched: it still verifies
    assert all(r.ok for r in published.verify("medical@2"))


@pytest.mark.parametrize(("bad", "why"), [
    (dict(metric="bleu"), "metric 'bleu'"),
    (dict(score=1.5), "score 1.5"),
    (dict(base_score=-0.1), "base_score -0.1"),
    (dict(examples=0), "examples 0"),
    (dict(dataset_digest="abc"), "sha256"),
])
def test_a_bad_record_is_refused_and_nothing_is_written(published, bad, why):
    good = record(0.5)
    with pytest.raises(RegistryError, match=why):
        published.record_eval("medical@2", EvalRecord(**{**good.__dict__, **bad}))
    assert published.evals("medical@2") == []


def test_tag_require_refuses_without_a_passing_record_and_moves_nothing(published):
    def prod() -> int:
        return published.aliases("medical")["prod"]

    moves = len(published.alias_history("medical", "prod")["prod"])  # publish --alias prod
    with pytest.raises(RegistryError, match=r"medical@2 has no contains evaluation on record .*adapters eval"):
        published.tag("medical@2", "prod", require=["contains>=0.8"])
    published.record_eval("medical@2", record(0.45, base=0.0))
    with pytest.raises(RegistryError, match=r"not moving medical@prod to medical@2: medical@2 fails contains>=0.8: "
                                            r"contains 0.45 \(base 0.00\) on qa.jsonl"):
        published.tag("medical@2", "prod", require=["contains>=0.8", "contains>base"])
    assert prod() == 1
    assert len(published.alias_history("medical", "prod")["prod"]) == moves, "a refused move is no move"

    published.record_eval("medical@2", record(0.85, base=0.0))
    published.tag("medical@2", "prod", require=["contains>=0.8", "contains>base"])
    assert prod() == 2


def test_the_newest_record_of_the_metric_decides(published):
    published.record_eval("medical@2", record(0.9))
    published.record_eval("medical@2", record(0.3, metric="rouge-l"))
    published.tag("medical@2", "prod", require=["contains>=0.8"])  # rouge-l's record does not count
    published.record_eval("medical@2", record(0.5))  # a newer, failing contains record
    with pytest.raises(RegistryError, match=r"fails contains>=0.8: contains 0.50"):
        published.tag("medical@2", "canary", require=["contains>=0.8"])
    with pytest.raises(RegistryError, match="no base score to compare"):
        published.tag("medical@2", "canary", require=["contains>base"])


@pytest.mark.parametrize("text", ["contains=>0.8", "bleu>=0.5", "contains>=", "contains >= high", ">=0.8"])
def test_a_malformed_requirement_names_the_expected_form(published, text):
    with pytest.raises(RegistryError, match="expected METRIC OP VALUE"):
        published.tag("medical@2", "prod", require=[text])


def test_deleting_a_version_deletes_its_records(published, lora_dir):
    published.record_eval("medical@2", record(0.9))
    published.delete("medical@2")
    assert published.publish(lora_dir, "medical").version == 3  # numbers are never reused
    assert published.evals("medical@3") == []
    assert not (published.root / "adapters/medical/evals/2.jsonl").exists()


def test_a_hand_edited_record_file_is_reported_with_its_line(published):
    published.record_eval("medical@2", record(0.9))
    path = published.root / "adapters/medical/evals/2.jsonl"
    path.chmod(0o644)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(RegistryError, match=r"evals/2.jsonl:2: not an evaluation record"):
        published.evals("medical@2")


@pytest.mark.parametrize("module", [evals, heldout])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


def test_metrics_score_what_they_say():
    assert heldout.score_answer("rouge-l", "Kelvaris is the capital", "the capital is Kelvaris") == pytest.approx(0.5)
    assert heldout.score_answer("rouge-l", "same words here", "same words here") == 1.0
    assert heldout.score_answer("regex", "order QF-7721 today", r"^QF") == 0.0
    assert heldout.score_answer("contains", "Its price is $1,385.", "$1385") == 1.0
    assert heldout.score_answer("exact", "Its price is $1,385.", "$1385") == 0.0


def test_eval_command_records_and_gates(home, tiny_base, lora_dir, tmp_path, capsys):
    """`loradock adapters eval` on the tiny base (random weights: any answer matches `.`, none
    states an impossible fact), its record in `adapters show` and /v1/models, and `tag --require`."""
    from loradock.runtime.http.models import ModelCatalog

    registry = Registry(home)
    registry.publish(lora_dir, "medical", base=tiny_base.name)
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"Question {i}?", "expected": expected})
                              for i, expected in enumerate([".", ".", "."])) + "\n")
    code = main(["adapters", "eval", "medical", "--data", str(data), "--metric", "regex", "--base-compare",
                 "--max-new-tokens", "4", "--quantize", "none"])
    out = capsys.readouterr().out
    assert code == 0 and "medical@1: regex 1.00 (base 1.00) on qa.jsonl" in out and "(recorded)" in out
    [kept] = registry.evals("medical@1")
    assert (kept.metric, kept.score, kept.base_score, kept.examples) == ("regex", 1.0, 1.0, 3)
    assert kept.dataset_digest == hashlib.sha256(data.read_bytes()).hexdigest()
    assert kept.settings["quantize"] == "none" and kept.settings["max_new_tokens"] == 4

    data.write_text(json.dumps({"question": "Hi?", "expected": "zq-never-said"}) + "\n")
    assert main(["adapters", "eval", "medical@1", "--data", str(data), "--json", "--max-new-tokens", "2",
                 "--quantize", "none"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["record"]["score"] == 0.0 and len(shown["answers"]) == 1

    assert main(["adapters", "tag", "medical@1", "prod", "--require", "contains>=0.5"]) == 2
    assert "fails contains>=0.5: contains 0.00" in capsys.readouterr().err
    assert main(["adapters", "tag", "medical@1", "prod", "--require", "regex>=0.9"]) == 0
    capsys.readouterr()
    assert main(["adapters", "show", "medical@prod"]) == 0
    out = capsys.readouterr().out
    assert "evaluations:" in out and "regex 1.00 (base 1.00) on qa.jsonl" in out and "contains 0.00" in out

    engine = SimpleNamespace(info=lambda: SimpleNamespace(
        base_name=tiny_base.name, base_fingerprint=tiny_base.fingerprint, max_rank=64, max_model_len=512,
        max_prompt_tokens=256))
    card = ModelCatalog(engine, registry).card("medical@prod")
    assert [(e.metric, e.score, e.base_score) for e in card.evals] == [("contains", 0.0, None), ("regex", 1.0, 1.0)]


def test_eval_refuses_bad_input_before_loading_anything(home, lora_dir, tmp_path, capsys):
    registry = Registry(home)
    registry.publish(lora_dir, "medical")
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "Q?", "expected": "([unclosed"}) + "\n")
    assert main(["adapters", "eval", "medical", "--data", str(data), "--metric", "regex"]) == 2
    assert "is not a regular expression" in capsys.readouterr().err
    assert main(["adapters", "eval", "medical", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "held-out question file not found" in capsys.readouterr().err
    assert registry.evals("medical") == []
