"""Plain views the gRPC edge reports besides generation results: the adapter catalogue
(registry versions + cache residency) and the server's description.

The engine speaks `runtime/types.py`; these are the extra shapes `ListAdapters`,
`LoadAdapter` and `GetInfo` return. `convert.py` maps them to and from protobuf, so the
client can hand the same dataclasses to its callers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loradock.runtime.types import EngineInfo, ResolvedAdapter


@dataclass(frozen=True)
class TrustView:
    state: str  # trusted / unsigned / untrusted / invalid / unchecked (registry/signing.py)
    reason: str = ""  # why not trusted


@dataclass(frozen=True)
class AdapterVersionView:
    version: int
    digest: str
    aliases: tuple[str, ...] = ()
    created_at: str = ""
    rank: int = 0
    on_device: bool = False  # in a device slot now
    in_host_memory: bool = False  # in the host-memory cache now
    pinned: bool = False
    trained_quantization: str = ""  # the recipe it was trained with, in words
    quantization_mismatch: str = ""  # how the served base's recipe differs from it ("" when not)
    signer: str = ""  # key id the signature names ("" when unsigned)
    trust: TrustView = field(default_factory=lambda: TrustView("unchecked"))
    servable: bool = True  # the runtime serves this PEFT adapter (manifest "servable")
    not_servable_reason: str = ""  # why not ("" when servable)


@dataclass(frozen=True)
class AdapterView:
    name: str
    versions: tuple[AdapterVersionView, ...]
    aliases: dict[str, int] = field(default_factory=dict)  # alias -> version
    base_name: str = ""


@dataclass(frozen=True)
class LoadResult:
    adapter: ResolvedAdapter
    load_ms: float  # 0 when it was already resident


@dataclass(frozen=True)
class ServerInfo(EngineInfo):
    """The engine's description plus the loradock version and the process serving it."""

    loradock_version: str = ""
    pid: int = 0
    start_time: float = 0.0  # unix seconds, when the serving process started
