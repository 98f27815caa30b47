"""The sealed value on the wire: its shape, its key ids, and its place in a bundle."""

from __future__ import annotations

import hashlib

import pytest

from setpoint.proto import bundles, codec, sealed
from setpoint.proto.bundles import Bundle, FileResource, SettingResource
from setpoint.proto.errors import SchemaError
from setpoint.proto.sealed import Sealed

RECIPIENT = "age1" + "q" * 58
KEYID = hashlib.sha256(RECIPIENT.encode()).hexdigest()
ARMOR = (
    "-----BEGIN AGE ENCRYPTED FILE-----\n"
    "YWdlLWVuY3J5cHRpb24ub3JnL3YxCi0+IFgyNTUxOSB6NTFScUZXajV2UVozVGdD\n"
    "-----END AGE ENCRYPTED FILE-----\n"
)
VALUE = Sealed(ARMOR, (KEYID,))


def test_key_id_is_the_sha256_of_the_recipient_text() -> None:
    assert sealed.recipient_keyid(RECIPIENT) == KEYID
    assert sealed.keyids([RECIPIENT, RECIPIENT]) == (KEYID,)


@pytest.mark.parametrize(
    "bad", ["age1short", "AGE1" + "q" * 58, "age1" + "b" * 58, "ssh-ed25519 AAAA", 5, None]
)
def test_recipient_syntax_is_checked(bad: object) -> None:
    with pytest.raises(SchemaError, match="is not an age X25519 recipient"):
        sealed.check_recipient(bad, "devices/a.yaml: recipient")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("text", "must be a map"),
        ({"age": ARMOR}, "must be a list of key ids"),
        ({"age": ARMOR, "recipients": ["nothex"]}, "not a key id"),
        ({"age": ARMOR, "recipients": [], "to": 1}, "unknown field"),
        ({"age": "hunter2", "recipients": []}, "must start with"),
        ({"age": ARMOR.replace("YWdl", "Y!dl"), "recipients": []}, "not Base64 armour"),
        ({"age": b"bytes", "recipients": []}, "ASCII-armoured"),
    ],
)
def test_malformed_sealed_values_are_refused(raw: object, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        sealed.from_map(raw, "resource 'token'")


def group(*resources: bundles.Resource) -> Bundle:
    return Bundle("group", "kiosk", 1, "c0ffee", 1, 2, resources)


def test_sealed_resources_round_trip_without_content_or_value() -> None:
    file = FileResource("token", "etc/token", b"", 0o600, VALUE)
    setting = SettingResource("api", "api_token", None, True, VALUE)
    raw = codec.unpack(bundles.encode(group(file, setting)), max_size=1 << 20)
    assert raw["resources"][0] == {
        "id": "token", "kind": "file", "path": "etc/token", "mode": 0o600,
        "sealed": {"age": ARMOR, "recipients": [KEYID]},
    }  # fmt: skip
    assert "value" not in raw["resources"][1] and raw["resources"][1]["secret"] is True
    assert bundles.decode(bundles.encode(group(file, setting))).resources == (file, setting)


def test_a_resource_with_plaintext_and_sealed_is_refused() -> None:
    data = bundles.encode(group(FileResource("t", "etc/t", b"", 0o600, VALUE)))
    raw = codec.unpack(data, max_size=1 << 20)
    raw["resources"][0]["content"] = b"plaintext"
    with pytest.raises(SchemaError, match="'content' or 'sealed', not both"):
        bundles.decode(codec.pack(raw))


def test_the_digest_of_a_sealed_resource_comes_from_the_ciphertext_only() -> None:
    one = FileResource("t", "etc/t", b"", 0o600, VALUE)
    other = FileResource("t", "etc/t", b"", 0o600, Sealed(ARMOR.replace("YWdl", "ZWdl"), ()))
    assert bundles.resource_digest(one) != bundles.resource_digest(other)
    assert bundles.resource_digest(one) == codec.digest({"sealed": VALUE.digest(), "mode": 0o600})
    assert VALUE.digest() == hashlib.sha256(ARMOR.encode()).hexdigest()


def test_vars_are_never_substituted_into_a_sealed_resource() -> None:
    file = FileResource("t", "etc/t", b"", 0o600, VALUE)
    assert bundles.render(file, {"x": "y"}) is file
