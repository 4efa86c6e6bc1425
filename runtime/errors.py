"""Engine errors. The gRPC edge maps each class to one status code (see runtime/server)."""


class EngineError(Exception):
    """Base class of every error the engine reports to a caller."""


class AdapterNotFoundError(EngineError):
    """The adapter reference names no adapter, version or alias.  -> NOT_FOUND"""


class InvalidRequestError(EngineError, ValueError):
    """A request field is out of range or malformed.  -> INVALID_ARGUMENT"""


class AdapterUnavailableError(EngineError):
    """The adapter exists but cannot be served: corrupt files, another base,
    rank above the configured maximum, unknown target modules.  -> FAILED_PRECONDITION"""


class AdapterUntrustedError(AdapterUnavailableError):
    """The server's trust policy refuses the version: unsigned, signed by a key not trusted for
    its name, or a signature that does not match its files.  -> FAILED_PRECONDITION"""


class QueueFullError(EngineError):
    """The waiting queue is at capacity; retry later.  -> RESOURCE_EXHAUSTED"""


class EngineShutdownError(EngineError):
    """The engine is draining or stopped.  -> UNAVAILABLE"""
