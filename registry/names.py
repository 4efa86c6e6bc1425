"""Names and references.

A name is one segment, or `org/segment` (one optional namespace, as on the Hub).
A segment starts with a letter or digit and holds letters, digits, `.`, `_`, `-`;
`..` never appears, so a name can never step out of the registry directory.

A reference selects a version of an adapter:
    medical        the latest version
    medical@3      version 3
    medical@prod   whatever the alias `prod` points to
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidNameError

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def validate_name(name: str, *, allow_namespace: bool = True) -> str:
    """Return `name` unchanged if it is a valid registry name, else raise InvalidNameError."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError("a name must be a non-empty string")
    parts = name.split("/")
    if len(parts) > (2 if allow_namespace else 1):
        what = "one optional 'org/' namespace" if allow_namespace else "no '/'"
        raise InvalidNameError(f"invalid name {name!r}: only {what} is allowed")
    for part in parts:
        if not _SEGMENT.fullmatch(part) or ".." in part:
            raise InvalidNameError(
                f"invalid name {name!r}: each part must start with a letter or digit and "
                "use only letters, digits, '.', '_' and '-' (no '..', at most 96 characters)"
            )
    return name


def validate_alias(alias: str) -> str:
    """Return `alias` if valid (a letter, then letters, digits, `_`, `-`), else raise."""
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        raise InvalidNameError(
            f"invalid alias {alias!r}: it must start with a letter and use only letters, "
            "digits, '_' and '-' (it cannot be a number: numbers select versions)"
        )
    if alias == "latest":
        raise InvalidNameError("'latest' is reserved: a bare name already means the latest version")
    return alias


@dataclass(frozen=True)
class Ref:
    """A parsed reference. Exactly one of `version` / `alias` is set, or neither (= latest)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_ref(ref: str) -> Ref:
    """Parse `name`, `name@N`, `name@alias` or `name@latest`."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidNameError("an adapter reference must be a non-empty string like 'medical@prod'")
    name, sep, selector = ref.strip().partition("@")
    validate_name(name)
    if not sep or selector == "latest":
        return Ref(name)
    if selector.isdigit():
        version = int(selector)
        if version < 1:
            raise InvalidNameError(f"invalid reference {ref!r}: versions start at 1")
        return Ref(name, version=version)
    return Ref(name, alias=validate_alias(selector))
