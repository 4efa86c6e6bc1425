"""Trainer errors. Each names what is wrong (key, file, line, field) in words a person can act on."""

from __future__ import annotations


class TrainerError(Exception):
    """Base class of every error the trainer raises for bad input."""


class ConfigError(TrainerError, ValueError):
    """The training config has an unknown key, a wrong type or a value out of range."""


class DatasetError(TrainerError, ValueError):
    """A dataset file is missing, unreadable, or holds records that cannot be trained on."""


class CheckpointError(TrainerError):
    """A checkpoint to resume from is missing or does not fit this run."""


def problems_message(headline: str, problems: list[str], limit: int = 50) -> str:
    """One message listing every problem (the first `limit` of them), one per line."""
    lines = [f"{headline} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
    lines += [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
