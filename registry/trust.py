"""A serving trust policy: which signing keys are trusted for which adapter names.

The policy is a YAML mapping from adapter-name patterns (shell style: `medical/*`, `*`) to
lists of PEM public key files, relative to the policy file. Rules are tried in file order
and the first whose pattern matches the name decides; a name no rule matches is not
trusted. For example:

    medical/*: [keys/medical.pub]     # medical adapters only by the medical team's key
    "*": [keys/platform.pub]          # everything else by the platform key
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import SigningError, TrustPolicyError
from .signing import (
    UNTRUSTED,
    PublicKey,
    TrustStatus,
    check_signature,
    claimed_signer,
    load_public_key,
)
from .version import AdapterVersion


@dataclass(frozen=True)
class TrustRule:
    pattern: str
    keys: tuple[PublicKey, ...]


@dataclass(frozen=True)
class TrustPolicy:
    """Rules in order; `check(version)` says whether a version may be served."""

    path: Path
    rules: tuple[TrustRule, ...]

    @classmethod
    def load(cls, path: str | Path) -> TrustPolicy:
        """Read and check a policy file; every problem is named in one TrustPolicyError."""
        path = Path(path).expanduser()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise TrustPolicyError(f"cannot read trust policy {path}: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise TrustPolicyError(f"trust policy {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict) or not data:
            raise TrustPolicyError(
                f"trust policy {path} must map adapter-name patterns to lists of public key files, "
                "e.g.\n  medical/*: [keys/medical.pub]\n  \"*\": [keys/platform.pub]")
        problems, rules = [], []
        for pattern, files in data.items():
            if not isinstance(pattern, str) or not pattern:
                problems.append(f"pattern {pattern!r}: expected a non-empty string")
                continue
            if isinstance(files, str):
                files = [files]
            if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
                problems.append(f"{pattern}: expected a list of public key files, got {files!r}")
                continue
            keys = []
            for name in files:
                try:
                    keys.append(load_public_key(path.parent / Path(name).expanduser()))
                except SigningError as e:
                    problems.append(f"{pattern}: {e}")
            rules.append(TrustRule(pattern, tuple(keys)))
        if problems:
            raise TrustPolicyError(f"trust policy {path}:\n  - " + "\n  - ".join(problems))
        return cls(path, tuple(rules))

    def rule_for(self, name: str) -> TrustRule | None:
        """The first rule whose pattern matches adapter `name`."""
        return next((r for r in self.rules if fnmatch.fnmatchcase(name, r.pattern)), None)

    def check(self, version: AdapterVersion) -> TrustStatus:
        """Whether `version` is signed by a key trusted for its name, over its exact files."""
        rule = self.rule_for(version.name)
        if rule is None:
            patterns = ", ".join(repr(r.pattern) for r in self.rules)
            return TrustStatus(UNTRUSTED, claimed_signer(version.path),
                               f"no rule of the trust policy matches {version.name!r} ({patterns})")
        return check_signature(version.path, version.manifest["files"], rule.keys, rule.pattern)

    def describe(self) -> str:
        """One line per rule, for the server's start-up log."""
        return "; ".join(f"{r.pattern} -> {', '.join(k.path.name for k in r.keys)}" for r in self.rules)
