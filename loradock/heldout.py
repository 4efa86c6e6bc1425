"""Held-out questions and how an answer is scored against them.

A held-out file is JSON Lines, one `{"question": ..., "expected": ...}` per line
(other keys are kept as metadata). An answer is correct when it contains the
expected fact, compared case-insensitively with thousands separators and
repeated spaces ignored ("$1,385" matches "$1385").
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


def accuracy(matches: Sequence[bool]) -> float:
    """Fraction of True values (0.0 for an empty sequence)."""
    return sum(matches) / len(matches) if matches else 0.0
