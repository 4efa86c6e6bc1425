"""Registry errors. Each names the problem in words a person can act on."""


class RegistryError(Exception):
    """Base class of every error the registry raises."""


class InvalidNameError(RegistryError, ValueError):
    """A name or reference is malformed (path tricks, bad characters)."""


class NotFoundError(RegistryError, KeyError):
    """A base, adapter, version or alias does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidAdapterError(RegistryError, ValueError):
    """Files offered as an adapter are not a usable PEFT LoRA adapter."""


class InvalidBaseError(RegistryError, ValueError):
    """Files offered as a base model are not a usable model directory."""


class IncompatibleBaseError(RegistryError):
    """An adapter was trained on a different base than the one named."""


class DigestMismatchError(RegistryError):
    """Files on disk no longer match the digests recorded when they were published."""


class AlreadyExistsError(RegistryError):
    """Something with this name already exists and differs from what was offered."""


class SigningError(RegistryError):
    """A signing key or signature file cannot be used (unreadable, wrong kind, already signed)."""


class TrustPolicyError(RegistryError, ValueError):
    """A trust policy file is malformed or names key files that cannot be used."""


class DiskFullError(RegistryError):
    """The registry's disk (or the user's quota) ran out of space during a write."""
