"""The typed errors of the setpoint protocol.

Every failure to decode, verify or trust a message raises one of these, never a
third-party exception (msgpack, cryptography and json errors are converted at the edge
and chained). Grouped by what the caller should do::

    SetpointError
    ├── ProtocolError            bad data from the other side: refuse it, report it, never retry
    │   ├── InvalidId            an id or topic that does not match the id grammar
    │   │   └── WrongShardError  a report or presence under a shard not its device's
    │   ├── DecodeError          bytes that are not a well-formed, bounded message
    │   │   └── PayloadTooLarge  over the size cap (checked before decoding)
    │   ├── SchemaError          well-formed, but not the shape the protocol defines
    │   └── VerificationError    the envelope is not trusted
    │       ├── SignatureError   no (or too few) valid signatures by trusted keys
    │       └── PayloadTypeError payloadType is not the one pinned for this message
    │   └── TrustError           signed, but refused by trust state (rollback, expiry, target)
    │       ├── RollbackError
    │       ├── ExpiredError
    │       └── WrongTargetError
    │   └── SealedError          signed, but a sealed value in it cannot be opened here
    │       ├── NotARecipient    not sealed for this device (or it has no identity)
    │       └── SealedInvalid    the ciphertext does not decrypt (tampered, truncated)
    └── TransportError           the broker or link is gone: retry with backoff

Pure; no I/O.
"""

from __future__ import annotations


class SetpointError(Exception):
    """Base of every error setpoint raises on purpose."""


class ProtocolError(SetpointError):
    """Bad data from the other side: refuse it and report it; retrying will not help."""


class InvalidId(ProtocolError, ValueError):
    """An id that does not match ``^[a-z0-9][a-z0-9._-]{0,63}$``."""


class WrongShardError(InvalidId):
    """A report or presence topic whose shard level is not its device's shard (SPEC 3.1).

    ``device`` names the device of the topic: the receiver drops the message and counts it;
    a device's topic ACL cannot hold it to its own shard, so this is checked on receipt."""

    def __init__(self, message: str, device: str) -> None:
        super().__init__(message)
        self.device = device


class DecodeError(ProtocolError):
    """Bytes that are not one well-formed message within the limits."""


class PayloadTooLarge(DecodeError):
    """A message over its size cap; refused before any decoding."""


class SchemaError(ProtocolError):
    """A well-formed message whose fields are missing, extra or of the wrong type."""


class VerificationError(ProtocolError):
    """An envelope whose signatures do not establish trust."""


class SignatureError(VerificationError):
    """Fewer valid signatures by distinct trusted keys than the threshold."""


class PayloadTypeError(VerificationError):
    """The envelope's payloadType is not the one pinned for this topic."""


class TrustError(ProtocolError):
    """A correctly signed bundle that the trust state refuses."""


class RollbackError(TrustError):
    """A version lower than one already applied, or equal with other content."""


class ExpiredError(TrustError):
    """A bundle past its ``expires_at`` (beyond the allowed clock skew)."""


class WrongTargetError(TrustError):
    """A bundle addressed to another device or group."""


class SealedError(ProtocolError):
    """A sealed value the device cannot open; ``resource_id`` names the resource."""

    def __init__(self, message: str, resource_id: str | None = None) -> None:
        super().__init__(message)
        self.resource_id = resource_id


class NotARecipient(SealedError):
    """The value was not sealed for this device's identity (or the device has none)."""


class SealedInvalid(SealedError):
    """The ciphertext does not decrypt or authenticate: tampered, truncated or not age."""


class TransportError(SetpointError):
    """The broker or the link is unavailable; retry with backoff."""


# The word a device reports for each refusal (SPEC §8, "Refusal words"), most specific
# class first: PayloadTooLarge is a DecodeError, InvalidId is reported as a schema error.
REFUSAL_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (NotARecipient, "not-a-recipient"),
    (SealedInvalid, "sealed-invalid"),
    (PayloadTooLarge, "too-large"),
    (PayloadTypeError, "payload-type"),
    (SignatureError, "signature"),
    (ExpiredError, "expired"),
    (RollbackError, "rollback"),
    (WrongTargetError, "wrong-target"),
    (InvalidId, "schema"),
    (DecodeError, "malformed"),
    (SchemaError, "schema"),
)


def refusal_reason(exc: BaseException) -> str:
    """The stable word a device reports for why it refused a message (``refused`` if none)."""
    for cls, name in REFUSAL_REASONS:
        if isinstance(exc, cls):
            return name
    return "refused"
