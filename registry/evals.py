"""Evaluation records: what a version scored on held-out data, kept beside it.

A version's files never change, so its evaluations live outside it: one JSON-lines file per
version, `<name>/evals/<N>.jsonl`, appended to under the adapter's lock. Like the alias history
it is rewritten whole and atomically, so a crash leaves the old records or the new ones, never a
torn line. A record names what was measured (metric, dataset file and its sha256, how many
examples, generation settings), the score, the base model's score on the same data when it was
compared, and when and by whom.

A requirement (`loradock adapters tag ... --require 'contains>=0.8'`) holds a version's newest
record of one metric to a threshold, a number or `base` (the base's score in that record).
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .alias_history import who
from .errors import RegistryError
from .fsutil import atomic_write_bytes

METRICS = ("exact", "contains", "regex", "rouge-l")
_OPERATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
_REQUIREMENT = re.compile(r"^\s*([a-z][a-z-]*)\s*(>=|<=|==|>|<)\s*(base|[0-9]*\.?[0-9]+)\s*$")


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation of one version."""

    metric: str  # one of METRICS
    score: float  # mean over the examples, in [0, 1]
    examples: int
    dataset: str  # the data file's name
    dataset_digest: str  # sha256 of its bytes
    base_score: float | None = None  # the base model alone on the same data (--base-compare)
    settings: dict = field(default_factory=dict)  # how answers were generated (max_new_tokens, quantize...)
    time: str = ""  # ISO 8601, UTC; set when recorded
    by: str = ""  # user@host; set when recorded

    def describe(self) -> str:
        """One line for people: `contains 0.95 (base 0.00) on facts.jsonl, 20 examples, 2026-12-07`."""
        base = "" if self.base_score is None else f" (base {self.base_score:.2f})"
        return (f"{self.metric} {self.score:.2f}{base} on {self.dataset} ({self.dataset_digest[:12]}), "
                f"{self.examples} examples, {self.time[:10]} by {self.by}")


def check_record(record: EvalRecord) -> None:
    """RegistryError naming what is wrong with a record about to be kept."""
    problems = []
    if record.metric not in METRICS:
        problems.append(f"metric {record.metric!r} is not one of {', '.join(METRICS)}")
    for name in ("score", "base_score"):
        value = getattr(record, name)
        if value is not None and (not isinstance(value, int | float) or not 0 <= value <= 1):
            problems.append(f"{name} {value!r} is not a number in [0, 1]")
    if not isinstance(record.examples, int) or record.examples < 1:
        problems.append(f"examples {record.examples!r} is not a positive count")
    if not re.fullmatch(r"[0-9a-f]{64}", record.dataset_digest or ""):
        problems.append("dataset_digest is not a sha256 hex digest")
    if problems:
        raise RegistryError("bad evaluation record: " + "; ".join(problems))


@dataclass(frozen=True)
class Requirement:
    """`METRIC OP THRESHOLD`, THRESHOLD a number or `base`."""

    metric: str
    op: str
    threshold: float | str

    @classmethod
    def parse(cls, text: str) -> Requirement:
        """Parse one requirement (RegistryError naming the expected form).

        >>> Requirement.parse("contains>=0.8")
        Requirement(metric='contains', op='>=', threshold=0.8)
        >>> str(Requirement.parse("rouge-l > base"))
        'rouge-l>base'
        """
        match = _REQUIREMENT.match(text)
        if match is None or match.group(1) not in METRICS:
            raise RegistryError(f"requirement {text!r}: expected METRIC OP VALUE, METRIC one of {', '.join(METRICS)}, "
                                f"OP one of {', '.join(_OPERATORS)}, VALUE a number or 'base' "
                                "(e.g. 'contains>=0.8', 'rouge-l>base')")
        metric, op, value = match.groups()
        return cls(metric, op, value if value == "base" else float(value))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold}"

    def unmet(self, records: list[EvalRecord], ref: str) -> str | None:
        """Why `ref` (whose records these are) does not meet this requirement, or None."""
        newest = next((r for r in reversed(records) if r.metric == self.metric), None)
        if newest is None:
            return (f"{ref} has no {self.metric} evaluation on record (run `loradock adapters eval {ref} "
                    f"--data FILE --metric {self.metric}`)")
        threshold = newest.base_score if self.threshold == "base" else self.threshold
        if threshold is None:
            return f"{ref}'s newest {self.metric} evaluation has no base score to compare (eval with --base-compare)"
        if not _OPERATORS[self.op](newest.score, threshold):
            return f"{ref} fails {self}: {newest.describe()}"
        return None


def newest_per_metric(records: list[EvalRecord]) -> list[EvalRecord]:
    """The newest of `records` (oldest first, as kept) for each metric, by metric name."""
    newest = {r.metric: r for r in records}  # later records replace earlier ones
    return [r for _, r in sorted(newest.items())]


class EvalRecords:
    """The evaluation records of one adapter name's versions (the caller holds the name's lock to write)."""

    def __init__(self, name_dir: Path) -> None:
        self.dir = name_dir / "evals"

    def _path(self, version: int) -> Path:
        return self.dir / f"{version}.jsonl"

    def read(self, version: int) -> list[EvalRecord]:
        """Oldest first."""
        path = self._path(version)
        if not path.is_file():
            return []
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                records.append(EvalRecord(**json.loads(line)))
            except (ValueError, TypeError) as e:
                raise RegistryError(f"{path}:{number}: not an evaluation record ({e}); the file was edited by hand") \
                    from None
        return records

    def append(self, version: int, record: EvalRecord) -> EvalRecord:
        """Keep `record` (stamped with the time and who) after the version's earlier ones."""
        check_record(record)
        stamped = EvalRecord(**{**asdict(record), "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                "by": who()})
        lines = [json.dumps(asdict(r)) for r in [*self.read(version), stamped]]
        atomic_write_bytes(self._path(version), ("\n".join(lines) + "\n").encode())
        return stamped

    def remove(self, version: int) -> None:
        """Forget a deleted version's records (its number is never reused)."""
        self._path(version).unlink(missing_ok=True)
