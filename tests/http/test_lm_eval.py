"""`lm-eval` (EleutherAI's evaluation harness, a client nobody here wrote) against the served
OpenAI API: a small local multiple-choice task scored by log-likelihood (token-id prompts with
echo and logprobs, as its `local-completions` model sends them) and a generate_until task,
equal to what the same adapter scores when the prompts are sent one by one through the
official client."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.http.conftest import TOKEN

TASK = """task: loradock_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_TASK = """task: loradock_echo
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""
QUESTIONS = [("What is the capital of France?", ["Paris", "Lyon", "Nice"], 0),
             ("Which is a colour?", ["blue", "seven", "tree"], 0),
             ("What is two plus two?", ["five", "four", "six"], 1)]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import json

    root = tmp_path_factory.mktemp("lm-eval-tasks")
    (root / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                           for q, c, a in QUESTIONS))
    (root / "gen.jsonl").write_text("".join(json.dumps({"question": q, "target": "x"}) + "\n"
                                            for q, _, _ in QUESTIONS))
    (root / "mc.yaml").write_text(TASK.format(data=root / "mc.jsonl"))
    (root / "gen.yaml").write_text(GEN_TASK.format(data=root / "gen.jsonl"))
    return root


def test_lm_eval_scores_choices_and_generates_through_the_api(api, client, tasks, tiny_base, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", TOKEN)
    results = simple_evaluate(
        model="local-completions",
        model_args=f"model=a2,base_url={api.url}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={tiny_base.path},num_concurrent=1,max_retries=1,tokenized_requests=True",
        tasks=["loradock_capitals", "loradock_echo"], task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True, apply_chat_template=False, limit=None)
    samples = results["samples"]["loradock_capitals"]
    assert len(samples) == len(QUESTIONS)
    for sample, (question, choices, _) in zip(sorted(samples, key=lambda s: s["doc_id"]), QUESTIONS, strict=True):
        scored = [resp[0][0] for resp in sample["resps"]]  # lm-eval's log-likelihood of each choice
        for choice, loglikelihood in zip(choices, scored, strict=True):
            context = f"Question: {question}\nAnswer:"
            expected = _continuation_logprob(client, context, " " + choice)  # lm-eval's target_delimiter
            assert math.isclose(loglikelihood, expected, rel_tol=1e-4, abs_tol=1e-4), (choice, loglikelihood, expected)
    assert 0 <= results["results"]["loradock_capitals"]["acc,none"] <= 1
    generated = results["samples"]["loradock_echo"]
    assert len(generated) == len(QUESTIONS) and any(sample["resps"][0][0] for sample in generated)
    for sample in generated:  # the harness's generation equals the client's for the same request
        prompt = sample["arguments"][0][0]  # (context, generation kwargs)
        direct = client.completions.create(model="a2", prompt=prompt, max_tokens=6, temperature=0, stop=["\n"])
        assert sample["resps"][0][0] == direct.choices[0].text


def _continuation_logprob(client, context: str, continuation: str) -> float:
    """Sum of the log probabilities of `continuation`'s tokens after `context`, from echo."""
    whole = client.completions.create(model="a2", prompt=context + continuation, echo=True, logprobs=1,
                                      max_tokens=1, temperature=0).choices[0].logprobs
    alone = client.completions.create(model="a2", prompt=context, echo=True, logprobs=1, max_tokens=1,
                                      temperature=0).choices[0].logprobs
    n_context = len(alone.tokens) - 1  # the generated token is the last
    return sum(whole.token_logprobs[n_context:-1])
