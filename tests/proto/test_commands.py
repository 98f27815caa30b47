"""The signed reconcile command: round trip, signature binding and bad fields."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from setpoint.proto import (
    InvalidId,
    PayloadTooLarge,
    PayloadTypeError,
    ProtocolError,
    SchemaError,
    codec,
    commands,
    envelopes,
)
from setpoint.proto.commands import Command

RECONCILE = Command("kiosk-01", "reconcile", 7, 1_700_000_000, 1_700_000_060, "drift on motd")


def refused(cls: type[ProtocolError], data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        commands.decode(data)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"


def edited(**changes: Any) -> bytes:
    raw = codec.unpack(commands.encode(RECONCILE), max_size=commands.MAX_COMMAND_BYTES)
    for name, value in changes.items():
        if value is None:
            raw.pop(name)
        else:
            raw[name] = value
    return codec.pack(raw)


def test_round_trip() -> None:
    assert commands.decode(commands.encode(RECONCILE)) == RECONCILE


def test_signed_round_trip(key: Ed25519PrivateKey, trusted: dict[str, Ed25519PublicKey]) -> None:
    data = commands.sign(RECONCILE, [key])
    payload = envelopes.verify(data, trusted, payload_type=envelopes.COMMAND_TYPE)
    assert commands.decode(payload) == RECONCILE


def test_a_command_is_not_a_bundle(
    key: Ed25519PrivateKey, trusted: dict[str, Ed25519PublicKey]
) -> None:
    data = commands.sign(RECONCILE, [key])
    with pytest.raises(PayloadTypeError):
        envelopes.verify(data, trusted, payload_type=envelopes.DEVICE_BUNDLE_TYPE)


def test_fields_on_the_wire() -> None:
    raw = codec.unpack(commands.encode(RECONCILE), max_size=commands.MAX_COMMAND_BYTES)
    assert raw == {
        "device": "kiosk-01", "action": "reconcile", "seq": 7, "issued_at": 1_700_000_000,
        "expires_at": 1_700_000_060, "reason": "drift on motd",
    }  # fmt: skip


def test_long_reason_is_cut() -> None:
    assert len(commands.decode(edited(reason="r" * 1000)).reason) == 256


@pytest.mark.parametrize(
    "changes",
    [
        {"action": "reboot"},
        {"action": 1},
        {"seq": "7"},
        {"seq": True},
        {"issued_at": 1.5},
        {"expires_at": None},
        {"reason": None},
        {"reason": b"bin"},
        {"extra": 1},
    ],
    ids=repr,
)
def test_bad_fields(changes: dict[str, Any]) -> None:
    refused(SchemaError, edited(**changes))


def test_unknown_action_names_the_known_ones() -> None:
    with pytest.raises(SchemaError, match=r"unknown \(known: reconcile\)"):
        commands.decode(edited(action="reboot"))


@pytest.mark.parametrize("device", ["Kiosk", "a/b", "#", ""])
def test_bad_device(device: str) -> None:
    refused(InvalidId, edited(device=device))


def test_not_a_map_and_oversized() -> None:
    refused(SchemaError, codec.pack(["reconcile"]))
    refused(PayloadTooLarge, edited(reason="r" * commands.MAX_COMMAND_BYTES))
