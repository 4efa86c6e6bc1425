"""Warm promotion: an alias moves to a new version in this process only once that version is loaded.

`AliasRoutes.route` turns `name@alias` into the concrete `name@N` one request is served by (a
weighted alias: by the request's route key, registry/canary.py). It reads each alias's target
from the registry once per registry generation, and when an alias in use moves (a promotion,
a canary starting, a rollback), the versions it now names that this process has not loaded are
loaded first (`warm`) while its requests keep going to the previous target; once they are ready
(`state`), the next request takes the new target. So the first request after a promotion pays no
cold load. A version that fails to load is never switched to: the alias keeps its previous target
(logged) until the registry changes again. A load that takes longer than `wait_s` is switched to
anyway (then requests wait for it, as for any cold adapter). A rollback is an emergency: it takes
effect from the next request on, loaded or not. An alias no request has named yet is read as it
is (there is nothing warm to keep).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from loradock.registry import Registry
from loradock.registry.canary import Target, choose
from loradock.registry.names import parse_ref

from .adapter_cache import LoadState

log = logging.getLogger(__name__)


@dataclass
class _Move:
    target: Target  # where the registry says the alias points now
    loading: tuple[int, ...]  # its versions the previous target did not have: loaded first
    deadline: float  # monotonic: switch anyway after this


class AliasRoutes:
    """The targets this process serves each alias by (thread-safe)."""

    def __init__(self, registry: Registry, warm: Callable[[str], None], state: Callable[[str], LoadState],
                 wait_s: float) -> None:
        self.registry = registry
        self.warm = warm  # start loading version "name@N"
        self.state = state  # where its load stands
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._served: dict[str, Target] = {}  # "name@alias" -> the target its requests go to
        self._moving: dict[str, _Move] = {}  # "name@alias" -> the target it waits to take

    def route(self, ref: str, key: str | None = None) -> str:
        """`ref` with an alias replaced by the version this request is served by; any other
        reference (and an alias that does not exist: resolving it says why) unchanged."""
        r = parse_ref(ref)
        if r.alias is None:
            return ref
        alias_ref = f"{r.name}@{r.alias}"
        target = self._target(r.name, r.alias, alias_ref)
        return ref if target is None else f"{r.name}@{choose(target, alias_ref, key)}"

    def moving(self) -> dict[str, Target]:
        """Aliases whose new target is still loading here: {"name@alias": that target}."""
        with self._lock:
            return {a: m.target for a, m in self._moving.items()}

    def _target(self, name: str, alias: str, alias_ref: str) -> Target | None:
        to_warm: list[str] = []
        with self._lock:
            generation = self.registry.generation()
            if generation != self._generation:
                self._generation = generation
                to_warm = self._reread()
        for ref in to_warm:  # outside the lock: resolving a version reads (and hashes) its files
            self.warm(ref)
        with self._lock:
            served = self._served.get(alias_ref)
            if served is None:  # first use: as the registry has it
                served = self.registry.alias_targets(name).get(alias)
                if served is None:
                    return None
                self._served[alias_ref] = served
            move = self._moving.get(alias_ref)
            if move is not None:
                served = self._advance(alias_ref, move) or served
            return served

    def _reread(self) -> list[str]:
        """The registry changed: start the moves of the aliases in use whose target did, and
        return the versions to load for them."""
        to_warm = []
        for alias_ref, served in list(self._served.items()):
            name, _, alias = alias_ref.partition("@")
            try:
                target = self.registry.alias_targets(name).get(alias)
            except Exception:  # the adapter was deleted: resolving its requests says so
                target = None
            if target is None:
                self._served.pop(alias_ref)
                self._moving.pop(alias_ref, None)
            elif target == served:
                self._moving.pop(alias_ref, None)  # moved back before the move finished
            elif self._rolled_back(name, alias):  # an emergency: from the next request on, cold or not
                log.info("%s rolled back to %s", alias_ref, ", ".join(f"{name}@{v}" for v in target))
                self._served[alias_ref] = target
                self._moving.pop(alias_ref, None)
            elif alias_ref not in self._moving or self._moving[alias_ref].target != target:
                new = sorted(v for v in target if v not in served)
                log.info("%s moves to %s: loading %s before it takes traffic", alias_ref,
                         ", ".join(f"{name}@{v} {w}%" for v, w in sorted(target.items())),
                         ", ".join(f"{name}@{v}" for v in new) or "nothing")
                to_warm += [f"{name}@{v}" for v in new]
                self._moving[alias_ref] = _Move(target, tuple(new), time.monotonic() + self.wait_s)
        return to_warm

    def _rolled_back(self, name: str, alias: str) -> bool:
        """The alias's last recorded change is a rollback (`loradock adapters rollback`)."""
        try:
            changes = self.registry.alias_history(name, alias).get(alias, [])
        except Exception:  # an unreadable history: a plain move
            return False
        return bool(changes) and changes[-1].applied and changes[-1].action == "rollback"

    def _advance(self, alias_ref: str, move: _Move) -> Target | None:
        """The move's target once every version it adds is loaded (or its wait is over), else
        None; a version that failed to load ends the move, keeping the previous target."""
        name = alias_ref.partition("@")[0]
        states = {v: self.state(f"{name}@{v}") for v in move.loading}
        failed = [v for v, s in states.items() if s is LoadState.FAILED]
        if failed:
            del self._moving[alias_ref]
            log.error("%s stays on %s: %s failed to load (see above); fix it or move the alias again",
                      alias_ref, ", ".join(f"{name}@{v}" for v in self._served[alias_ref]),
                      ", ".join(f"{name}@{v}" for v in failed))
            return None
        ready = all(s is LoadState.READY for s in states.values())
        if not ready and time.monotonic() < move.deadline:
            return None
        if not ready:
            log.warning("%s takes its new target before it finished loading (waited %.0f s)", alias_ref, self.wait_s)
        del self._moving[alias_ref]
        self._served[alias_ref] = move.target
        return move.target
