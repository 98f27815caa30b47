"""Signed operator commands for rollouts: approve, pause, resume (``.../operators/commands``).

An operator holds an Ed25519 key whose public half is listed under ``operators:`` in the
fleet repository's ``fleet.yaml``. ``setpoint approve`` and ``setpoint rollout
pause|resume`` sign an :class:`OperatorCommand` (payloadType ``APPROVAL_TYPE``) with it;
the controller verifies the envelope against the operator keys of the protected branch
(``controller.protection``), refuses an expired command or one whose ``issued_at``/``nonce``
it has already seen, and acts. An unsigned or foreign message changes nothing.

Pure; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import codec, envelopes
from .errors import SchemaError
from .topics import validate_id

ACTIONS: Final = ("approve", "pause", "resume")
MAX_OPERATOR_COMMAND_BYTES: Final = 4096
Action = Literal["approve", "pause", "resume"]
_FIELDS: Final = frozenset({"action", "ring", "tree", "group", "nonce", "issued_at", "expires_at"})


@dataclass(frozen=True, slots=True)
class OperatorCommand:
    """``approve`` names a ring and the tree (content) approved for it; ``pause`` and
    ``resume`` name a group. ``nonce`` is unique per command (replies quote it)."""

    action: Action
    nonce: str
    issued_at: int
    expires_at: int
    ring: str = ""
    tree: str = ""
    group: str = ""


def encode(command: OperatorCommand) -> bytes:
    return codec.pack(
        {
            "action": command.action,
            "ring": command.ring,
            "tree": command.tree,
            "group": command.group,
            "nonce": command.nonce,
            "issued_at": command.issued_at,
            "expires_at": command.expires_at,
        }
    )


def sign(command: OperatorCommand, keys: list[Ed25519PrivateKey]) -> bytes:
    return envelopes.sign(envelopes.APPROVAL_TYPE, encode(command), keys)


def decode(payload: bytes) -> OperatorCommand:
    """Decode a *verified* operator command payload."""
    raw = codec.unpack(payload, max_size=MAX_OPERATOR_COMMAND_BYTES)
    if not isinstance(raw, dict):
        raise SchemaError("operator command is not a map")
    if set(raw) != _FIELDS:
        raise SchemaError(f"operator command must have exactly {sorted(_FIELDS)}")
    action = raw["action"]
    if action not in ACTIONS:
        raise SchemaError(f"operator action {action!r} is unknown (known: {', '.join(ACTIONS)})")
    for name in ("issued_at", "expires_at"):
        if isinstance(raw[name], bool) or not isinstance(raw[name], int):
            raise SchemaError(f"operator command field {name!r} must be an integer")
    for name in ("ring", "tree", "group", "nonce"):
        if not isinstance(raw[name], str) or len(raw[name]) > 128:
            raise SchemaError(f"operator command field {name!r} must be a short string")
    if action == "approve":
        validate_id(raw["ring"], "ring")
        if not raw["tree"]:
            raise SchemaError("an approval names the tree (content) it approves")
    else:
        validate_id(raw["group"], "group id")
    if not raw["nonce"]:
        raise SchemaError("operator command nonce is empty")
    return OperatorCommand(
        action=action,
        nonce=raw["nonce"],
        issued_at=raw["issued_at"],
        expires_at=raw["expires_at"],
        ring=raw["ring"],
        tree=raw["tree"],
        group=raw["group"],
    )
