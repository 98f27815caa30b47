"""Fuzzing decode-and-verify: whatever arrives, only a ProtocolError subclass comes out.

A moderate number of examples keeps the suite fast; the security suite runs the long fuzz.
"""

from __future__ import annotations

import contextlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from setpoint.proto import ProtocolError, bundles, codec, commands, envelopes, reports
from setpoint.proto.bundles import Bundle, CommandResource, FileResource, SettingResource
from setpoint.proto.trust import Floor, TrustState

KEY = Ed25519PrivateKey.from_private_bytes(bytes([1]) * 32)
TRUSTED = envelopes.trusted_keys([KEY.public_key()])
GROUP_TYPE = envelopes.GROUP_BUNDLE_TYPE
NOW = 1_700_000_100
STATE = TrustState("kiosk-01", "kiosks", {"group/kiosks": Floor(3, "x" * 64)})
BUNDLE = Bundle(
    "group", "kiosks", 4, "c0ffee", 1_700_000_000, 1_800_000_000,
    (
        FileResource("motd", "etc/motd", b"hello ${site}\n", 0o644),
        SettingResource("tz", "time.zone", "UTC"),
        CommandResource("ntp", "test -f /run/ntp", "touch /run/ntp", 30),
    ),
)  # fmt: skip
PAYLOAD = bundles.encode(BUNDLE)
SIGNED = envelopes.sign(GROUP_TYPE, PAYLOAD, [KEY])

FUZZ = settings(
    max_examples=2000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
FIELD_NAMES = sorted(codec.unpack(PAYLOAD, max_size=len(PAYLOAD)))


def decode_everything(data: bytes) -> None:
    """Every decoder a device or the controller runs on bytes from the network."""
    for attempt in (
        lambda: envelopes.verify(data, TRUSTED, payload_type=GROUP_TYPE),
        lambda: bundles.decode(data),
        lambda: reports.decode(data),
        lambda: commands.decode(data),
        lambda: reports.decode_presence(data),
        lambda: STATE.evaluate("group", data, trusted=TRUSTED, now=NOW),
    ):
        with contextlib.suppress(ProtocolError):
            attempt()


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    decode_everything(data)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete", "truncate"]),
            st.integers(min_value=0, max_value=len(SIGNED) - 1),
            st.integers(min_value=1, max_value=255),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_valid_envelopes(mutations: list[tuple[str, int, int]]) -> None:
    data = bytearray(SIGNED)
    for how, where, byte in mutations:
        where %= max(len(data), 1)
        if how == "flip" and data:
            data[where] ^= byte
        elif how == "insert":
            data.insert(where, byte)
        elif how == "delete" and data:
            del data[where : where + byte % 8 + 1]
        elif how == "truncate":
            del data[where:]
    mutated = bytes(data)
    try:
        payload = envelopes.verify(mutated, TRUSTED, payload_type=GROUP_TYPE)
    except ProtocolError:
        return
    # Whatever survives verification is exactly what was signed.
    assert payload == PAYLOAD
    bundles.decode(payload)


@settings(FUZZ, max_examples=800)
@given(values)
def test_signed_arbitrary_structures(value: Any) -> None:
    # Well-formed and signed by a trusted key, but any shape: the bundle decoder must hold.
    data = envelopes.sign(GROUP_TYPE, codec.pack(value), [KEY])
    with contextlib.suppress(ProtocolError):
        STATE.evaluate("group", data, trusted=TRUSTED, now=NOW)


@settings(FUZZ, max_examples=1000)
@given(st.sampled_from(FIELD_NAMES), values)
def test_signed_bundle_with_one_field_replaced(name: str, value: Any) -> None:
    raw = codec.unpack(PAYLOAD, max_size=len(PAYLOAD))
    raw[name] = value
    data = envelopes.sign(GROUP_TYPE, codec.pack(raw), [KEY])
    with contextlib.suppress(ProtocolError):
        STATE.evaluate("group", data, trusted=TRUSTED, now=NOW)


@settings(FUZZ, max_examples=1000)
@given(st.integers(min_value=0, max_value=2), st.sampled_from(["id", "kind", "path", "content",
       "mode", "key", "value", "secret", "check", "apply", "timeout"]), values)  # fmt: skip
def test_signed_bundle_with_one_resource_field_replaced(index: int, name: str, value: Any) -> None:
    raw = codec.unpack(PAYLOAD, max_size=len(PAYLOAD))
    raw["resources"][index][name] = value
    data = envelopes.sign(GROUP_TYPE, codec.pack(raw), [KEY])
    with contextlib.suppress(ProtocolError):
        STATE.evaluate("group", data, trusted=TRUSTED, now=NOW)
