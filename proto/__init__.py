"""setpoint's wire protocol: topics, signed envelopes, bundles, reports, drift status.

Shared by the controller and the device shim. Pure: no I/O, no MQTT, no git; its only
dependencies are msgpack and cryptography. The protocol is written down in
``proto/SPEC.md``.
"""

from . import (
    approvals,
    bundles,
    codec,
    commands,
    diffs,
    envelopes,
    reports,
    repository,
    sealed,
    status,
    topics,
    trust,
)
from .errors import (
    DecodeError,
    ExpiredError,
    InvalidId,
    NotARecipient,
    PayloadTooLarge,
    PayloadTypeError,
    ProtocolError,
    RollbackError,
    SchemaError,
    SealedError,
    SealedInvalid,
    SetpointError,
    SignatureError,
    TransportError,
    TrustError,
    VerificationError,
    WrongTargetError,
    refusal_reason,
)
from .topics import Topics, validate_id

__all__ = [
    "DecodeError",
    "ExpiredError",
    "InvalidId",
    "NotARecipient",
    "PayloadTooLarge",
    "PayloadTypeError",
    "ProtocolError",
    "RollbackError",
    "SchemaError",
    "SealedError",
    "SealedInvalid",
    "SetpointError",
    "SignatureError",
    "Topics",
    "TransportError",
    "TrustError",
    "VerificationError",
    "WrongTargetError",
    "approvals",
    "bundles",
    "codec",
    "commands",
    "diffs",
    "envelopes",
    "refusal_reason",
    "reports",
    "repository",
    "sealed",
    "status",
    "topics",
    "trust",
    "validate_id",
]
