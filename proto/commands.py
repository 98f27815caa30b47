"""Signed commands from the controller to one device (``.../devices/<id>/command``).

The only command today is ``reconcile``: re-observe every resource now and, in enforce
mode, put back what drifted. A command is a signed envelope (payloadType
``COMMAND_TYPE``) so that no one but the fleet key's holder can make devices act; it is
bound to one device, short-lived, and carries a sequence number that only goes up, so a
captured command cannot be replayed.

Pure; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import codec, envelopes
from .errors import SchemaError
from .topics import validate_id

ACTIONS: Final = ("reconcile",)
MAX_COMMAND_BYTES: Final = 4096
Action = Literal["reconcile"]


@dataclass(frozen=True, slots=True)
class Command:
    device: str
    action: Action
    seq: int
    issued_at: int
    expires_at: int
    reason: str = ""


def encode(command: Command) -> bytes:
    return codec.pack(
        {
            "device": command.device,
            "action": command.action,
            "seq": command.seq,
            "issued_at": command.issued_at,
            "expires_at": command.expires_at,
            "reason": command.reason,
        }
    )


def sign(command: Command, keys: list[Ed25519PrivateKey]) -> bytes:
    return envelopes.sign(envelopes.COMMAND_TYPE, encode(command), keys)


def decode(payload: bytes) -> Command:
    """Decode a *verified* command payload."""
    raw = codec.unpack(payload, max_size=MAX_COMMAND_BYTES)
    if not isinstance(raw, dict):
        raise SchemaError("command is not a map")
    fields = {"device", "action", "seq", "issued_at", "expires_at", "reason"}
    if set(raw) != fields:
        raise SchemaError(f"command must have exactly {sorted(fields)}")
    action = raw["action"]
    if action not in ACTIONS:
        raise SchemaError(f"command action {action!r} is unknown (known: {', '.join(ACTIONS)})")
    for name in ("seq", "issued_at", "expires_at"):
        if isinstance(raw[name], bool) or not isinstance(raw[name], int):
            raise SchemaError(f"command field {name!r} must be an integer")
    if not isinstance(raw["reason"], str):
        raise SchemaError("command reason must be a string")
    return Command(
        validate_id(raw["device"], "command device"),
        action,
        raw["seq"],
        raw["issued_at"],
        raw["expires_at"],
        raw["reason"][:256],
    )
