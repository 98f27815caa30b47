"""The signed envelope: one test per attack, each refused with exactly its typed error."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from setpoint.proto import (
    DecodeError,
    PayloadTooLarge,
    PayloadTypeError,
    ProtocolError,
    SchemaError,
    SignatureError,
    codec,
    envelopes,
)
from setpoint.proto.envelopes import COMMAND_TYPE, DEVICE_BUNDLE_TYPE, GROUP_BUNDLE_TYPE

PAYLOAD = codec.pack({"hello": "device", "n": 1})
Trusted = dict[str, Ed25519PublicKey]


def refused(cls: type[ProtocolError], data: Any, trusted: Trusted, **kw: Any) -> ProtocolError:
    """Verify ``data`` and return the error, asserting its class is exactly ``cls``."""
    kw.setdefault("payload_type", GROUP_BUNDLE_TYPE)
    with pytest.raises(ProtocolError) as info:
        envelopes.verify(data, trusted, **kw)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    return info.value


def raw(data: bytes) -> dict[str, Any]:
    value = codec.unpack(data, max_size=envelopes.MAX_ENVELOPE_BYTES)
    assert isinstance(value, dict)
    return value


@pytest.fixture
def signed(key: Ed25519PrivateKey) -> bytes:
    return envelopes.sign(GROUP_BUNDLE_TYPE, PAYLOAD, [key])


# --- the pieces -------------------------------------------------------------------------


def test_pae_layout() -> None:
    assert envelopes.pae("t", b"ab") == b"DSSEv1 1 t 2 ab"
    assert envelopes.pae("", b"") == b"DSSEv1 0  0 "
    # Lengths count UTF-8 bytes, not characters.
    assert envelopes.pae("é", b"\x00") == b"DSSEv1 2 \xc3\xa9 1 \x00"


def test_pae_of_a_bundle_type() -> None:
    expected = b"DSSEv1 45 " + GROUP_BUNDLE_TYPE.encode() + b" 3 abc"
    assert envelopes.pae(GROUP_BUNDLE_TYPE, b"abc") == expected


def test_key_id_is_sha256_of_the_raw_public_key(key: Ed25519PrivateKey) -> None:
    raw_key = envelopes.raw_public_key(key.public_key())
    assert len(raw_key) == 32
    expected = hashlib.sha256(raw_key).hexdigest()
    assert envelopes.key_id(key) == envelopes.key_id(key.public_key()) == expected
    assert expected == expected.lower() and len(expected) == 64


def test_pem_round_trip(key: Ed25519PrivateKey) -> None:
    private = envelopes.load_private_key(envelopes.private_key_pem(key))
    public = envelopes.load_public_key(envelopes.public_key_pem(key.public_key()))
    assert envelopes.key_id(private) == envelopes.key_id(public) == envelopes.key_id(key)
    assert envelopes.private_key_pem(key).startswith(b"-----BEGIN PRIVATE KEY-----")
    assert envelopes.public_key_pem(key.public_key()).startswith(b"-----BEGIN PUBLIC KEY-----")


@pytest.mark.parametrize("pem", [b"", b"not a key", b"-----BEGIN PUBLIC KEY-----\nAA\n"])
def test_bad_pem_is_a_schema_error(pem: bytes) -> None:
    with pytest.raises(SchemaError):
        envelopes.load_public_key(pem)
    with pytest.raises(SchemaError):
        envelopes.load_private_key(pem)


def test_non_ed25519_keys_are_refused() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1())
    private_pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(SchemaError, match="not Ed25519"):
        envelopes.load_private_key(private_pem)
    with pytest.raises(SchemaError, match="not Ed25519"):
        envelopes.load_public_key(public_pem)


def test_envelope_framing(signed: bytes, key: Ed25519PrivateKey) -> None:
    value = raw(signed)
    assert list(value) == ["payload", "payloadType", "signatures"]  # canonical: sorted
    assert value["payloadType"] == GROUP_BUNDLE_TYPE
    assert value["payload"] == PAYLOAD
    [signature] = value["signatures"]
    assert signature["keyid"] == envelopes.key_id(key)
    key.public_key().verify(signature["sig"], envelopes.pae(GROUP_BUNDLE_TYPE, PAYLOAD))


def test_sign_needs_a_key() -> None:
    with pytest.raises(ValueError):
        envelopes.sign(GROUP_BUNDLE_TYPE, PAYLOAD, [])


def test_decode_keeps_the_payload_opaque(signed: bytes) -> None:
    envelope = envelopes.decode(signed)
    assert envelope.payload_type == GROUP_BUNDLE_TYPE
    assert envelope.payload == PAYLOAD
    assert len(envelope.signatures) == 1


# --- acceptance -------------------------------------------------------------------------


def test_round_trip_returns_exactly_the_signed_bytes(signed: bytes, trusted: Trusted) -> None:
    assert envelopes.verify(signed, trusted, payload_type=GROUP_BUNDLE_TYPE) == PAYLOAD


def test_signing_is_deterministic(key: Ed25519PrivateKey) -> None:
    one = envelopes.sign(GROUP_BUNDLE_TYPE, PAYLOAD, [key])
    assert one == envelopes.sign(GROUP_BUNDLE_TYPE, PAYLOAD, [key])


def test_threshold_two_with_two_keys(key: Ed25519PrivateKey, key2: Ed25519PrivateKey) -> None:
    trusted = envelopes.trusted_keys([key.public_key(), key2.public_key()])
    data = envelopes.sign(GROUP_BUNDLE_TYPE, PAYLOAD, [key, key2])
    assert envelopes.verify(data, trusted, payload_type=GROUP_BUNDLE_TYPE, threshold=2) == PAYLOAD


def test_one_trusted_signature_among_untrusted_ones_is_enough(
    key: Ed25519PrivateKey, stranger: Ed25519PrivateKey, trusted: Trusted
) -> None:
    data = envelopes.sign(GROUP_BUNDLE_TYPE, PAYLOAD, [stranger, key])
    assert envelopes.verify(data, trusted, payload_type=GROUP_BUNDLE_TYPE) == PAYLOAD


def test_a_bad_signature_next_to_a_good_one_does_not_spoil_it(
    signed: bytes, key: Ed25519PrivateKey, trusted: Trusted
) -> None:
    value = raw(signed)
    value["signatures"].insert(0, {"keyid": envelopes.key_id(key), "sig": b"\x00" * 64})
    assert envelopes.verify(codec.pack(value), trusted, payload_type=GROUP_BUNDLE_TYPE) == PAYLOAD


def test_threshold_below_one_is_a_programming_error(signed: bytes, trusted: Trusted) -> None:
    with pytest.raises(ValueError):
        envelopes.verify(signed, trusted, payload_type=GROUP_BUNDLE_TYPE, threshold=0)


# --- attacks ----------------------------------------------------------------------------


def test_tampered_payload(signed: bytes, trusted: Trusted) -> None:
    value = raw(signed)
    value["payload"] = value["payload"][:-1] + b"\x02"
    refused(SignatureError, codec.pack(value), trusted)


def test_tampered_payload_type_verified_as_the_new_type(signed: bytes, trusted: Trusted) -> None:
    value = raw(signed)
    value["payloadType"] = DEVICE_BUNDLE_TYPE
    # The type is inside the PAE, so the signature no longer matches.
    refused(SignatureError, codec.pack(value), trusted, payload_type=DEVICE_BUNDLE_TYPE)


def test_tampered_payload_type_verified_as_the_pinned_type(signed: bytes, trusted: Trusted) -> None:
    value = raw(signed)
    value["payloadType"] = GROUP_BUNDLE_TYPE + " "
    refused(PayloadTypeError, codec.pack(value), trusted)


def test_wrong_payload_type_for_the_topic(signed: bytes, trusted: Trusted) -> None:
    # Validly signed, but a group bundle is not a device bundle nor a command.
    refused(PayloadTypeError, signed, trusted, payload_type=DEVICE_BUNDLE_TYPE)
    refused(PayloadTypeError, signed, trusted, payload_type=COMMAND_TYPE)


@pytest.mark.parametrize("index", [0, 31, 32, 63])
def test_tampered_signature(signed: bytes, trusted: Trusted, index: int) -> None:
    value = raw(signed)
    sig = bytearray(value["signatures"][0]["sig"])
    sig[index] ^= 0x01
    value["signatures"][0]["sig"] = bytes(sig)
    refused(SignatureError, codec.pack(value), trusted)


@pytest.mark.parametrize("length", [0, 1, 63, 65, 128])
def test_signature_of_the_wrong_length(signed: bytes, trusted: Trusted, length: int) -> None:
    value = raw(signed)
    value["signatures"][0]["sig"] = (value["signatures"][0]["sig"] * 3)[:length]
    refused(SignatureError, codec.pack(value), trusted)


def test_truncated_envelope_at_every_length(signed: bytes, trusted: Trusted) -> None:
    for cut in range(len(signed)):
        refused(DecodeError, signed[:cut], trusted)


def test_no_signatures(signed: bytes, trusted: Trusted) -> None:
    value = raw(signed)
    value["signatures"] = []
    refused(SignatureError, codec.pack(value), trusted)


def test_unknown_key_id(stranger: Ed25519PrivateKey, trusted: Trusted) -> None:
    data = envelopes.sign(GROUP_BUNDLE_TYPE, PAYLOAD, [stranger])
    error = refused(SignatureError, data, trusted)
    assert "no signature by a trusted key" in str(error)


def test_right_key_id_but_wrong_key(
    key: Ed25519PrivateKey, stranger: Ed25519PrivateKey, trusted: Trusted
) -> None:
    value = raw(envelopes.sign(GROUP_BUNDLE_TYPE, PAYLOAD, [stranger]))
    value["signatures"][0]["keyid"] = envelopes.key_id(key)
    refused(SignatureError, codec.pack(value), trusted)


def test_no_trusted_keys_at_all(signed: bytes) -> None:
    refused(SignatureError, signed, {})


def test_threshold_two_with_one_key(
    signed: bytes, key: Ed25519PrivateKey, key2: Ed25519PrivateKey
) -> None:
    trusted = envelopes.trusted_keys([key.public_key(), key2.public_key()])
    error = refused(SignatureError, signed, trusted, threshold=2)
    assert "2 needed" in str(error)


def test_same_key_twice_does_not_count_twice(
    key: Ed25519PrivateKey, key2: Ed25519PrivateKey
) -> None:
    trusted = envelopes.trusted_keys([key.public_key(), key2.public_key()])
    data = envelopes.sign(GROUP_BUNDLE_TYPE, PAYLOAD, [key, key])
    assert len(raw(data)["signatures"]) == 2
    refused(SignatureError, data, trusted, threshold=2)


def test_oversized_envelope(key: Ed25519PrivateKey, trusted: Trusted) -> None:
    data = envelopes.sign(GROUP_BUNDLE_TYPE, b"\x00" * 2048, [key])
    assert envelopes.verify(data, trusted, payload_type=GROUP_BUNDLE_TYPE) == b"\x00" * 2048
    refused(PayloadTooLarge, data, trusted, max_size=2048)


def test_oversized_by_the_default_cap(key: Ed25519PrivateKey, trusted: Trusted) -> None:
    big = b"\x00" * envelopes.MAX_ENVELOPE_BYTES
    refused(PayloadTooLarge, envelopes.sign(GROUP_BUNDLE_TYPE, big, [key]), trusted)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\xc1", DecodeError),  # not msgpack
        (b"\x83\xa1a", DecodeError),  # a map cut short
        (b"\x00", SchemaError),  # msgpack, but not a map
        (b"\xa3abc", SchemaError),
        (b"\x93\x01\x02\x03", SchemaError),
    ],
    ids=lambda d: d.hex() if isinstance(d, bytes) else d.__name__,
)
def test_malformed_envelope(data: bytes, error: type[ProtocolError], trusted: Trusted) -> None:
    refused(error, data, trusted)


def test_envelope_with_duplicate_keys(signed: bytes, trusted: Trusted) -> None:
    # A second payloadType after the first: a parser that keeps the last would be fooled.
    body = signed[1:]
    forged = b"\x84" + body + b"\xabpayloadType" + codec.pack(DEVICE_BUNDLE_TYPE)
    refused(DecodeError, forged, trusted)


def test_envelope_with_trailing_bytes(signed: bytes, trusted: Trusted) -> None:
    refused(DecodeError, signed + b"\x00", trusted)


def test_envelope_that_is_not_a_map(trusted: Trusted) -> None:
    refused(SchemaError, codec.pack([GROUP_BUNDLE_TYPE, PAYLOAD, []]), trusted)


@pytest.mark.parametrize(
    "change",
    [
        {"extra": 1},
        {"payload": "text, not bin"},
        {"payloadType": b"bin, not text"},
        {"signatures": {"keyid": "x", "sig": b""}},
        {"signatures": ["not a map"]},
        {"signatures": [{"keyid": "x"}]},
        {"signatures": [{"keyid": "x", "sig": b"", "extra": 1}]},
        {"signatures": [{"keyid": b"x", "sig": b""}]},
        {"signatures": [{"keyid": "x", "sig": "text"}]},
        {"signatures": [{"keyid": "x", "sig": b""}] * (envelopes.MAX_SIGNATURES + 1)},
    ],
    ids=repr,
)
def test_envelope_of_the_wrong_shape(
    signed: bytes, trusted: Trusted, change: dict[str, Any]
) -> None:
    value = raw(signed)
    value.update(change)
    refused(SchemaError, codec.pack(value), trusted)


@pytest.mark.parametrize("missing", ["payloadType", "payload", "signatures"])
def test_envelope_missing_a_field(signed: bytes, trusted: Trusted, missing: str) -> None:
    value = raw(signed)
    del value[missing]
    refused(SchemaError, codec.pack(value), trusted)


def test_signature_over_the_payload_alone_is_not_enough(
    key: Ed25519PrivateKey, trusted: Trusted
) -> None:
    # Without the PAE an attacker could move a signature between payload types.
    value = raw(envelopes.sign(GROUP_BUNDLE_TYPE, PAYLOAD, [key]))
    value["signatures"][0]["sig"] = key.sign(PAYLOAD)
    refused(SignatureError, codec.pack(value), trusted)


def test_verify_envelope_checks_the_type_before_the_signatures(
    signed: bytes, trusted: Trusted
) -> None:
    envelope = envelopes.decode(signed)
    with pytest.raises(PayloadTypeError):
        envelopes.verify_envelope(envelope, {}, payload_type=DEVICE_BUNDLE_TYPE)


def test_verify_signed_names_only_the_keys_whose_signatures_verified() -> None:
    alice, bob, carol = (Ed25519PrivateKey.generate() for _ in range(3))
    trusted = envelopes.trusted_keys([alice.public_key(), bob.public_key(), carol.public_key()])
    envelope = raw(envelopes.sign(GROUP_BUNDLE_TYPE, PAYLOAD, [alice, carol]))
    # A bogus entry with bob's key id in front: present, trusted, but not a valid signature.
    envelope["signatures"].insert(0, {"keyid": envelopes.key_id(bob), "sig": b"\0" * 64})
    verified = envelopes.verify_signed(
        codec.pack(envelope), trusted, payload_type=GROUP_BUNDLE_TYPE
    )
    assert verified.payload == PAYLOAD
    assert verified.keyids == (envelopes.key_id(alice), envelopes.key_id(carol))
    # verify() still returns the bare payload, for callers that only need the bytes.
    assert (
        envelopes.verify(codec.pack(envelope), trusted, payload_type=GROUP_BUNDLE_TYPE) == PAYLOAD
    )
