"""The trainer's one door to the registry: find the base and the parent, publish the result.

Everything here is checked before training starts (names, aliases, base,
parent), so a run does not spend an hour training only to find it cannot
publish; the publish itself happens once, after training succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loradock.registry import AdapterVersion, Registry, RegistryError
from loradock.registry.bases import check_model_dir, fingerprint
from loradock.registry.names import parse_ref, validate_alias, validate_name

from .config import TrainConfig
from .errors import ConfigError


@dataclass(frozen=True)
class BaseModel:
    """The base to train on: a registry base (name set) or a local model directory."""

    path: Path
    fingerprint: str
    name: str | None


@dataclass(frozen=True)
class Parent:
    """The version training continues from."""

    ref: str  # exact name@N, recorded in the new version's manifest
    path: Path


def open_registry(registry: Registry | str | Path | None) -> Registry:
    return registry if isinstance(registry, Registry) else Registry(registry)


def resolve_base(model_name_or_path: str, registry: Registry) -> BaseModel:
    """A registry base by name, else a local Hugging Face model directory."""
    local = Path(model_name_or_path).expanduser()
    if local.is_dir():
        try:
            check_model_dir(local)
            return BaseModel(local.resolve(), fingerprint(local), None)
        except RegistryError as e:
            raise ConfigError(f"model_name_or_path: {e}") from e
    try:
        info = registry.bases.get(model_name_or_path)
    except RegistryError as e:
        raise ConfigError(f"model_name_or_path: {e} (or give a local model directory)") from e
    return BaseModel(info.path, info.fingerprint, info.name)


def resolve_parent(ref: str, registry: Registry, base: BaseModel) -> Parent:
    """The parent version, which must have been trained on the same base."""
    try:
        version = registry.resolve(ref)
    except RegistryError as e:
        raise ConfigError(f"parent: {e}") from e
    parent_fp = (version.manifest.get("base") or {}).get("fingerprint")
    if parent_fp is not None and parent_fp != base.fingerprint:
        raise ConfigError(
            f"parent: {version.ref} was trained on another base "
            f"(fingerprint {parent_fp[:12]}, this run's base is {base.fingerprint[:12]})"
        )
    return Parent(version.ref, version.path)


def destination(config: TrainConfig) -> str | None:
    """The adapter name to publish to (checked with its aliases), or None when not publishing."""
    if not config.publish:
        return None
    name = config.adapter_name or parse_ref(config.parent).name
    try:
        validate_name(name)
    except RegistryError as e:
        raise ConfigError(f"adapter_name: {e}") from e
    for alias in config.aliases:
        try:
            validate_alias(alias)
        except RegistryError as e:
            raise ConfigError(f"aliases: {e}") from e
    return name


def publish_adapter(
    registry: Registry, adapter_dir: Path, name: str, base: BaseModel, *,
    aliases: list[str], training: dict, dataset: dict, metrics: dict, parent: Parent | None,
) -> AdapterVersion:
    """Store the trained adapter as the next version of `name`, with how it was made."""
    return registry.publish(
        adapter_dir,
        name,
        base=base.name,
        aliases=aliases,
        metadata={
            "source": {"kind": "trained"},
            # The manifest's base record has no fingerprint for a base outside the registry; keep it here.
            "training": {**training, "base_fingerprint": base.fingerprint},
            "dataset": dataset,
            "metrics": metrics,
            "parent": parent.ref if parent else None,
        },
    )
