"""The trainer's one door to the registry: find the base and the parent, publish the result.

Everything here is checked before training starts (names, aliases, base,
parent), so a run does not spend an hour training only to find it cannot
publish; the publish itself happens once, after training succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loradock.registry import AdapterVersion, Registry, RegistryError
from loradock.registry.bases import ResolvedBase
from loradock.registry.errors import DiskFullError
from loradock.registry.names import parse_ref, validate_alias, validate_name
from loradock.registry.quantization import QuantizationRecipe
from loradock.registry.signing import private_key_id

from .config import TrainConfig
from .errors import ConfigError


@dataclass(frozen=True)
class Parent:
    """The version training continues from."""

    ref: str  # exact name@N, recorded in the new version's manifest
    path: Path


def open_registry(registry: Registry | str | Path | None) -> Registry:
    return registry if isinstance(registry, Registry) else Registry(registry)


def resolve_base(model_name_or_path: str, registry: Registry) -> ResolvedBase:
    """A local Hugging Face model directory, else a registry base by name (the registry's rule)."""
    try:
        return registry.resolve_base(model_name_or_path)
    except RegistryError as e:
        raise ConfigError(f"model_name_or_path: {e} (or give a local model directory)") from e


def resolve_parent(ref: str, registry: Registry, base: ResolvedBase) -> Parent:
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
    if config.sign_key:
        try:
            private_key_id(config.sign_key)  # an unusable key fails before training, not after
        except RegistryError as e:
            raise ConfigError(f"sign_key: {e}") from e
    return name


def publish_adapter(
    registry: Registry, adapter_dir: Path, name: str, base: ResolvedBase, *,
    aliases: list[str], training: dict, quantization: QuantizationRecipe, dataset: dict,
    metrics: dict, parent: Parent | None, sign_key: str | None = None,
) -> AdapterVersion:
    """Store the trained adapter as the next version of `name`, with how it was made (signed with
    `sign_key` when given). A full disk keeps the trained adapter in `adapter_dir` and says so."""
    try:
        return _publish(registry, adapter_dir, name, base, aliases=aliases, training=training,
                        quantization=quantization, dataset=dataset, metrics=metrics, parent=parent,
                        sign_key=sign_key)
    except DiskFullError as e:
        raise DiskFullError(f"{e}. The trained adapter is kept in {adapter_dir}: publish it with "
                            f"`loradock adapters publish {adapter_dir} --name {name}`") from e


def _publish(
    registry: Registry, adapter_dir: Path, name: str, base: ResolvedBase, *,
    aliases: list[str], training: dict, quantization: QuantizationRecipe, dataset: dict,
    metrics: dict, parent: Parent | None, sign_key: str | None,
) -> AdapterVersion:
    return registry.publish(
        adapter_dir,
        name,
        base=base.name if base.registered else None,
        aliases=aliases,
        metadata={
            "source": {"kind": "trained"},
            # The manifest's base record has no fingerprint for a base outside the registry; keep it here.
            "training": {**training, "base_fingerprint": base.fingerprint,
                         "quantization": quantization.to_json()},
            "dataset": dataset,
            "metrics": metrics,
            "parent": parent.ref if parent else None,
        },
        sign_key=sign_key,
    )
