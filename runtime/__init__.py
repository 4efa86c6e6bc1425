"""loradock.runtime: serve many LoRA adapters from one quantized base model.

`Engine(EngineConfig(base=...)).start()` then `submit()` / `generate()`; see engine.py.
Importing this package is cheap: torch and transformers load with the engine module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import EngineConfig
from .errors import (
    AdapterNotFoundError,
    AdapterUnavailableError,
    EngineError,
    EngineShutdownError,
    InvalidRequestError,
    QueueFullError,
)
from .types import (
    ChatMessage,
    EngineInfo,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ResidentAdapter,
    ResolvedAdapter,
    SamplingParams,
    StructuredOutput,
    Timings,
    TokenEvent,
    TokenLogprob,
)

if TYPE_CHECKING:
    from .engine import Engine
    from .handle import RequestHandle


def __getattr__(name: str):
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "RequestHandle":
        from .handle import RequestHandle

        return RequestHandle
    raise AttributeError(name)


__all__ = [
    "AdapterNotFoundError",
    "AdapterUnavailableError",
    "ChatMessage",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineInfo",
    "EngineShutdownError",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "InvalidRequestError",
    "QueueFullError",
    "RequestHandle",
    "ResidentAdapter",
    "ResolvedAdapter",
    "SamplingParams",
    "StructuredOutput",
    "Timings",
    "TokenEvent",
    "TokenLogprob",
]
