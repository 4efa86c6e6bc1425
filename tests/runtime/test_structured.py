"""Structured outputs: in a mixed batch, a constrained request's answer always matches its JSON
schema, regex, choice or grammar, every token of it is the best token PEFT's logits allow there
(greedy), and the unconstrained requests beside it are unchanged."""

from __future__ import annotations

import json
import re

import pytest
from loradock.runtime import FinishReason, GenerationRequest, SamplingParams, StructuredOutput
from loradock.runtime.errors import InvalidRequestError
from loradock.runtime.structured import mask_rows

from tests.runtime.conftest import drive, load_peft_oracle, oracle_greedy, oracle_logits
from tests.runtime.test_oracle import PROMPTS

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]},
                                            "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "size", "n"], "additionalProperties": False}
CONSTRAINTS = {
    "json_schema": StructuredOutput("json_schema", json.dumps(SCHEMA)),
    "regex": StructuredOutput("regex", r"(yes|no), [a-c]{2}[0-9]"),
    "choice": StructuredOutput("choice", ("Paris", "Lyon", "Marseille")),
    "grammar": StructuredOutput("grammar", 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9]'),
}


def matches(kind: str, text: str) -> bool:
    if kind == "json_schema":
        answer = json.loads(text)
        return (set(answer) == {"ok", "size", "n"} and isinstance(answer["ok"], bool)
                and answer["size"] in "SML" and 0 <= answer["n"] <= 99)
    if kind == "regex":
        return re.fullmatch(r"(yes|no), [a-c]{2}[0-9]", text) is not None
    if kind == "choice":
        return text in ("Paris", "Lyon", "Marseille")
    return re.fullmatch(r"\([0-9](,[0-9])*\)", text) is not None


def test_constrained_answers_match_and_follow_peft_while_the_rest_are_unchanged(
        tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    cases = [("law", "json_schema"), ("med", "regex"), (None, "choice"), ("law", "grammar"), ("law", None),
             ("med", None)]
    handles = [engine.submit(GenerationRequest(adapter=a, prompt=PROMPTS[i], sampling=SamplingParams(
        max_new_tokens=48, structured=CONSTRAINTS.get(kind), ignore_eos=kind is None)))
        for i, (a, kind) in enumerate(cases)]
    drive(engine, handles)
    oracle = load_peft_oracle(tiny_base.path, {a: tiny_adapter_dirs[a] for a in ("law", "med")}, "none")
    for i, ((adapter, kind), h) in enumerate(zip(cases, handles, strict=True)):
        result, ids = h.result(), engine.tokenizer.encode(PROMPTS[i])
        if kind is None:
            assert list(result.token_ids) == oracle_greedy(oracle, adapter, ids, 48)
            continue
        assert result.finish_reason is FinishReason.EOS, (kind, result.text)
        assert matches(kind, result.text), (kind, result.text)
        # each token is the argmax of PEFT's logits among the tokens the grammar allows there
        tokens = list(result.token_ids)
        logits = oracle_logits(oracle, adapter, ids + tokens)[len(ids) - 1:]
        matcher = engine.grammars.matcher(CONSTRAINTS[kind])
        for step, token in enumerate(tokens):
            row = logits[step].clone()[None]
            mask_rows(row, [0], [matcher])
            assert int(row.argmax()) == token, (kind, step)
            assert matcher.accept_token(token)


@pytest.mark.parametrize(("constraint", "why"), [
    (StructuredOutput("json_schema", "{not json"), "invalid json_schema"),
    (StructuredOutput("regex", "(unclosed"), "invalid regex"),
    (StructuredOutput("grammar", "root ::= missing_rule"), "invalid grammar"),
    (StructuredOutput("choice", ()), "kind must be one of"),
    (StructuredOutput("yaml", "x"), "kind must be one of"),
])
def test_a_bad_constraint_is_refused_at_submit_naming_it(tiny_registry, tiny_base, engine_factory, constraint, why):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    with pytest.raises(InvalidRequestError, match=f"sampling.structured: {why}"):
        engine.submit(GenerationRequest(prompt="hi", sampling=SamplingParams(structured=constraint)))
