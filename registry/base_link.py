"""Which base model an adapter belongs to, and whether its layers fit that base.

Order: the explicit `base` (a registry base, by name or by its model directory); else adapter_config's
`base_model_name_or_path` when it names a registry base (by name, by directory, or
by a local directory with the same fingerprint); else a local model directory that
is not in the registry (fingerprinted and checked all the same); else the name
alone, with fingerprint null.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .bases import BaseStore, fingerprint, tensor_shapes
from .errors import IncompatibleBaseError, InvalidNameError, RegistryError
from .validate import AdapterSpec, base_problems


@dataclass(frozen=True)
class BaseLink:
    name: str | None
    fingerprint: str | None
    model_dir: Path | None  # where to read tensor shapes from; None when unknown

    def record(self) -> dict:
        """The manifest's `base` entry."""
        return {"name": self.name, "fingerprint": self.fingerprint}


def _local_fingerprint(path: Path) -> str | None:
    try:
        return fingerprint(path) if path.is_dir() else None
    except (RegistryError, OSError, ValueError):
        return None  # not a readable model directory: treat the hint as a plain name


def link_base(bases: BaseStore, base: str | None, spec: AdapterSpec) -> BaseLink:
    """The base for `spec` (see the module docstring); NotFoundError for an unknown explicit base."""
    if base is not None:
        info = bases.registered(base)
        return BaseLink(info.name, info.fingerprint, info.path)
    hint = spec.base_model_name_or_path
    if not hint:
        return BaseLink(None, None, None)
    try:
        if bases.exists(hint):
            info = bases.get(hint)
            return BaseLink(info.name, info.fingerprint, info.path)
    except InvalidNameError:
        pass  # e.g. a Hub id "org/model" is never a registry base name
    path = Path(hint).expanduser()
    fp = _local_fingerprint(path)
    if fp is None:
        return BaseLink(hint, None, None)
    same = bases.stored_as(path, fp)
    if same is not None:
        return BaseLink(same.name, same.fingerprint, same.path)
    return BaseLink(hint, fp, path)


def check_fits(src: Path, spec: AdapterSpec, link: BaseLink) -> None:
    """Raise IncompatibleBaseError unless every LoRA module exists in the base with matching dims."""
    if link.model_dir is None:
        return
    problems = base_problems(spec.modules, tensor_shapes(link.model_dir))
    if problems:
        raise IncompatibleBaseError(
            f"{src} does not fit base {link.name!r}:\n  - " + "\n  - ".join(problems)
        )
