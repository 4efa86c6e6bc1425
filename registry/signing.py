"""Signed adapter versions in the OpenSSF model-signing format (`model_signing`), with EC keys.

A version's signature is `model.sig` in its directory: a Sigstore bundle whose DSSE payload
lists the sha256 of every file the signature covers. It covers the adapter itself
(adapter_config.json and the weights: what decides what the model says) and leaves out the
registry's own records, manifest.json and the model card, which the registry writes anew
when a version is pulled into another registry (another number, another source). The
signature file is not in the manifest's file table either, so signing an existing version
does not change its digest. Any `model_signing verify key` run on a version directory
checks the same thing, since the left-out names are recorded in the signed payload.

Checking a signature does not rehash: the signed digests are compared with the manifest's,
and the registry checks the manifest's against the disk on every open.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import SigningError
from .fsutil import fsync_dir
from .manifest import MANIFEST_FILE
from .modelcard import CARD_FILE

log = logging.getLogger(__name__)

SIGNATURE_FILE = "model.sig"
UNSIGNED_FILES = (MANIFEST_FILE, CARD_FILE, SIGNATURE_FILE)
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model_signing accepts
KEY_HELP = ("an EC private key in PEM (P-256, P-384 or P-521), e.g. made with "
            "`openssl ecparam -name prime256v1 -genkey -noout -out key.pem`; its public half "
            "(`openssl ec -in key.pem -pubout -out key.pub`) goes into the serving trust policy")

# Trust states of a version, as ListAdapters and `adapters verify` report them.
TRUSTED = "trusted"          # signed by a key the policy trusts for this name; the files match
UNSIGNED = "unsigned"        # no signature
UNTRUSTED = "untrusted"      # a valid-looking signature by a key the policy does not trust here
INVALID = "invalid"          # a signature that does not verify or does not match the files
UNCHECKED = "unchecked"      # no policy in force (the signer shown is what the signature claims)


@dataclass(frozen=True)
class TrustStatus:
    """What is known about who signed a version: `state` (one of the constants above), the
    signer's key id (sha256 of its PEM public key, as model_signing records it; "" if unsigned)
    and, when not trusted, why."""

    state: str
    signer: str = ""
    reason: str = ""

    @property
    def trusted(self) -> bool:
        return self.state == TRUSTED


@dataclass(frozen=True)
class PublicKey:
    """A public key file a trust policy names, with the id signatures refer to it by."""

    path: Path
    key_id: str


def short_id(key_id: str) -> str:
    """How a key id is shown to people: `key:` and its first 16 hex digits."""
    return f"key:{key_id[:16]}" if key_id else "-"


def _key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _check_curve(key: ec.EllipticCurvePublicKey | object, path: Path, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in SUPPORTED_CURVES:
        raise SigningError(f"{path} is not an EC {what} key on P-256, P-384 or P-521 "
                           f"(model signing needs one: {KEY_HELP})")


def load_public_key(path: str | Path) -> PublicKey:
    """A PEM public key file, checked to be one model_signing can verify with."""
    path = Path(path).expanduser()
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as e:
        raise SigningError(f"cannot read public key {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise SigningError(f"{path} is not a PEM public key ({e})") from e
    _check_curve(key, path, "public")
    return PublicKey(path, _key_id(key))


def private_key_id(path: str | Path, password: str | None = None) -> str:
    """The key id of the PEM private key at `path`; a clear SigningError when it is unusable."""
    path = Path(path).expanduser()
    try:
        key = serialization.load_pem_private_key(path.read_bytes(),
                                                 password.encode() if password else None)
    except OSError as e:
        raise SigningError(f"cannot read signing key {path}: {e.strerror or e}") from e
    except (ValueError, TypeError) as e:  # not PEM, wrong or missing password
        raise SigningError(f"{path} is not a usable PEM private key ({e}); expected {KEY_HELP}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SigningError(f"{path} is not an EC private key; expected {KEY_HELP}")
    _check_curve(key.public_key(), path, "private")
    return _key_id(key.public_key())


def sign_dir(version_dir: Path, key: str | Path, out: Path, password: str | None = None) -> str:
    """Sign the files of `version_dir` (all but UNSIGNED_FILES) with `key`, writing the bundle to
    `out` (outside the directory, so it is not hashed; the caller moves it in). Returns the key id."""
    from model_signing import hashing, signing  # imports sigstore: only when signing

    key_id = private_key_id(key, password)
    config = hashing.Config().set_ignored_paths(paths=list(UNSIGNED_FILES))
    signing.Config().set_hashing_config(config).use_elliptic_key_signer(
        private_key=Path(key).expanduser(), password=password).sign(version_dir, out)
    return key_id


def install_signature(bundle: Path, version_dir: Path) -> None:
    """Move a finished bundle into `version_dir` atomically (readers see none or all of it)."""
    bundle.chmod(0o444)
    os.replace(bundle, version_dir / SIGNATURE_FILE)
    fsync_dir(version_dir)


def claimed_signer(version_dir: Path) -> str:
    """The key id the version's signature names, unverified ("" when unsigned or unreadable)."""
    try:
        bundle = json.loads((version_dir / SIGNATURE_FILE).read_text(encoding="utf-8"))
        return str(bundle["verificationMaterial"]["publicKey"]["hint"] or "")
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _signed_digests(version_dir: Path, key: PublicKey) -> dict[str, str]:
    """{file: sha256} that `key` signed; ValueError when the bundle does not verify with it."""
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    signature = sign_sigstore_pb.Signature.read(version_dir / SIGNATURE_FILE)
    manifest = sign_ec_key.Verifier(key.path).verify(signature)
    if manifest.serialization_type.get("method") != "files":
        raise ValueError("it signs file shards, not whole files")
    return {rd.identifier: rd.digest.digest_hex for rd in manifest.resource_descriptors()}


