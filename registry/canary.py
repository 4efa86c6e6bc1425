"""Weighted aliases (canaries): an alias may send a share of its traffic to a second version.

The alias file holds `N` (all traffic to version N) or `weighted N:W M:V` (percentages summing
to 100). A reader that predates weights sees no version number there and ignores the alias with
a warning: it refuses it, it never misreads it. The stable version is the one with the largest
weight (the older on a tie); displays and unrouted lookups show it.

Each request is routed once, at admission: with a route key (a user id, a session) by a stable
hash of the alias and the key, so one user stays on one version; without one, at random.

    >>> parse_target("3")
    {3: 100}
    >>> parse_target("weighted 3:90 4:10")
    {3: 90, 4: 10}
    >>> format_target({3: 90, 4: 10})
    'weighted 3:90 4:10'
    >>> stable({3: 50, 4: 50})
    3
    >>> choose({3: 90, 4: 10}, "m@prod", "user-1") == choose({3: 90, 4: 10}, "m@prod", "user-1")
    True
"""

from __future__ import annotations

import hashlib
import random

from .errors import RegistryError

Target = dict[int, int]  # version -> percent of the traffic


def parse_target(text: str) -> Target | None:
    """An alias file's content as {version: percent}; None when it is not one."""
    text = text.strip()
    if text.isdigit():
        return {int(text): 100}
    kind, _, rest = text.partition(" ")
    if kind != "weighted":
        return None
    try:
        target = {int(v): int(w) for v, w in (item.split(":") for item in rest.split())}
    except ValueError:
        return None
    ok = len(target) >= 2 and sum(target.values()) == 100 and all(0 < w < 100 for w in target.values())
    return target if ok else None


def format_target(target: Target) -> str:
    if len(target) == 1:
        return str(next(iter(target)))
    return "weighted " + " ".join(f"{v}:{w}" for v, w in sorted(target.items()))


def to_record(target: Target) -> int | dict[str, int]:
    """A target as alias histories write it (JSON): a version, or {"version": percent}."""
    return next(iter(target)) if len(target) == 1 else {str(v): w for v, w in sorted(target.items())}


def from_record(value: int | dict[str, int]) -> Target:
    return {value: 100} if isinstance(value, int) else {int(v): w for v, w in value.items()}


def stable(target: Target) -> int:
    """The version most of the traffic goes to (the older one on a tie)."""
    return max(target, key=lambda v: (target[v], -v))


def with_canary(current: Target | None, version: int, percent: int) -> Target:
    """`current` with `percent` of the traffic moved to `version`, the rest kept on the stable
    version (a previous canary is replaced)."""
    if not 0 < percent <= 100:
        raise RegistryError(f"weight {percent} must be a percentage in 1..100")
    if percent == 100:
        return {version: 100}
    if current is None:
        raise RegistryError("a canary needs the alias to point at a version already (tag it first)")
    keep = stable(current)
    if keep == version:
        raise RegistryError(f"version {version} is already the alias's stable target")
    return {keep: 100 - percent, version: percent}


def choose(target: Target, alias_ref: str, key: str | None) -> int:
    """The version one request goes to: by a stable hash of `alias_ref` and `key`, or at random."""
    if len(target) == 1:
        return next(iter(target))
    if key:
        digest = hashlib.sha256(f"{alias_ref}\0{key}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64 * 100
    else:
        point = random.random() * 100
    for version, weight in sorted(target.items()):
        point -= weight
        if point < 0:
            return version
    return max(target)  # float rounding at the very top
