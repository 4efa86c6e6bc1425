"""Where each alias pointed, and when, who and why it moved: one JSON-lines file per alias,
`<name>/alias-history/<alias>.jsonl`, appended to under the adapter's lock by every change
(tag, untag, rollback, a forced delete) before the alias itself moves.

The file is rewritten whole and atomically (aliases move rarely; their histories stay small),
so a crash leaves either the old history or the new one, never a torn line. A crash between the
history write and the alias write leaves a last entry that never took effect (its `after` is not
where the alias points); readers mark it `applied: False` and the next change drops it.

Rollback walks the history as a stack: each change pushes its target, each rollback pops one,
so rolling back twice goes back two targets, never forth again.
"""

from __future__ import annotations

import getpass
import json
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import RegistryError
from .fsutil import atomic_write_bytes

ACTIONS = ("tag", "untag", "rollback", "delete")
Recorded = int | dict[str, int] | None  # a target as recorded: version, {"version": percent}, none


@dataclass(frozen=True)
class AliasChange:
    """One move of an alias: from `before` to `after`, each a version, {"version": percent} for a
    canary (canary.py), or None (the alias did not exist / was removed)."""

    time: str  # ISO 8601, UTC
    action: str  # one of ACTIONS
    before: int | dict[str, int] | None
    after: int | dict[str, int] | None
    by: str  # user@host
    reason: str = ""
    applied: bool = True  # False only for a last entry a crash kept from taking effect


def who() -> str:
    """user@host of this process (for the record, not for authentication)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class AliasHistory:
    """The histories of one adapter name's aliases (the caller holds the name's lock to write)."""

    def __init__(self, name_dir: Path) -> None:
        self.dir = name_dir / "alias-history"

    def _path(self, alias: str) -> Path:
        return self.dir / f"{alias}.jsonl"

    def read(self, alias: str, current: Recorded) -> list[AliasChange]:
        """Oldest first; `current` is where the alias points now (None: nowhere)."""
        path = self._path(alias)
        if not path.is_file():
            return []
        changes = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                fields = json.loads(line)
                changes.append(AliasChange(**{k: fields[k] for k in ("time", "action", "before", "after", "by")},
                                           reason=fields.get("reason", "")))
            except (ValueError, KeyError, TypeError) as e:
                raise RegistryError(f"{path}:{number}: not an alias change ({e}); the file was edited by hand") \
                    from None
        if changes and changes[-1].after != current:
            changes[-1] = AliasChange(**{**asdict(changes[-1]), "applied": False})
        return changes

    def aliases(self) -> list[str]:
        """Aliases that have a history (removed ones included)."""
        return sorted(p.stem for p in self.dir.glob("*.jsonl")) if self.dir.is_dir() else []

    def record(self, alias: str, action: str, before: Recorded, after: Recorded, reason: str = "") -> None:
        """Append a change about to be made (a last entry that never took effect is dropped)."""
        if action not in ACTIONS:
            raise ValueError(f"action {action!r} is not one of {ACTIONS}")
        changes = [c for c in self.read(alias, before) if c.applied]
        changes.append(AliasChange(datetime.now(timezone.utc).isoformat(timespec="seconds"), action, before, after,
                                   who(), reason))
        lines = [json.dumps({k: v for k, v in asdict(c).items() if k != "applied"}) for c in changes]
        atomic_write_bytes(self._path(alias), ("\n".join(lines) + "\n").encode())

    def rollback_target(self, alias: str, current: Recorded) -> int | dict[str, int]:
        """The target before the current one, walking back over earlier rollbacks. RegistryError
        when the history holds no earlier target."""
        stack: list[Recorded] = []
        for change in self.read(alias, current):
            if not change.applied:
                continue
            if change.action == "rollback":
                if stack:
                    stack.pop()
            else:
                if not stack:
                    stack.append(change.before)  # where it pointed when the history began
                stack.append(change.after)
        if len(stack) < 2 or stack[-1] != current:
            raise RegistryError(f"alias {alias!r} has no earlier target on record to roll back to "
                                "(its history begins with its current target)")
        if stack[-2] is None:
            raise RegistryError(f"alias {alias!r} did not exist before its current target; remove it with "
                                "`loradock adapters untag` if that is what you mean")
        return stack[-2]
