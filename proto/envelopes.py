"""The signed envelope: DSSE v1 pre-authentication encoding, Ed25519, msgpack framing.

An envelope is a msgpack map ``{payloadType: str, payload: bin, signatures: [{keyid: str,
sig: bin}, ...]}``. Each ``sig`` is Ed25519 over ``pae(payloadType, payload)``; ``keyid`` is
the lowercase hex SHA-256 of the signer's 32-byte raw public key.

:func:`verify` checks the framing, pins the payloadType, and counts valid signatures by
distinct trusted keys against a threshold *before* the payload is interpreted in any way;
it returns exactly the bytes that were verified. :func:`verify_signed` returns them with the
key ids whose signatures actually verified (:class:`Verified`): whoever names a signer
(an approval's operator, an audit line) must use those, never an entry merely present in
the envelope. Nothing here decides whether a verified
bundle is acceptable (version order, expiry, target): that is trust state's job.

Pure; no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import codec
from .errors import PayloadTypeError, SchemaError, SignatureError

GROUP_BUNDLE_TYPE: Final = "application/vnd.setpoint.bundle.group+msgpack"
DEVICE_BUNDLE_TYPE: Final = "application/vnd.setpoint.bundle.device+msgpack"
COMMAND_TYPE: Final = "application/vnd.setpoint.command+msgpack"
APPROVAL_TYPE: Final = "application/vnd.setpoint.approval+msgpack"
LEADER_TYPE: Final = "application/vnd.setpoint.leader+msgpack"
SHARD_LEASE_TYPE: Final = "application/vnd.setpoint.shard-lease+msgpack"
REPLICA_TYPE: Final = "application/vnd.setpoint.replica+msgpack"

MAX_ENVELOPE_BYTES: Final = 1024 * 1024
MAX_SIGNATURES: Final = 16
_SIG_LEN: Final = 64


@dataclass(frozen=True, slots=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True, slots=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]


@dataclass(frozen=True, slots=True)
class Verified:
    """A verified payload and the distinct trusted key ids whose signatures verified over it,
    in the order they appear in the envelope."""

    payload: bytes
    keyids: tuple[str, ...]


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of ``payload_type`` and ``payload``."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Lowercase hex SHA-256 of the 32-byte raw public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return hashlib.sha256(raw_public_key(public)).hexdigest()


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """Parse a PEM SubjectPublicKeyInfo Ed25519 public key."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SchemaError(f"public key is {type(key).__name__}, not Ed25519")
    return key


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """Parse a PEM PKCS#8 Ed25519 private key (unencrypted)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        # The message of cryptography's error never contains key material.
        raise SchemaError(f"not an unencrypted PEM PKCS#8 private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SchemaError(f"private key is {type(key).__name__}, not Ed25519")
    return key


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sign(payload_type: str, payload: bytes, keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """Sign ``payload`` with every key in ``keys`` and return the encoded envelope."""
    if not keys:
        raise ValueError("at least one signing key is needed")
    message = pae(payload_type, payload)
    return codec.pack(
        {
            "payloadType": payload_type,
            "payload": payload,
            "signatures": [{"keyid": key_id(k), "sig": k.sign(message)} for k in keys],
        }
    )


def decode(data: bytes, *, max_size: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse the envelope framing only; the payload stays opaque bytes."""
    raw = codec.unpack(data, max_size=max_size)
    if not isinstance(raw, dict):
        raise SchemaError("envelope is not a map")
    if set(raw) != {"payloadType", "payload", "signatures"}:
        raise SchemaError(
            f"envelope must have exactly payloadType, payload, signatures; got {sorted(raw)}"
        )
    payload_type, payload, signatures = raw["payloadType"], raw["payload"], raw["signatures"]
    if not isinstance(payload_type, str):
        raise SchemaError("envelope payloadType is not a string")
    if not isinstance(payload, bytes):
        raise SchemaError("envelope payload is not bin")
    if not isinstance(signatures, list):
        raise SchemaError("envelope signatures is not an array")
    if not signatures:
        raise SignatureError("envelope has no signatures")
    if len(signatures) > MAX_SIGNATURES:
        raise SchemaError(f"envelope has more than {MAX_SIGNATURES} signatures")
    parsed = []
    for entry in signatures:
        if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"}:
            raise SchemaError("each signature must be a map of exactly keyid and sig")
        keyid, sig = entry["keyid"], entry["sig"]
        if not isinstance(keyid, str) or not isinstance(sig, bytes):
            raise SchemaError("signature keyid must be str and sig bin")
        parsed.append(Signature(keyid, sig))
    return Envelope(payload_type, payload, tuple(parsed))


def verify_envelope_signed(
    envelope: Envelope,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    payload_type: str,
    threshold: int = 1,
) -> Verified:
    """Check type and signatures of a parsed envelope; return the payload and the key ids
    that verified it (an entry naming a trusted key with a bad signature is not among them)."""
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    if envelope.payload_type != payload_type:
        raise PayloadTypeError(
            f"payloadType {envelope.payload_type!r} where {payload_type!r} is required"
        )
    message = pae(envelope.payload_type, envelope.payload)
    good: list[str] = []
    for signature in envelope.signatures:
        key = trusted.get(signature.keyid)
        if key is None or signature.keyid in good or len(signature.sig) != _SIG_LEN:
            continue
        try:
            key.verify(signature.sig, message)
        except InvalidSignature:
            continue
        good.append(signature.keyid)
    if len(good) < threshold:
        known = [s.keyid[:12] for s in envelope.signatures if s.keyid in trusted]
        detail = f"signed by trusted key(s) {known}" if known else "no signature by a trusted key"
        raise SignatureError(
            f"{len(good)} valid signature(s) by trusted keys, {threshold} needed ({detail})"
        )
    return Verified(envelope.payload, tuple(good))


def verify_envelope(
    envelope: Envelope,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    payload_type: str,
    threshold: int = 1,
) -> bytes:
    """Check type and signatures of a parsed envelope; return the verified payload bytes."""
    return verify_envelope_signed(
        envelope, trusted, payload_type=payload_type, threshold=threshold
    ).payload


def verify_signed(
    data: bytes,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    payload_type: str,
    threshold: int = 1,
    max_size: int = MAX_ENVELOPE_BYTES,
) -> Verified:
    """Decode the framing of ``data`` and verify it; return the verified payload and the
    key ids whose signatures verified it."""
    return verify_envelope_signed(
        decode(data, max_size=max_size), trusted, payload_type=payload_type, threshold=threshold
    )


def verify(
    data: bytes,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    payload_type: str,
    threshold: int = 1,
    max_size: int = MAX_ENVELOPE_BYTES,
) -> bytes:
    """Decode the framing of ``data`` and verify it; return exactly the verified payload."""
    return verify_signed(
        data, trusted, payload_type=payload_type, threshold=threshold, max_size=max_size
    ).payload


def trusted_keys(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    """Map key id to key, as :func:`verify` expects."""
    return {key_id(k): k for k in keys}
