"""Which gRPC status code each engine or registry error becomes.

One table, read in order (first match wins, so subclasses come before their bases).
Anything not in it is a bug in loradock and becomes INTERNAL.
"""

from __future__ import annotations

import grpc
from loradock.registry import (
    DigestMismatchError,
    IncompatibleBaseError,
    InvalidAdapterError,
    InvalidNameError,
    NotFoundError,
)
from loradock.runtime.errors import (
    AdapterNotFoundError,
    AdapterUnavailableError,
    EngineShutdownError,
    InvalidRequestError,
    QueueFullError,
)

ERROR_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidNameError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (DigestMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidAdapterError, grpc.StatusCode.FAILED_PRECONDITION),
    (IncompatibleBaseError, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineShutdownError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a client should see for `exc`."""
    for kind, code in ERROR_CODES:
        if isinstance(exc, kind):
            return code, str(exc) or kind.__name__
    # Details name the kind of bug without leaking internals; the traceback goes to the log.
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