def check_signature(version_dir: Path, files: dict[str, dict], keys: tuple[PublicKey, ...],
                    rule: str) -> TrustStatus:
    """Whether the version in `version_dir` (manifest file table `files`) is signed by one of
    `keys`, which rule `rule` of a trust policy trusts for its name, and the signature covers
    exactly its files as the manifest records them."""
    if not (version_dir / SIGNATURE_FILE).is_file():
        return TrustStatus(UNSIGNED, reason=f"it is not signed (the trust policy's rule {rule!r} "
                                            "requires a signature)")
    signer = claimed_signer(version_dir)
    candidates = [k for k in keys if k.key_id == signer] if signer else list(keys)
    if not candidates:
        trusted = ", ".join(f"{short_id(k.key_id)} ({k.path.name})" for k in keys) or "no keys"
        return TrustStatus(UNTRUSTED, signer, f"it is signed by {short_id(signer)}, which the trust "
                           f"policy's rule {rule!r} does not trust (it trusts {trusted})")
    problems = []
    for key in candidates:
        try:
            signed = _signed_digests(version_dir, key)
        except Exception as e:  # any parse or crypto failure means "does not verify"
            problems.append(f"{SIGNATURE_FILE} does not verify with {key.path.name} ({e})")
            continue
        expected = {rel: e["sha256"] for rel, e in files.items() if rel not in UNSIGNED_FILES}
        if signed != expected:
            changed = sorted(rel for rel in set(signed) | set(expected) if signed.get(rel) != expected.get(rel))
            problems.append(f"the signed files differ from the version's ({', '.join(changed)})")
            continue
        return TrustStatus(TRUSTED, key.key_id)
    return TrustStatus(INVALID, signer, "its signature is invalid: " + "; ".join(problems))


def signature_problems(path: Path, files: dict[str, dict]) -> list[str]:
    """Without a trusted key, what can still be checked of the signature bundle at `path`: that it
    is one, and that the digests it claims are those of the manifest file table `files`."""
    if not path.is_file():
        return []
    try:
        bundle = json.loads(path.read_text(encoding="utf-8"))
        payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        resources = payload["predicate"]["resources"]
        claimed = {r["name"]: r["digest"] for r in resources if r.get("algorithm") == "sha256"}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{SIGNATURE_FILE}: not a model-signing bundle ({e})"]
    expected = {rel: e["sha256"] for rel, e in files.items() if rel not in UNSIGNED_FILES}
    if claimed != expected:
        changed = sorted(rel for rel in set(claimed) | set(expected) if claimed.get(rel) != expected.get(rel))
        return [f"{SIGNATURE_FILE}: signs other content than this version's ({', '.join(changed)})"]
    return []

