"""Value types the adapter registry hands out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable, published adapter version.

    `path` is a PEFT adapter directory (`PeftModel.from_pretrained(base, path)` loads it);
    `digest` is one sha256 over the manifest's file list; `manifest` is the parsed
    `manifest.json` (see registry/manifest.py for its keys).
    """

    name: str
    version: int
    digest: str
    path: Path
    manifest: dict = field(compare=False, hash=False, repr=False)

    @property
    def ref(self) -> str:
        """The exact reference `name@N`."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of fully re-checking one version (or one alias) against the disk."""

    ref: str
    problems: tuple[str, ...] = ()
    signer: str = ""  # key id the signature names ("" when unsigned)
    trust: str = ""  # trust state under the policy verify was given ("" without one)

    @property
    def ok(self) -> bool:
        return not self.problems
