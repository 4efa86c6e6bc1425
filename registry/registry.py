"""The registry: one root directory holding `bases/` and `adapters/`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .adapters import AdapterStore
from .alias_history import AliasChange
from .bases import BaseInfo, BaseStore, ResolvedBase
from .evals import EvalRecord
from .fsutil import probe_writable
from .paths import default_root
from .version import AdapterVersion, VerifyResult

if TYPE_CHECKING:
    from .trust import TrustPolicy


class Registry:
    """A loradock registry rooted at `root` (default: `$LORADOCK_HOME` or `~/.loradock`).

    Adapter references are `name` (latest), `name@3` (a version) or `name@alias`.
    """

    def __init__(self, root: str | Path | None = None, *, digest_dir: str | Path | None = None) -> None:
        """`digest_dir` keeps the digest records (a cache, see digests.py) somewhere other than
        inside the root: for serving from a registry this process cannot write."""
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.bases = BaseStore(self.root)
        self.adapters = AdapterStore(self.root, self.bases, digest_dir)

    def is_writable(self) -> bool:
        """Whether this process can create files in the registry (tried, not guessed from modes:
        root ignores modes, a read-only mount does not)."""
        return probe_writable(self.root / "adapters" if (self.root / "adapters").is_dir() else self.root)

    # ---- bases: Hugging Face model directories under bases/ (see bases.py) ----

    def base(self, spec: str) -> BaseInfo:
        """The stored base a name or a model directory (stored, by path or fingerprint) refers to;
        NotFoundError says which bases exist or the command that adds the directory."""
        return self.bases.registered(spec)

    def has_base(self, name: str) -> bool:
        return self.bases.exists(name)

    def list_bases(self) -> list[BaseInfo]:
        return self.bases.list()

    def add_base(self, model_dir: str | Path, name: str, *, source: str, source_digest: str,
                 move: bool = False) -> tuple[BaseInfo, bool]:
        """Store a ready model directory as base `name`; returns (info, created)."""
        return self.bases.add(Path(model_dir), name, source=source, source_digest=source_digest, move=move)

    def resolve_base(self, spec: str) -> ResolvedBase:
        """A model directory path, else a registry base name: the one rule trainer and runtime use."""
        return self.bases.resolve(spec)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private work dir inside the root (on the registry's disk), removed afterwards."""
        with self.adapters.staging() as work:
            yield work

    # ---- adapters: immutable versions and aliases under adapters/ (see adapters.py) ----

    def publish(
        self,
        src_dir: str | Path,
        name: str,
        *,
        base: str | None = None,
        aliases: Iterable[str] = (),
        metadata: dict | None = None,
        reuse: Callable[[AdapterVersion], bool] | None = None,
        sign_key: str | Path | None = None,
    ) -> AdapterVersion:
        """Validate the PEFT LoRA adapter in `src_dir` and store it as the next version of `name`.

        `base` names a registry base (default: adapter_config's base_model_name_or_path).
        `metadata` may set source, training, dataset, metrics and parent. With `reuse`, an
        existing version of `name` it accepts (checked under the name's lock, so concurrent
        publishers agree) is returned instead of publishing a new one. With `sign_key` (an EC
        private key PEM file) the new version is signed (see signing.py).
        """
        return self.adapters.publish(src_dir, name, base=base, aliases=aliases, metadata=metadata,
                                     reuse=reuse, sign_key=sign_key)

    def sign(self, ref: str, key: str | Path, *, replace: bool = False) -> tuple[AdapterVersion, str]:
        """Sign an existing version (its digest does not change); returns (version, signer key id).
        This is the one way to sign what another command produced (merge, export)."""
        return self.adapters.sign(ref, key, replace=replace)

    def resolve(self, ref: str, *, verify: bool = True) -> AdapterVersion:
        """The version `ref` means; its files are checked against the manifest unless verify=False."""
        return self.adapters.resolve(ref, verify=verify)

    def list(self) -> list[AdapterVersion]:
        """The latest version of every adapter, sorted by name."""
        return self.adapters.list()

    def versions(self, name: str) -> list[AdapterVersion]:
        """All versions of `name`, oldest first."""
        return self.adapters.versions(name)

    def aliases(self, name: str) -> dict[str, int]:
        """{alias: version number} of adapter `name`."""
        return self.adapters.aliases(name)

    def tag(self, ref: str, alias: str, reason: str = "", weight: int = 100,
            require: Iterable[str] = ()) -> AdapterVersion:
        """Point `alias` at the version `ref` means, or only `weight` percent of its traffic (a
        canary; the rest stays on its stable version). Recorded in the alias's history. Refused,
        with nothing moved, unless the version's evaluations meet every one of `require`
        ("METRIC OP VALUE", e.g. "contains>=0.8" or "rouge-l>base")."""
        return self.adapters.tag(ref, alias, reason, weight, require)

    def record_eval(self, ref: str, record: EvalRecord) -> EvalRecord:
        """Keep an evaluation of the version `ref` means, beside it (append-only; the version's
        files never change). Returns the record as kept (with its time and author)."""
        return self.adapters.record_eval(ref, record)

    def evals(self, ref: str | AdapterVersion) -> list[EvalRecord]:
        """The evaluations of the version `ref` means (or of a version in hand, not resolved
        again), oldest first."""
        version = ref if isinstance(ref, AdapterVersion) else self.resolve(ref, verify=False)
        return self.adapters.evals(version.name).read(version.version)

    def alias_targets(self, name: str) -> dict[str, dict[int, int]]:
        """{alias: {version: percent of its traffic}} of adapter `name`."""
        return self.adapters.alias_targets(name)

    def route(self, ref: str, key: str | None = None) -> str:
        """`ref` with a weighted alias replaced by the version one request goes to (a stable
        hash of `key`, so one key stays on one version; at random without one)."""
        return self.adapters.route(ref, key)

    def untag(self, name: str, alias: str, reason: str = "") -> None:
        """Remove an alias (recorded in its history)."""
        self.adapters.untag(name, alias, reason)

    def rollback(self, name: str, alias: str, reason: str = "") -> AdapterVersion:
        """Move `name@alias` back to its previous target, atomically; the version it now means."""
        return self.adapters.rollback(name, alias, reason)

    def alias_history(self, name: str, alias: str | None = None) -> dict[str, list[AliasChange]]:
        """{alias: its changes, oldest first} for one alias of `name`, or all that have a history."""
        current = self.aliases(name)
        history = self.adapters.history(name)
        return {a: history.read(a, current.get(a)) for a in ([alias] if alias else history.aliases())}

    def delete(self, ref: str, force: bool = False) -> AdapterVersion:
        """Delete one version (refused while an alias points at it, unless `force`)."""
        return self.adapters.delete(ref, force=force)

    def verify(self, ref: str | None = None, policy: TrustPolicy | None = None) -> list[VerifyResult]:
        """Fully rehash one version or all of them and check signatures (trust too, given a
        policy); every result with problems is a failure."""
        return self.adapters.verify(ref, policy)

    def gc(self) -> list[Path]:
        """Remove leftovers of crashed publishes and orphaned locks; returns what was removed."""
        return self.adapters.gc()

    def generation(self) -> int:
        """A counter bumped by every publish/tag/untag/delete: poll it to notice changes cheaply."""
        return self.adapters.generation.read()

    def pull(
        self, repo_id: str, revision: str | None = None, name: str | None = None, base: str | None = None,
        sign_key: str | Path | None = None,
    ) -> AdapterVersion:
        """Download a LoRA adapter from a Hugging Face Hub repo and publish it (see registry/hub.py);
        a signature the repo holds is kept, or `sign_key` signs the new version."""
        from .hub import pull

        return pull(self, repo_id, revision=revision, name=name, base=base, sign_key=sign_key)

    def push(self, ref: str, repo_id: str, private: bool = True) -> str:
        """Upload a version (with its model card) to a Hub repo; returns the commit sha."""
        from .hub import push

        return push(self, ref, repo_id, private=private)
