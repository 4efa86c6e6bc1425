"""The manifest of an adapter version: what it is, where it came from, and its files' digests.

Keys other modules code against (see docs/architecture.md, "Registry"):
files {relpath: {sha256, size}}, created_at, base {name, fingerprint}, peft_type,
rank, alpha, target_modules, use_rslora, use_dora, lora_bias, servable (whether loradock's
runtime serves this PEFT adapter) and not_servable_because (the reasons when it does not),
source {kind, ...}, training, dataset, metrics, parent, parents (a merge's inputs).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .errors import InvalidAdapterError, InvalidNameError
from .fsutil import read_json, sha256_file
from .names import parse_ref
from .validate import AdapterSpec

MANIFEST_FILE = "manifest.json"
SOURCE_KINDS = {"trained": (), "hub": ("repo", "revision", "commit"), "import": ("path",),
                "merge": ("strategy",)}
METADATA_KEYS = ("source", "training", "dataset", "metrics", "parent", "parents")


class ManifestError(ValueError):
    """A manifest.json that is missing, unreadable, or not shaped like one loradock writes."""


def read_manifest(version_dir: Path) -> dict:
    """Read `version_dir/manifest.json`, checking the shape every reader relies on.

    Version directories are written only by the registry, but a manifest edited by
    hand or by another tool must fail as a damaged version, not as a crash.
    """
    try:
        manifest = read_json(version_dir / MANIFEST_FILE)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{MANIFEST_FILE} is missing or unreadable ({e})") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{MANIFEST_FILE} is not a JSON object")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{MANIFEST_FILE} has no 'files' table")
    for rel, entry in files.items():
        if "/" in rel or "\\" in rel or rel in ("", ".", "..") or rel == MANIFEST_FILE:
            raise ManifestError(f"{MANIFEST_FILE} lists an invalid file name {rel!r}")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("size"), int)
        ):
            raise ManifestError(f"{MANIFEST_FILE}: entry for {rel!r} needs a sha256 string and an integer size")
    base = manifest.get("base")
    if base is not None and not isinstance(base, dict):
        raise ManifestError(f"{MANIFEST_FILE}: 'base' must be an object with name and fingerprint")
    return manifest


def file_entries(version_dir: Path, relpaths: list[str]) -> dict[str, dict]:
    """{relpath: {"sha256", "size"}} for files inside `version_dir`."""
    return {
        rel: {"sha256": sha256_file(version_dir / rel), "size": (version_dir / rel).stat().st_size}
        for rel in sorted(relpaths)
    }


def files_digest(files: dict[str, dict]) -> str:
    """One sha256 naming a version's content: over the sorted (path, sha256, size) list."""
    canonical = json.dumps(
        [[rel, files[rel]["sha256"], files[rel]["size"]] for rel in sorted(files)], separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_metadata(metadata: dict | None) -> dict:
    """Validate publish(metadata=...) and return it with defaults filled; raise naming each problem."""
    metadata = dict(metadata or {})
    problems = []
    unknown = sorted(set(metadata) - set(METADATA_KEYS))
    if unknown:
        problems.append(f"unknown metadata keys {unknown}; allowed: {list(METADATA_KEYS)}")
    source = metadata.get("source")
    if source is not None:
        if not isinstance(source, dict) or source.get("kind") not in SOURCE_KINDS:
            problems.append(f"source must be an object with kind one of {sorted(SOURCE_KINDS)}, got {source!r}")
        else:
            missing = [k for k in SOURCE_KINDS[source["kind"]] if not source.get(k)]
            if missing:
                problems.append(f"source of kind {source['kind']!r} needs {missing}")
    for key in ("training", "dataset"):
        if metadata.get(key) is not None and not isinstance(metadata[key], dict):
            problems.append(f"{key} must be an object or null, got {type(metadata[key]).__name__}")
    dataset = metadata.get("dataset")
    if isinstance(dataset, dict) and not isinstance(dataset.get("digest"), str):
        problems.append("dataset must record its 'digest' (a string)")
    metrics = metadata.get("metrics", {})
    if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
        problems.append("metrics must be an object with string keys")
    parent = metadata.get("parent")
    if parent is not None:
        try:
            ok = parse_ref(parent).version is not None
        except InvalidNameError:
            ok = False
        if not ok:
            problems.append(f"parent must be a version reference like 'name@3', got {parent!r}")
    problems += _parents_problems(metadata.get("parents"))
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        problems.append(f"metadata must be plain JSON ({e})")
    if problems:
        raise InvalidAdapterError("invalid metadata:\n  - " + "\n  - ".join(problems))
    metadata.setdefault("training", None)
    metadata.setdefault("dataset", None)
    metadata.setdefault("metrics", {})
    metadata.setdefault("parent", None)
    metadata.setdefault("parents", None)
    return metadata


def _parents_problems(parents: object) -> list[str]:
    """A merge's lineage: [{ref: "name@N", digest, weight}, ...] (None for anything else)."""
    if parents is None:
        return []
    if not isinstance(parents, list) or not parents:
        return [f"parents must be a non-empty list, got {parents!r}"]
    problems = []
    for entry in parents:
        ok = isinstance(entry, dict) and isinstance(entry.get("digest"), str) \
            and isinstance(entry.get("weight"), int | float) and not isinstance(entry.get("weight"), bool)
        try:
            ok = ok and parse_ref(entry["ref"]).version is not None
        except (InvalidNameError, TypeError):
            ok = False
        if not ok:
            problems.append(f"each parent needs ref ('name@3'), digest and weight, got {entry!r}")
    return problems


def build_manifest(
    spec: AdapterSpec,
    files: dict[str, dict],
    base: dict,
    metadata: dict,
) -> dict:
    """The manifest dict of a new version (`metadata` already checked, with a source)."""
    return {
        "files": files,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": base,
        "peft_type": spec.config["peft_type"],
        "rank": spec.rank,
        "alpha": spec.alpha,
        "target_modules": spec.target_modules,
        "use_rslora": spec.use_rslora,
        "use_dora": bool(spec.config.get("use_dora")),
        "lora_bias": bool(spec.config.get("lora_bias")),
        "servable": spec.servable,  # by loradock's runtime; if not, why:
        "not_servable_because": list(spec.serving_problems),
        "source": metadata["source"],
        "training": metadata["training"],
        "dataset": metadata["dataset"],
        "metrics": metadata["metrics"],
        "parent": metadata["parent"],
        "parents": metadata["parents"],  # a merge's inputs: ref, digest, weight
    }
