"""Adapter versions on disk: publish, resolve, list, alias, delete, verify, gc.

Layout under `<root>/adapters/` (a name may be `org/name`):

    <name>/versions/<N>/        adapter_config.json, adapter_model.safetensors,
                                README.md (model card), manifest.json; files read-only;
                                model.sig when signed (signing.py; not in the digest)
    <name>/aliases/<alias>      text file holding a version number
    <name>/alias-history/<alias>.jsonl   every move of that alias (alias_history.py)
    <name>/last_version         highest number ever allocated (numbers are never reused)
    .staging/<id>/, <id>.lock   work dirs of running publishes (invisible; gc removes stale ones)
    .locks/<name>.lock          one lock per name, held while a version or alias changes
    .generation                 change counter (see generation.py)
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from . import canary, lock
from .alias_history import AliasHistory
from .base_link import check_fits, link_base
from .bases import BaseStore
from .digests import DigestCache, file_problems
from .errors import (
    DigestMismatchError,
    DiskFullError,
    InvalidAdapterError,
    InvalidNameError,
    NotFoundError,
    RegistryError,
    SigningError,
)
from .evals import EvalRecord, EvalRecords, Requirement
from .fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    fsync_tree,
    is_no_space,
    no_space_errors,
)
from .generation import Generation
from .manifest import (
    MANIFEST_FILE,
    ManifestError,
    build_manifest,
    check_metadata,
    file_entries,
    files_digest,
    read_manifest,
)
from .modelcard import CARD_FILE, render_model_card
from .names import parse_ref, validate_alias, validate_name
from .signing import (
    SIGNATURE_FILE,
    claimed_signer,
    install_signature,
    private_key_id,
    short_id,
    sign_dir,
    signature_problems,
)
from .validate import ADAPTER_FILES, AdapterSpec, check_files, validate_adapter_dir
from .version import AdapterVersion, VerifyResult

if TYPE_CHECKING:
    from .trust import TrustPolicy

log = logging.getLogger(__name__)

READ_ONLY = 0o444
STALE_TEMP_S = 60  # an atomic-write temp file older than this belongs to a dead writer


class AdapterStore:
    """The `adapters/` half of a registry root."""

    def __init__(self, root: Path, bases: BaseStore, digest_dir: Path | None = None) -> None:
        self.dir = Path(root) / "adapters"
        self.bases = bases
        self.generation = Generation(self.dir / ".generation")
        self._staging_dir = self.dir / ".staging"
        self.digest_dir = Path(digest_dir) if digest_dir is not None else self.dir / ".digests"
        self._digests = DigestCache(self.digest_dir)

    # ----- paths

    def _name_dir(self, name: str) -> Path:
        return self.dir / validate_name(name)

    def _lock_path(self, name: str) -> Path:
        return self.dir / ".locks" / (name.replace("/", "~") + ".lock")  # '~' never occurs in names

    def _version_numbers(self, name: str) -> list[int]:
        vdir = self._name_dir(name) / "versions"
        if not vdir.is_dir():
            return []
        return sorted(int(p.name) for p in vdir.iterdir() if p.name.isdigit() and p.is_dir())

    # ----- reading

    def names(self) -> list[str]:
        """Names that have at least one version, sorted."""
        if not self.dir.is_dir():
            return []
        found = []
        for top in sorted(p for p in self.dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            candidates = [top] if (top / "versions").is_dir() else sorted(top.iterdir())
            for d in candidates:
                name = d.relative_to(self.dir).as_posix()
                if (d / "versions").is_dir() and _is_valid_name(name) and self._version_numbers(name):
                    found.append(name)
        return found

    def aliases(self, name: str) -> dict[str, int]:
        """{alias: version} for `name` (a weighted alias: its stable version)."""
        return {alias: canary.stable(target) for alias, target in self.alias_targets(name).items()}

    def alias_targets(self, name: str) -> dict[str, canary.Target]:
        """{alias: {version: percent of its traffic}} for `name` (canary.py)."""
        adir = self._name_dir(name) / "aliases"
        if not adir.is_dir():
            return {}
        out = {}
        for p in sorted(adir.iterdir()):
            if p.name.startswith("."):
                continue  # a temp file of an alias being moved
            target = canary.parse_target(p.read_text())
            if target is None:
                log.warning("ignoring alias %s@%s: %s holds neither a version number nor weights", name, p.name, p)
            else:
                out[p.name] = target
        return out

    def route(self, ref: str, key: str | None) -> str:
        """`ref` with a weighted alias replaced by the version this request goes to (by a stable
        hash of `key`, or at random without one); any other reference unchanged."""
        r = parse_ref(ref)
        if r.alias is None:
            return ref
        target = self.alias_targets(r.name).get(r.alias)
        if target is None or len(target) == 1:
            return ref
        return f"{r.name}@{canary.choose(target, f'{r.name}@{r.alias}', key)}"

    def _not_found_name(self, name: str) -> NotFoundError:
        known = ", ".join(self.names()) or "none yet (publish one with `loradock adapters publish`)"
        return NotFoundError(f"unknown adapter {name!r}; known adapters: {known}")

    def _pick_version(self, ref: str) -> tuple[str, int]:
        """(name, version number) that `ref` selects; NotFoundError lists what exists."""
        r = parse_ref(ref)
        numbers = self._version_numbers(r.name)
        if not numbers:
            raise self._not_found_name(r.name)
        if r.alias is None:
            number = r.version if r.version is not None else numbers[-1]
            if number not in numbers:
                raise NotFoundError(
                    f"adapter {r.name!r} has no version {number}; {self._choices(r.name, numbers)}"
                )
            return r.name, number
        number = self.aliases(r.name).get(r.alias)
        if number is None:
            raise NotFoundError(f"adapter {r.name!r} has no alias {r.alias!r}; {self._choices(r.name, numbers)}")
        if number not in numbers:
            raise NotFoundError(f"alias {r.name}@{r.alias} points to version {number}, which no longer exists")
        return r.name, number

    def _choices(self, name: str, numbers: list[int]) -> str:
        alias_text = ", ".join(f"{a} -> {v}" for a, v in self.aliases(name).items()) or "none"
        return f"versions: {', '.join(map(str, numbers))}; aliases: {alias_text}"

    def _load(self, name: str, number: int, verify: bool) -> AdapterVersion:
        path = self._name_dir(name) / "versions" / str(number)
        ref = f"{name}@{number}"
        if not path.is_dir():  # deleted since it was picked
            raise NotFoundError(f"{ref} was just deleted")
        try:
            manifest = read_manifest(path)
        except ManifestError as e:
            raise DigestMismatchError(f"{ref}: {e}") from e
        if verify:
            problems = file_problems(path, manifest["files"], self._digests)
            if problems:
                raise DigestMismatchError(
                    f"{ref} no longer matches its manifest (files changed after publishing): "
                    + "; ".join(problems)
                )
        return AdapterVersion(name, number, files_digest(manifest["files"]), path, manifest)

    def resolve(self, ref: str, *, verify: bool = True) -> AdapterVersion:
        """The version `ref` (`name`, `name@3`, `name@alias`) means, its files checked unless `verify=False`."""
        name, number = self._pick_version(ref)
        return self._load(name, number, verify)

    def versions(self, name: str) -> list[AdapterVersion]:
        """Every version of `name`, oldest first (not digest-checked; use verify())."""
        numbers = self._version_numbers(name)
        if not numbers:
            raise self._not_found_name(name)
        return [self._load(name, n, verify=False) for n in numbers]

    def list(self) -> list[AdapterVersion]:
        """The latest version of every adapter, by name (not digest-checked).

        A name whose latest version is damaged is left out (and logged) rather than
        failing the whole listing; `verify()` reports it.
        """
        latest = []
        for name in self.names():
            try:
                latest.append(self._load(name, self._version_numbers(name)[-1], verify=False))
            except DigestMismatchError as e:
                log.warning("skipping %s in the listing: %s", name, e)
            except NotFoundError:  # deleted while listing
                pass
        return latest

    # ----- publishing

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private work dir inside the root, locked while in use so gc can tell it is live."""
        self._staging_dir.mkdir(parents=True, exist_ok=True)
        ident = f"{os.getpid()}-{secrets.token_hex(6)}"
        lock_path = self._staging_dir / f"{ident}.lock"
        with lock.held(lock_path):
            work = self._staging_dir / ident
            work.mkdir()
            try:
                yield work
            finally:
                shutil.rmtree(work, ignore_errors=True)
                lock_path.unlink(missing_ok=True)

    def _check_namespace(self, name: str) -> None:
        """`org/x` and a plain adapter `org` cannot share a directory."""
        if "/" in name:
            org = name.split("/")[0]
            if (self.dir / org / "versions").exists():
                raise InvalidNameError(f"{org!r} is an adapter name, so it cannot be used as a namespace")
        else:
            d = self.dir / name
            if d.is_dir() and not (d / "versions").exists() and any(d.iterdir()):
                raise InvalidNameError(f"{name!r} is a namespace (it holds adapters like {name}/...)")

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
        """Store the PEFT adapter in `src_dir` as the next version of `name` and point `aliases` at it,
        unless a version of `name` satisfies `reuse` by the time the name's lock is held.

        With `sign_key` (an EC private key PEM) the version is signed; without it, a `model.sig`
        that `src_dir` holds (a pulled, signed version) is kept if it signs exactly these files.
        A full disk fails with DiskFullError and leaves nothing behind."""
        validate_name(name)
        aliases = [validate_alias(a) for a in aliases]
        src = Path(src_dir).expanduser()
        metadata = check_metadata(metadata)
        if metadata.get("source") is None:
            metadata["source"] = {"kind": "import", "path": str(src.resolve())}
        self._check_namespace(name)
        check_files(src)
        if sign_key is not None:
            private_key_id(sign_key)  # an unusable key fails now, before any copying
        with no_space_errors(f"publishing {src} as {name}", self.dir):
            return self._publish(src, name, base, aliases, metadata, reuse, sign_key)

    def _publish(
        self, src: Path, name: str, base: str | None, aliases: list[str], metadata: dict,
        reuse: Callable[[AdapterVersion], bool] | None, sign_key: str | Path | None,
    ) -> AdapterVersion:
        with self.staging() as work:
            staged = work / "version"
            staged.mkdir()
            for rel in ADAPTER_FILES:
                shutil.copyfile(src / rel, staged / rel)
            upstream_card = _upstream_card(src, metadata["source"])
            # validate the copy, so what is checked is exactly what is stored
            spec = validate_adapter_dir(staged, shown_as=src)
            link = link_base(self.bases, base, spec)
            check_fits(src, spec, link)
            weights = file_entries(staged, list(ADAPTER_FILES))  # the slow hashing, outside the lock
            signer = self._stage_signature(src, staged, work, weights, sign_key)
            with self._publish_locks(name):
                self._check_namespace(name)  # again: `org` and `org/x` publishing at once share a lock
                existing = self._reusable(name, reuse)
                if existing is not None:
                    log.info("%s already holds this adapter; nothing published", existing.ref)
                    return existing
                number = self._next_number(name)
                version = self._finish_staged(
                    staged, name, number, spec, weights, link.record(), metadata, upstream_card, signer
                )
                self._install(staged, name, number)
                for rel, entry in version.manifest["files"].items():  # so no later load rehashes them
                    self._digests.remember(version.path / rel, entry["sha256"])
                with no_space_errors_after(version.ref, aliases, self.dir):
                    for alias in aliases:
                        self.history(name).record(alias, "tag", self._target(name, alias), number, "published")
                        self._write_alias(name, alias, number)
                    self.generation.bump()
        log.info("published %s (%s)", version.ref, version.digest[:12])
        return version

    def _stage_signature(self, src: Path, staged: Path, work: Path, weights: dict,
                         sign_key: str | Path | None) -> dict | None:
        """Sign the staged files with `sign_key`, or carry over the signature `src` came with.
        Returns the manifest's `signature` record (None when unsigned)."""
        if sign_key is not None:
            key_id = sign_dir(staged, sign_key, work / SIGNATURE_FILE)
            install_signature(work / SIGNATURE_FILE, staged)
            return {"file": SIGNATURE_FILE, "signer": key_id}
        if not (src / SIGNATURE_FILE).is_file():
            return None
        shutil.copyfile(src / SIGNATURE_FILE, staged / SIGNATURE_FILE)
        problems = signature_problems(staged / SIGNATURE_FILE, weights)
        if problems:
            raise InvalidAdapterError(f"{src}: {'; '.join(problems)}; remove {SIGNATURE_FILE} to "
                                      "publish it unsigned, or re-sign it")
        return {"file": SIGNATURE_FILE, "signer": claimed_signer(staged)}

    @contextmanager
    def _publish_locks(self, name: str) -> Iterator[None]:
        """The name's lock, and for `org/x` first the lock of `org`, so that publishing `org` and
        `org/x` exclude each other (always taken in this order: no deadlock)."""
        top = name.split("/")[0]
        with contextlib.ExitStack() as stack:
            if top != name:
                stack.enter_context(lock.held(self._lock_path(top)))
            stack.enter_context(lock.held(self._lock_path(name)))
            yield

    def _reusable(self, name: str, reuse: Callable[[AdapterVersion], bool] | None) -> AdapterVersion | None:
        """The newest version of `name` that `reuse` accepts (call with the name's lock held)."""
        if reuse is None:
            return None
        for number in reversed(self._version_numbers(name)):
            version = self._load(name, number, verify=False)
            if reuse(version):
                return self._load(name, number, verify=True)
        return None

    def _next_number(self, name: str) -> int:
        counter = self._name_dir(name) / "last_version"
        last = int(counter.read_text()) if counter.is_file() else 0
        return max([last, *self._version_numbers(name)]) + 1

    def _finish_staged(
        self, staged: Path, name: str, number: int, spec: AdapterSpec,
        weights: dict, base_record: dict, metadata: dict, upstream_card: str | None,
        signer: dict | None,
    ) -> AdapterVersion:
        """Add the model card and manifest (they name the version), make files read-only, fsync."""
        ref = f"{name}@{number}"
        draft = {**build_manifest(spec, weights, base_record, metadata), "signature": signer}
        (staged / CARD_FILE).write_text(render_model_card(ref, draft, upstream_card), encoding="utf-8")
        manifest = {**draft, "files": {**weights, **file_entries(staged, [CARD_FILE])}}
        atomic_write_json(staged / MANIFEST_FILE, manifest)
        for f in staged.iterdir():
            f.chmod(READ_ONLY)
        fsync_tree(staged)
        final = self._name_dir(name) / "versions" / str(number)
        return AdapterVersion(name, number, files_digest(manifest["files"]), final, manifest)

    def _install(self, staged: Path, name: str, number: int) -> None:
        """The atomic step: rename the finished dir into place, then record the number. A kill in
        between leaves no gap in the numbers. The record only keeps a deleted version's number
        from coming back (`_next_number` also counts the directories), so a full disk there is
        logged, not raised: the version is whole and visible."""
        versions = self._name_dir(name) / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        staged.rename(versions / str(number))
        fsync_dir(versions)
        try:
            atomic_write_bytes(self._name_dir(name) / "last_version", f"{number}\n".encode())
        except OSError as e:
            if not is_no_space(e):
                raise
            log.warning("published %s@%d, but recording its number failed: %s", name, number, e)

    # ----- signing

    def sign(self, ref: str, key: str | Path, *, replace: bool = False) -> tuple[AdapterVersion, str]:
        """Sign the existing version `ref` with the EC private key `key`; returns (version, key id).

        The signature is written beside the files (its digest does not change) after they are
        rehashed against the manifest. A version signed by another key is refused unless
        `replace`; signing again with the same key changes nothing."""
        key_id = private_key_id(key)
        name = parse_ref(ref).name
        with (no_space_errors(f"signing {ref}", self.dir), self.staging() as work,
              lock.held(self._lock_path(name))):
            version = self.resolve(ref, verify=False)
            problems = file_problems(version.path, version.manifest["files"], cache=None)
            if problems:
                raise DigestMismatchError(f"{version.ref} no longer matches its manifest, so it is not "
                                          "signed: " + "; ".join(problems))
            current = self._current_signer(version)
            if current == key_id:
                return version, key_id
            if current is not None and not replace:
                raise SigningError(f"{version.ref} is already signed by {short_id(current)}; "
                                   f"replace that signature to sign it with {short_id(key_id)}")
            bundle = work / SIGNATURE_FILE
            sign_dir(version.path, key, bundle)
            problems = signature_problems(bundle, version.manifest["files"])
            if problems:  # e.g. a stray file in the version directory was signed too
                raise SigningError(f"{version.ref}: " + "; ".join(problems))
            install_signature(bundle, version.path)
            self.generation.bump()  # servers re-check trust
        log.info("signed %s with %s", version.ref, short_id(key_id))
        return version, key_id

    def _current_signer(self, version: AdapterVersion) -> str | None:
        """The key id of a version's intact signature ("" if it names none); None when unsigned or
        when the signature is for other files (then it may be replaced freely)."""
        path = version.path / SIGNATURE_FILE
        if not path.is_file() or signature_problems(path, version.manifest["files"]):
            return None
        return claimed_signer(version.path)

    # ----- aliases and deletion

    def _write_alias(self, name: str, alias: str, target: int | canary.Target) -> None:
        target = {target: 100} if isinstance(target, int) else target
        atomic_write_bytes(self._name_dir(name) / "aliases" / alias, f"{canary.format_target(target)}\n".encode())

    def _target(self, name: str, alias: str) -> int | dict[str, int] | None:
        """Where `alias` points, as its history writes it: a version, or {"version": percent}."""
        target = self.alias_targets(name).get(alias)
        return None if target is None else canary.to_record(target)

    def history(self, name: str) -> AliasHistory:
        return AliasHistory(self._name_dir(name))

    def evals(self, name: str) -> EvalRecords:
        return EvalRecords(self._name_dir(name))

    def record_eval(self, ref: str, record: EvalRecord) -> EvalRecord:
        """Keep an evaluation of the version `ref` means beside it (the version stays as it is)."""
        name = parse_ref(ref).name
        with no_space_errors(f"recording an evaluation of {ref}", self.dir), lock.held(self._lock_path(name)):
            version = self.resolve(ref, verify=False)
            kept = self.evals(name).append(version.version, record)
            self.generation.bump()  # readers that cache per generation (/v1/models) see it
            return kept

    def tag(self, ref: str, alias: str, reason: str = "", weight: int = 100,
            require: Iterable[str] = ()) -> AdapterVersion:
        """Point `alias` of ref's adapter at the version `ref` means (moving it if it exists), or
        with `weight` < 100 send that percentage of its traffic there and the rest to its stable
        version (a canary); the move is recorded in the alias's history first. Each of `require`
        (`evals.Requirement`, e.g. "contains>=0.8") must hold for the version's newest evaluation
        of that metric, or nothing moves (RegistryError naming every unmet one)."""
        validate_alias(alias)
        name = parse_ref(ref).name
        requirements = [Requirement.parse(r) for r in require]
        with no_space_errors(f"pointing alias {alias} at {ref}", self.dir), lock.held(self._lock_path(name)):
            version = self.resolve(ref, verify=False)
            if requirements:
                records = self.evals(name).read(version.version)
                unmet = [why for r in requirements if (why := r.unmet(records, version.ref)) is not None]
                if unmet:
                    raise RegistryError(f"not moving {name}@{alias} to {version.ref}: " + "; ".join(unmet))
            before = self._target(name, alias)
            target = canary.with_canary(self.alias_targets(name).get(alias), version.version, weight)
            self.history(name).record(alias, "tag", before, canary.to_record(target), reason)
            self._write_alias(name, alias, target)
            self.generation.bump()
        return version

    def rollback(self, name: str, alias: str, reason: str = "") -> AdapterVersion:
        """Move `alias` back to the target it had before the current one (RegistryError when its
        history holds none); recorded like any move."""
        validate_name(name)
        validate_alias(alias)
        with no_space_errors(f"rolling back alias {alias}", self.dir), lock.held(self._lock_path(name)):
            current = self._target(name, alias)
            if current is None and alias not in self.history(name).aliases():
                known = ", ".join(self.aliases(name)) or "none"
                raise NotFoundError(f"adapter {name!r} has no alias {alias!r}; aliases: {known}")
            target = self.history(name).rollback_target(alias, current)
            weights = canary.from_record(target)
            for v in weights:
                self.resolve(f"{name}@{v}", verify=False)  # NotFoundError if it was deleted since
            self.history(name).record(alias, "rollback", current, target, reason)
            self._write_alias(name, alias, weights)
            self.generation.bump()
        return self.resolve(f"{name}@{canary.stable(weights)}", verify=False)

    def untag(self, name: str, alias: str, reason: str = "") -> None:
        """Remove `alias` from adapter `name` (recorded in its history)."""
        validate_name(name)
        validate_alias(alias)
        with lock.held(self._lock_path(name)):
            path = self._name_dir(name) / "aliases" / alias
            if not path.is_file():
                known = ", ".join(self.aliases(name)) or "none"
                raise NotFoundError(f"adapter {name!r} has no alias {alias!r}; aliases: {known}")
            self.history(name).record(alias, "untag", self._target(name, alias), None, reason)
            path.unlink()
            fsync_dir(path.parent)
            self.generation.bump()

    def delete(self, ref: str, force: bool = False) -> AdapterVersion:
        """Delete the version `ref` means. Refused while an alias points at it, unless `force`
        (which removes those aliases too). Version numbers are never reused."""
        name = parse_ref(ref).name
        with self.staging() as work, lock.held(self._lock_path(name)):
            version = self.resolve(ref, verify=False)
            pointing = sorted(a for a, target in self.alias_targets(name).items() if version.version in target)
            if pointing and not force:
                raise RegistryError(
                    f"{version.ref} is what alias(es) {', '.join(pointing)} point to; move them with "
                    "`tag`, remove them with `untag`, or delete with force"
                )
            for alias in pointing:
                self.history(name).record(alias, "delete", self._target(name, alias), None, f"{version.ref} deleted")
                (self._name_dir(name) / "aliases" / alias).unlink()
            version.path.rename(work / "trash")  # disappears atomically; removed with the work dir
            fsync_dir(version.path.parent)
            self.evals(name).remove(version.version)
            self.generation.bump()
            for rel in version.manifest["files"]:
                self._digests.forget(version.path / rel)
        log.info("deleted %s", version.ref)
        return version

    # ----- checking and cleaning

    def verify(self, ref: str | None = None, policy: TrustPolicy | None = None) -> list[VerifyResult]:
        """Rehash every file of one version (`ref`) or of all versions and check their signatures
        (against `policy` when given: then an untrusted version is a failure); also report
        dangling aliases."""
        if ref is not None:
            name, number = self._pick_version(ref)
            return [self._verify_one(name, number, policy)]
        results = []
        for name in self.names():
            numbers = self._version_numbers(name)
            results += [self._verify_one(name, n, policy) for n in numbers]
            results += [
                VerifyResult(f"{name}@{alias}", (f"alias points to missing version {v}",))
                for alias, target in self.alias_targets(name).items()
                for v in target
                if v not in numbers
            ]
        return results

    def _verify_one(self, name: str, number: int, policy: TrustPolicy | None) -> VerifyResult:
        path = self._name_dir(name) / "versions" / str(number)
        ref = f"{name}@{number}"
        try:
            manifest = read_manifest(path)
        except ManifestError as e:
            return VerifyResult(ref, (str(e),))
        files = manifest["files"]
        problems = file_problems(path, files, cache=None)
        extra = sorted(p.name for p in path.iterdir()
                       if p.name not in files and p.name not in (MANIFEST_FILE, SIGNATURE_FILE))
        problems += [f"{rel}: not listed in the manifest" for rel in extra]
        problems += signature_problems(path / SIGNATURE_FILE, files)
        signer, trust = claimed_signer(path), ""
        if policy is not None:
            status = policy.check(AdapterVersion(name, number, files_digest(files), path, manifest))
            signer, trust = status.signer or signer, status.state
            if not status.trusted:
                problems.append(f"not trusted: {status.reason}")
        return VerifyResult(ref, tuple(problems), signer=signer, trust=trust)

    def gc(self) -> list[Path]:
        """Remove staging dirs of publishes that died, and lock files of names that no longer
        exist. Live publishes hold their staging lock, so they are never touched."""
        removed: list[Path] = []
        if self._staging_dir.is_dir():
            for entry in sorted(self._staging_dir.iterdir()):
                if entry.suffix == ".lock":
                    continue
                lock_path = self._staging_dir / f"{entry.name}.lock"
                if lock_path.exists() and lock.is_held(lock_path):
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
            for lock_path in sorted(self._staging_dir.glob("*.lock")):
                if not (self._staging_dir / lock_path.stem).exists() and lock.try_remove(lock_path):
                    removed.append(lock_path)
        locks_dir = self.dir / ".locks"
        if locks_dir.is_dir():
            for lock_path in sorted(locks_dir.glob("*.lock")):
                name = lock_path.stem.replace("~", "/")
                orphaned = not _is_valid_name(name) or not self._name_dir(name).exists()
                if orphaned and lock.try_remove(lock_path):
                    removed.append(lock_path)
        removed += self._remove_stale_temp_files()
        removed += self._digests.forget_missing()
        for path in removed:
            log.info("gc removed %s", path)
        return removed

    def _remove_stale_temp_files(self) -> list[Path]:
        """Temp files of atomic writes (alias, counter) whose writer died; live ones last milliseconds."""
        cutoff = time.time() - STALE_TEMP_S
        dirs = [self.dir, *(self._name_dir(n) for n in self.names())]
        dirs += [d / "aliases" for d in dirs[1:]]
        removed = []
        for d in dirs:
            for tmp in d.glob(".*.tmp") if d.is_dir() else ():
                try:
                    stale = tmp.stat().st_mtime < cutoff
                except FileNotFoundError:
                    continue  # its writer just finished
                if stale:
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
        return removed


@contextmanager
def no_space_errors_after(ref: str, aliases: list[str], where: Path) -> Iterator[None]:
    """A full disk after `ref` was installed: say what exists and what did not happen."""
    try:
        yield
    except OSError as e:
        if not is_no_space(e):
            raise
        raise DiskFullError(
            f"published {ref}, but the disk holding {where} filled up before "
            f"{'its aliases (' + ', '.join(aliases) + ') were set and ' if aliases else ''}running "
            f"servers were told; free some space, then run `loradock adapters tag {ref} ALIAS`"
        ) from e


def _upstream_card(src: Path, source: dict) -> str | None:
    """The README a Hub repo came with (kept in our card). PEFT's local boilerplate card is not."""
    card = src / CARD_FILE
    if source.get("kind") != "hub" or not card.is_file():
        return None
    return card.read_text(encoding="utf-8", errors="replace")


def _is_valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except InvalidNameError:
        return False
    return True
