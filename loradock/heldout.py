"""Held-out questions and how an answer is scored against them.

A held-out file is JSON Lines, one `{"question": ..., "expected": ...}` per line
(other keys are kept as metadata). The demo's rule (`contains`): an answer is correct
when it contains the expected fact, compared case-insensitively with thousands
separators and repeated spaces ignored ("$1,385" matches "$1385"). `score_answer`
has the other metrics of `loradock adapters eval`: `exact` (the same comparison, whole
answer), `regex` (`expected` is a Python regular expression searched in the answer) and
`rouge-l` (the F1 of the longest common word subsequence, in [0, 1]).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loradock.errors import UserError


@dataclass(frozen=True)
class HeldOutQuestion:
    question: str
    expected: str
    meta: dict = field(default_factory=dict, compare=False)


def load_heldout(path: Path) -> list[HeldOutQuestion]:
    """Read a held-out file; every bad line is reported (file and line) in one error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: held-out question file not found")
    questions, problems = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{lineno}: not valid JSON ({e.msg})")
            continue
        missing = [k for k in ("question", "expected") if not isinstance(row, dict) or not row.get(k)]
        if missing:
            problems.append(f"{path}:{lineno}: missing or empty {', '.join(missing)}")
            continue
        meta = {k: v for k, v in row.items() if k not in ("question", "expected")}
        questions.append(HeldOutQuestion(row["question"], row["expected"], meta))
    if problems:
        raise UserError("bad held-out questions:\n  " + "\n  ".join(problems))
    if not questions:
        raise UserError(f"{path}: no held-out questions")
    return questions


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace(",", "")).strip().lower()


def answer_matches(answer: str, expected: str) -> bool:
    """Whether `answer` states the `expected` fact."""
    return _normalize(expected) in _normalize(answer)


def rouge_l(answer: str, expected: str) -> float:
    """ROUGE-L F1 over lowercased words: the longest common subsequence against both lengths.

    >>> rouge_l("the cat sat on the mat", "the cat is on the mat"), rouge_l("a b", "c")
    (0.8333333333333334, 0.0)
    """
    a, e = answer.lower().split(), expected.lower().split()
    if not a or not e:
        return 0.0
    previous = [0] * (len(e) + 1)
    for word in a:
        row = [0]
        for j, other in enumerate(e):
            row.append(previous[j] + 1 if word == other else max(previous[j + 1], row[j]))
        previous = row
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(e)
    return 2 * precision * recall / (precision + recall)


def score_answer(metric: str, answer: str, expected: str) -> float:
    """One answer's score in [0, 1] under `metric` (see the module docstring).

    >>> [score_answer(m, "It costs $1,385.", "$1385") for m in ("exact", "contains")]
    [0.0, 1.0]
    >>> score_answer("regex", "Code QF-7721", r"QF-\\d{4}"), score_answer("exact", " Kelvaris ", "kelvaris")
    (1.0, 1.0)
    """
    if metric == "exact":
        return float(_normalize(answer) == _normalize(expected))
    if metric == "contains":
        return float(answer_matches(answer, expected))
    if metric == "regex":
        return float(re.search(expected, answer) is not None)
    if metric == "rouge-l":
        return rouge_l(answer, expected)
    raise UserError(f"unknown metric {metric!r}: expected exact, contains, regex or rouge-l")


def check_patterns(questions: Sequence[HeldOutQuestion]) -> None:
    """For the regex metric: every expected answer compiles (UserError naming each one that does not)."""
    problems = []
    for i, q in enumerate(questions, 1):
        try:
            re.compile(q.expected)
        except re.error as e:
            problems.append(f"question {i}: {q.expected!r} is not a regular expression ({e})")
    if problems:
        raise UserError("bad patterns for --metric regex:\n  " + "\n  ".join(problems))


def accuracy(matches: Sequence[bool]) -> float:
    """Fraction of True values (0.0 for an empty sequence)."""
    return sum(matches) / len(matches) if matches else 0.0
