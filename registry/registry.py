"""The registry: one root directory holding `bases/` and `adapters/`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from .adapters import AdapterStore
from .bases import BaseStore
from .paths import default_root
from .version import AdapterVersion, VerifyResult


class Registry:
    """A loradock registry rooted at `root` (default: `$LORADOCK_HOME` or `~/.loradock`).

    Adapter references are `name` (latest), `name@3` (a version) or `name@alias`.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.bases = BaseStore(self.root)
        self.adapters = AdapterStore(self.root, self.bases)

    def publish(
        self,
        src_dir: str | Path,
        name: str,
        *,
        base: str | None = None,
        aliases: Iterable[str] = (),
        metadata: dict | None = None,
        reuse: Callable[[AdapterVersion], bool] | None = None,
    ) -> AdapterVersion:
        """Validate the PEFT LoRA adapter in `src_dir` and store it as the next version of `name`.

        `base` names a registry base (default: adapter_config's base_model_name_or_path).
        `metadata` may set source, training, dataset, metrics and parent. With `reuse`, an
        existing version of `name` it accepts (checked under the name's lock, so concurrent
        publishers agree) is returned instead of publishing a new one.
        """
        return self.adapters.publish(src_dir, name, base=base, aliases=aliases, metadata=metadata,
                                     reuse=reuse)

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

    def tag(self, ref: str, alias: str) -> AdapterVersion:
        """Point `alias` at the version `ref` means."""
        return self.adapters.tag(ref, alias)

    def untag(self, name: str, alias: str) -> None:
        """Remove an alias."""
        self.adapters.untag(name, alias)

    def delete(self, ref: str, force: bool = False) -> AdapterVersion:
        """Delete one version (refused while an alias points at it, unless `force`)."""
        return self.adapters.delete(ref, force=force)

    def verify(self, ref: str | None = None) -> list[VerifyResult]:
        """Fully rehash one version or all of them; every result with problems is a failure."""
        return self.adapters.verify(ref)

    def gc(self) -> list[Path]:
        """Remove leftovers of crashed publishes and orphaned locks; returns what was removed."""
        return self.adapters.gc()

    def generation(self) -> int:
        """A counter bumped by every publish/tag/untag/delete: poll it to notice changes cheaply."""
        return self.adapters.generation.read()

    def pull(
        self, repo_id: str, revision: str | None = None, name: str | None = None, base: str | None = None
    ) -> AdapterVersion:
        """Download a LoRA adapter from a Hugging Face Hub repo and publish it (see registry/hub.py)."""
        from .hub import pull

        return pull(self, repo_id, revision=revision, name=name, base=base)

    def push(self, ref: str, repo_id: str, private: bool = True) -> str:
        """Upload a version (with its model card) to a Hub repo; returns the commit sha."""
        from .hub import push

        return push(self, ref, repo_id, private=private)
