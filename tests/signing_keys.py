"""EC key pairs for signing tests, in the PEM files model_signing reads."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def make_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write `name.key` (PKCS#8 private key) and `name.pub` (public key) on P-256; return both."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private = directory / f"{name}.key"
    public = directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def write_policy(path: Path, rules: dict[str, list[Path]]) -> Path:
    """A trust policy YAML file mapping patterns to key files (in order)."""
    lines = [f'"{pattern}": [{", ".join(str(k) for k in keys)}]' for pattern, keys in rules.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
