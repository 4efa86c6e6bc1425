"""Pull adapters from, and push versions to, a Hugging Face Hub (or a server speaking its API).

`HF_ENDPOINT` and `HF_TOKEN` are read at call time, so a process can switch Hubs.
Downloads go to a staging dir inside the registry root (as local_dir and cache),
so nothing is written outside it; the download is then published like any adapter.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from .errors import InvalidAdapterError, NotFoundError, RegistryError
from .fsutil import is_no_space, no_space_errors
from .names import validate_name
from .signing import SIGNATURE_FILE
from .validate import CONFIG_FILE, CONVERT_HINT, PICKLE_SUFFIXES
from .version import AdapterVersion

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger(__name__)

PULL_PATTERNS = [CONFIG_FILE, "*.safetensors", "README.md", SIGNATURE_FILE]
DEFAULT_REVISION = "main"


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _api() -> HfApi:
    return HfApi(endpoint=_endpoint())  # token: HF_TOKEN / saved login, looked up per request


class _HubErrors:
    """Turn huggingface_hub / network failures into registry errors that say what to check."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        where = _endpoint() or "the Hugging Face Hub"
        if is_no_space(exc):
            return False  # a full local disk, not the Hub's fault: no_space_errors reports it
        if isinstance(exc, RevisionNotFoundError | RepositoryNotFoundError):
            raise NotFoundError(
                f"{self.what}: not found on {where} (check the repo id and revision; a private repo "
                "needs HF_TOKEN)"
            ) from exc
        if isinstance(exc, HfHubHTTPError):
            raise RegistryError(f"{self.what}: the Hub at {where} answered: {exc}") from exc
        if isinstance(exc, OSError) or type(exc).__module__.startswith(("httpx", "httpcore")):
            raise RegistryError(f"{self.what}: cannot reach the Hub at {where} ({exc})") from exc
        return False


def _pulled_from(version: AdapterVersion, repo_id: str, commit: str) -> bool:
    source = version.manifest["source"]
    return source.get("kind") == "hub" and source.get("repo") == repo_id and source.get("commit") == commit


def _existing_pull(registry: Registry, name: str, repo_id: str, commit: str) -> AdapterVersion | None:
    try:
        versions = registry.versions(name)
    except NotFoundError:
        return None
    return next((v for v in reversed(versions) if _pulled_from(v, repo_id, commit)), None)


def _unsafe_path(name: str) -> bool:
    """A repo file name that could point outside the download folder on some OS."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ":" in name or "\\" in name or ".." in parts


def _check_repo_files(repo_id: str, commit: str, files: list[str]) -> None:
    unsafe = sorted(f for f in files if _unsafe_path(f))
    if unsafe:
        raise InvalidAdapterError(
            f"{repo_id}@{commit[:12]} holds file names that could escape the download folder "
            f"({', '.join(map(repr, unsafe))}); refusing to pull it"
        )
    if CONFIG_FILE not in files:
        raise InvalidAdapterError(
            f"{repo_id}@{commit[:12]} has no {CONFIG_FILE}: it is not a PEFT adapter repo "
            f"(files: {', '.join(sorted(files)) or 'none'})"
        )
    if not any(f.endswith(".safetensors") for f in files):
        pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        what = f"only pickle weights ({', '.join(pickles)})" if pickles else "no safetensors weights"
        raise InvalidAdapterError(f"{repo_id}@{commit[:12]} has {what}. {CONVERT_HINT}")


def pull(
    registry: Registry,
    repo_id: str,
    revision: str | None = None,
    name: str | None = None,
    base: str | None = None,
    sign_key: str | Path | None = None,
) -> AdapterVersion:
    """Publish the adapter in Hub repo `repo_id` at `revision` (default main) as `name` (default repo_id).

    The revision is resolved to a commit first; if that commit of that repo is already a
    version of `name`, it is returned and nothing is downloaded. A `model.sig` in the repo
    comes along (so a pushed, signed version stays signed); `sign_key` signs the new version
    instead. A full disk fails with DiskFullError and leaves nothing behind.
    """
    name = validate_name(name or repo_id)
    revision = revision or DEFAULT_REVISION
    api = _api()
    with _HubErrors(f"{repo_id}@{revision}"):
        info = api.model_info(repo_id, revision=revision)
    commit = info.sha
    existing = _existing_pull(registry, name, repo_id, commit)
    if existing is not None:
        log.info("%s@%s (commit %s) is already %s; nothing to do", repo_id, revision, commit[:12], existing.ref)
        return registry.resolve(existing.ref)
    _check_repo_files(repo_id, commit, [s.rfilename for s in info.siblings or []])
    with (no_space_errors(f"pulling {repo_id}@{commit[:12]}", registry.root),
          registry.staging() as work):
        with _HubErrors(f"{repo_id}@{commit[:12]}"):
            local = snapshot_download(
                repo_id,
                revision=commit,
                endpoint=_endpoint(),
                allow_patterns=PULL_PATTERNS,
                local_dir=work / "download",
                cache_dir=work / "hf-cache",
            )
        source = {"kind": "hub", "repo": repo_id, "revision": revision, "commit": commit}
        # Checked again under the name's lock: another pull of this commit may have won the race.
        return registry.publish(local, name, base=base, metadata={"source": source},
                                reuse=lambda v: _pulled_from(v, repo_id, commit), sign_key=sign_key)


def push(registry: Registry, ref: str, repo_id: str, private: bool = True) -> str:
    """Upload version `ref` (adapter files, model card, manifest) to `repo_id` in one commit.

    Creates the repo when missing (private by default). Returns the commit sha.
    """
    version = registry.resolve(ref)  # never upload files that fail their digests
    api = _api()
    with _HubErrors(f"push {version.ref} to {repo_id}"):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=version.path,
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Upload {version.ref} (digest {version.digest[:12]}) with loradock",
        )
    log.info("pushed %s to %s at commit %s", version.ref, repo_id, commit.oid)
    return commit.oid
