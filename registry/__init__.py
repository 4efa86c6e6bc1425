"""loradock.registry: bases and adapter versions as plain, verified files. No torch here."""

from .alias_history import AliasChange
from .bases import BaseInfo, BaseStore
from .errors import (
    AlreadyExistsError,
    DigestMismatchError,
    IncompatibleBaseError,
    InvalidAdapterError,
    InvalidBaseError,
    InvalidNameError,
    NotFoundError,
    RegistryError,
)
from .evals import METRICS, EvalRecord, Requirement, newest_per_metric
from .names import Ref, parse_ref
from .registry import Registry
from .version import AdapterVersion, VerifyResult

__all__ = [
    "METRICS",
    "AdapterVersion",
    "AliasChange",
    "AlreadyExistsError",
    "BaseInfo",
    "BaseStore",
    "DigestMismatchError",
    "EvalRecord",
    "IncompatibleBaseError",
    "InvalidAdapterError",
    "InvalidBaseError",
    "InvalidNameError",
    "NotFoundError",
    "Ref",
    "Registry",
    "RegistryError",
    "Requirement",
    "VerifyResult",
    "newest_per_metric",
    "parse_ref",
]
