"""Base models: Hugging Face model directories stored under `<root>/bases/<name>/`.

The registry does not convert or load models (that needs torch; see
`loradock.bases`). It stores a ready directory atomically, fingerprints it, and
answers which bases exist. The fingerprint identifies the weights' *shape*
(config + tensor names and shapes), not their dtype, so a bf16 copy and its
4-bit serving form agree, and adapters record it to prove which base they fit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import AlreadyExistsError, InvalidBaseError, InvalidNameError, NotFoundError
from .fsutil import atomic_write_json, fsync_dir, fsync_tree, read_json
from .names import validate_name
from .safetensors_header import SafetensorsFormatError, read_header

INFO_FILE = "loradock_base.json"

# Config keys that describe how a copy was saved, not what the model is.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "quantization_config",
    "use_cache",
    "architectures",
}


@dataclass(frozen=True)
class BaseInfo:
    """A stored base model."""

    name: str
    path: Path
    fingerprint: str
    model_type: str
    num_parameters: int
    source: str
    source_digest: str
    created_at: str

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (sharded or not), sorted."""
    return sorted(Path(model_dir).glob("*.safetensors"))


def tensor_shapes(model_dir: Path) -> dict[str, list[int]]:
    """{tensor name: shape} over all safetensors files of a model directory."""
    shapes: dict[str, list[int]] = {}
    for f in weight_files(model_dir):
        try:
            header = read_header(f)
        except SafetensorsFormatError as e:
            raise InvalidBaseError(f"{model_dir}: {e}") from e
        shapes.update({name: info["shape"] for name, info in header.items()})
    return shapes


def fingerprint(model_dir: Path) -> str:
    """sha256 over the model's config (minus save-time keys) and its tensor names and shapes."""
    model_dir = Path(model_dir)
    config = {k: v for k, v in read_json(model_dir / "config.json").items() if k not in _VOLATILE_CONFIG_KEYS}
    shapes = tensor_shapes(model_dir)
    if not shapes:
        raise InvalidBaseError(f"{model_dir}: no safetensors weights found")
    blob = json.dumps({"config": config, "tensors": shapes}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class ResolvedBase:
    """The base a run uses: a registry base (`registered`) or a model directory given by path."""

    name: str  # the registry name, or the directory's name
    path: Path
    fingerprint: str
    registered: bool


class BaseStore:
    """The `bases/` half of a registry root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / "bases"

    def _info_path(self, name: str) -> Path:
        return self.dir / validate_name(name, allow_namespace=False) / INFO_FILE

    def exists(self, name: str) -> bool:
        return self._info_path(name).is_file()

    def get(self, name: str) -> BaseInfo:
        """The stored base `name`; NotFoundError lists the bases that exist."""
        path = self._info_path(name)
        if not path.is_file():
            known = ", ".join(b.name for b in self.list()) or "none (run `loradock bases add`)"
            raise NotFoundError(f"unknown base {name!r}; known bases: {known}")
        data = read_json(path)
        data["path"] = path.parent
        return BaseInfo(**data)

    def registered(self, spec: str) -> BaseInfo:
        """The stored base `spec` names: a registry base name, or a model directory that is a
        stored base (by path or by fingerprint). A directory that is not stored is refused with
        the command that adds it; an unknown name lists the bases that exist."""
        path = Path(spec).expanduser()
        if not path.is_dir():
            if "/" in spec or path.exists():
                raise NotFoundError(f"{spec}: no such model directory (give a registry base name or a model "
                                    "directory; `loradock bases list` shows the names)")
            return self.get(spec)
        check_model_dir(path)
        same = self.stored_as(path, fingerprint(path))
        if same is None:
            raise NotFoundError(f"{spec}: this model directory is not in the registry; add it with "
                                f"`loradock bases add {spec}` and pass its name (or the directory) again")
        return same

    def stored_as(self, model_dir: Path, fp: str | None = None) -> BaseInfo | None:
        """The stored base that `model_dir` is (its own directory) or holds (the same
        fingerprint, when `fp` is given), or None."""
        bases = self.list()
        same = next((b for b in bases if b.path.resolve() == model_dir.resolve()), None)
        return same or next((b for b in bases if fp is not None and b.fingerprint == fp), None)

    def resolve(self, spec: str) -> ResolvedBase:
        """A model directory path, else a registry base name -> ResolvedBase.

        The one rule the trainer and the runtime share: an existing directory wins (it must
        hold a safetensors model: InvalidBaseError otherwise), anything else is a base name
        (NotFoundError lists the known bases).
        """
        path = Path(spec).expanduser()
        if path.is_dir():
            check_model_dir(path)
            path = path.resolve()
            return ResolvedBase(path.name, path, fingerprint(path), registered=False)
        if path.exists():
            raise InvalidBaseError(f"{spec}: not a directory (give a registry base name or a model directory)")
        try:
            info = self.get(spec)
        except InvalidNameError as e:
            raise NotFoundError(f"{spec}: no such model directory, and {e}") from e
        return ResolvedBase(info.name, Path(info.path), info.fingerprint, registered=True)

    def list(self) -> list[BaseInfo]:
        if not self.dir.is_dir():
            return []
        return [self.get(p.parent.name) for p in sorted(self.dir.glob(f"*/{INFO_FILE}"))]

    def add(
        self, model_dir: Path, name: str, *, source: str, source_digest: str, move: bool = False
    ) -> tuple[BaseInfo, bool]:
        """Store a ready model directory as base `name`. Returns (info, created).

        Adding the same weights under the same name again is a no-op (created False);
        different weights under an existing name raise AlreadyExistsError. With
        `move`, `model_dir` is consumed (renamed into place when on the same disk).
        """
        validate_name(name, allow_namespace=False)
        model_dir = Path(model_dir)
        check_model_dir(model_dir)
        fp = fingerprint(model_dir)
        if self.exists(name):
            existing = self.get(name)
            if existing.fingerprint != fp:
                raise AlreadyExistsError(
                    f"base {name!r} already exists with different weights "
                    f"(fingerprint {existing.fingerprint[:12]} != {fp[:12]}); choose another --name"
                )
            return existing, False
        self.dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.dir, prefix=".staging-"))
        try:
            target = staging / "model"
            if move:
                shutil.move(str(model_dir), target)
            else:
                shutil.copytree(model_dir, target)
            n_params = sum(_numel(s) for s in tensor_shapes(target).values())
            info = {
                "name": name,
                "fingerprint": fp,
                "model_type": read_json(target / "config.json").get("model_type", "unknown"),
                "num_parameters": n_params,
                "source": source,
                "source_digest": source_digest,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            atomic_write_json(target / INFO_FILE, info)
            fsync_tree(target)
            target.rename(self.dir / name)
            fsync_dir(self.dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(name), True


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_model_dir(model_dir: Path) -> None:
    """Raise InvalidBaseError unless `model_dir` looks like a safetensors HF model directory."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise InvalidBaseError(f"{model_dir}: no such file or directory")
    if not model_dir.is_dir():
        raise InvalidBaseError(f"{model_dir}: not a directory")
    if not (model_dir / "config.json").is_file():
        raise InvalidBaseError(
            f"{model_dir}: not a Hugging Face model directory (no config.json)"
        )
    if not weight_files(model_dir):
        if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
            raise InvalidBaseError(
                f"{model_dir}: only pickle weights (.bin/.pt) found; loradock loads safetensors only. "
                "Convert with: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out)"
            )
        raise InvalidBaseError(f"{model_dir}: no *.safetensors weights found")
