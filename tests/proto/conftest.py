"""Shared fixtures of the proto tests: fixed test keys and sample bundles (no I/O)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from setpoint.proto import envelopes
from setpoint.proto.bundles import Bundle, CommandResource, FileResource, SettingResource

ISSUED = 1_700_000_000
EXPIRES = ISSUED + 7 * 24 * 3600


def _key(byte: int) -> Ed25519PrivateKey:
    # Fixed seeds: the tests are reproducible and never touch a real key.
    return Ed25519PrivateKey.from_private_bytes(bytes([byte]) * 32)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return _key(1)


@pytest.fixture
def key2() -> Ed25519PrivateKey:
    return _key(2)


@pytest.fixture
def stranger() -> Ed25519PrivateKey:
    """A key that no test trusts."""
    return _key(3)


@pytest.fixture
def trusted(key: Ed25519PrivateKey) -> dict[str, Ed25519PublicKey]:
    return envelopes.trusted_keys([key.public_key()])


@pytest.fixture
def group_bundle() -> Callable[..., Bundle]:
    def make(**changes: object) -> Bundle:
        fields: dict[str, object] = {
            "kind": "group",
            "target": "kiosks",
            "version": 3,
            "commit": "c0ffee" * 6 + "abcd",
            "issued_at": ISSUED,
            "expires_at": EXPIRES,
            "mode": "enforce",
            "resources": (
                FileResource("motd", "etc/motd", b"welcome to ${site}\n", 0o644),
                SettingResource("tz", "time.zone", "UTC"),
                CommandResource("ntp", "test -f /run/ntp", "touch /run/ntp", 30),
            ),
        }
        fields.update(changes)
        return Bundle(**fields)  # type: ignore[arg-type]

    return make


@pytest.fixture
def device_bundle() -> Callable[..., Bundle]:
    def make(**changes: object) -> Bundle:
        fields: dict[str, object] = {
            "kind": "device",
            "target": "kiosk-01",
            "version": 2,
            "commit": "c0ffee" * 6 + "abcd",
            "issued_at": ISSUED,
            "expires_at": EXPIRES,
            "group": "kiosks",
            "vars": {"site": "lobby", "screens": 2},
            "resources": (SettingResource("tz", "time.zone", "Europe/Paris"),),
        }
        fields.update(changes)
        return Bundle(**fields)  # type: ignore[arg-type]

    return make
