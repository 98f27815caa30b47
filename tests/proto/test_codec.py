"""Bounded msgpack and JSON: canonical packing, and one typed refusal per kind of bad input."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgpack
import pytest

from setpoint.proto import DecodeError, PayloadTooLarge, ProtocolError, codec
from setpoint.proto.codec import MAX_DEPTH


def refused(cls: type[ProtocolError], data: Any, *, max_size: int = 1024) -> ProtocolError:
    """Unpack ``data`` and return the error, asserting its class is exactly ``cls``."""
    with pytest.raises(ProtocolError) as info:
        codec.unpack(data, max_size=max_size)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    return info.value


def refused_json(cls: type[ProtocolError], data: Any, *, max_size: int = 1024) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.loads_json(data, max_size=max_size)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    return info.value


def nested(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = [value]
    return value


# --- canonical packing ----------------------------------------------------------------


def test_pack_is_canonical_exact_bytes() -> None:
    packed = codec.pack({"b": [1, "x"], "a": b"\x00"})
    # fixmap(2) "a" bin8(1) 00 "b" fixarray(2) 1 "x": keys sorted, bytes as bin, not str.
    assert packed == bytes.fromhex("82a161c40100a1629201a178")


def test_pack_does_not_depend_on_insertion_order() -> None:
    one = {"z": 1, "a": {"y": 2, "b": 3}, "m": [{"k": 1, "c": 2}]}
    two = {"m": [{"c": 2, "k": 1}], "a": {"b": 3, "y": 2}, "z": 1}
    assert codec.pack(one) == codec.pack(two)
    assert codec.digest(one) == codec.digest(two)


def test_tuples_pack_as_arrays() -> None:
    assert codec.pack((1, 2)) == codec.pack([1, 2]) == b"\x92\x01\x02"


def test_integers_use_the_smallest_encoding() -> None:
    assert codec.pack(0) == b"\x00"
    assert codec.pack(127) == b"\x7f"
    assert codec.pack(128) == b"\xcc\x80"
    assert codec.pack(65536) == b"\xce\x00\x01\x00\x00"
    assert codec.pack(-1) == b"\xff"
    assert codec.pack(-33) == b"\xd0\xdf"
    assert codec.pack(1.5) == b"\xcb" + bytes.fromhex("3ff8000000000000")


def test_digest_is_sha256_of_the_canonical_bytes() -> None:
    value = {"b": [1, "x"], "a": b"\x00"}
    assert codec.digest(value) == hashlib.sha256(codec.pack(value)).hexdigest()
    assert (
        codec.digest(value) == hashlib.sha256(bytes.fromhex("82a161c40100a1629201a178")).hexdigest()
    )


def test_round_trip_of_every_allowed_type() -> None:
    value = {
        "nil": None,
        "t": True,
        "f": False,
        "int": -(2**63),
        "uint": 2**64 - 1,
        "float": 0.25,
        "str": "héllo",
        "bin": b"\x00\xff",
        "list": [1, [2, [3]]],
        "map": {"k": {"k": "v"}},
    }
    assert codec.unpack(codec.pack(value), max_size=1024) == value


# --- bounded msgpack decoding ---------------------------------------------------------


def test_size_cap_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("msgpack was asked to decode an oversized message")

    monkeypatch.setattr(msgpack, "unpackb", must_not_run)
    refused(PayloadTooLarge, b"\xc1" * 1025)  # garbage: no decoder may have looked at it


def test_exactly_the_cap_is_allowed() -> None:
    data = codec.pack("x" * 100)
    assert codec.unpack(data, max_size=len(data)) == "x" * 100
    refused(PayloadTooLarge, data, max_size=len(data) - 1)


def test_payload_too_large_is_a_decode_error() -> None:
    assert issubclass(PayloadTooLarge, DecodeError)


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # the never-used type byte
        b"\x92\x01",  # array of 2 with 1 element
        b"\xa5abc",  # truncated str
        b"\xc4\x05ab",  # truncated bin
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion elements
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 billion pairs
        b"\xdb\xff\xff\xff\xff",  # str32 longer than the cap
        b"\xa2\xff\xfe",  # str that is not UTF-8
        b"\x81\xa1a",  # map without its value
    ],
    ids=lambda d: d.hex(),
)
def test_malformed_msgpack(data: bytes) -> None:
    refused(DecodeError, data)


def test_empty_message() -> None:
    refused(DecodeError, b"")


@pytest.mark.parametrize("data", ["text", None, 5, ["list"]], ids=repr)
def test_not_bytes(data: object) -> None:
    refused(DecodeError, data)


def test_bytearray_and_memoryview_are_accepted() -> None:
    data = codec.pack({"a": 1})
    assert codec.unpack(bytearray(data), max_size=64) == {"a": 1}
    assert codec.unpack(memoryview(data), max_size=64) == {"a": 1}


def test_duplicate_map_keys() -> None:
    error = refused(DecodeError, b"\x82\xa1a\x01\xa1a\x02")
    assert "duplicate" in str(error)


def test_duplicate_keys_in_a_nested_map() -> None:
    refused(DecodeError, b"\x81\xa1m\x82\xa1k\x01\xa1k\x01")


@pytest.mark.parametrize(
    "data",
    [
        b"\x81\x01\x01",  # int key
        b"\x81\xc4\x01a\x01",  # bin key
        b"\x81\xc0\x01",  # nil key
        b"\x81\xc3\x01",  # bool key
        b"\x81\x91\x01\x01",  # array key
        b"\x81\x81\xa1a\x01\x01",  # map key
    ],
    ids=lambda d: d.hex(),
)
def test_non_string_keys(data: bytes) -> None:
    error = refused(DecodeError, data)
    assert "not a string" in str(error)


@pytest.mark.parametrize("extra", [b"\x00", b"\xc0", b"\x81\xa1a\x01", b"\xc1"])
def test_trailing_bytes(extra: bytes) -> None:
    refused(DecodeError, codec.pack({"a": 1}) + extra)


def test_depth_at_the_limit_is_allowed() -> None:
    value = nested(MAX_DEPTH)
    assert codec.unpack(codec.pack(value), max_size=1024) == value


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100, 2000, 100_000])
def test_depth_over_the_limit(depth: int) -> None:
    data = b"\x91" * depth + b"\xc0"
    refused(DecodeError, data, max_size=len(data))


def test_deep_maps_count_too() -> None:
    data = b"\x81\xa1k" * (MAX_DEPTH + 1) + b"\xc0"
    refused(DecodeError, data)


@pytest.mark.parametrize(
    "data",
    [
        b"\xd4\x01\x00",  # fixext1
        b"\xd5\x02\x00\x00",  # fixext2
        b"\xc7\x00\x05",  # ext8 of length 0
        b"\xc7\x03\x05abc",  # ext8
        b"\xd6\xff\x00\x00\x00\x01",  # the timestamp extension (-1)
        b"\xd7\xff" + b"\x00" * 8,  # timestamp 64
    ],
    ids=lambda d: d.hex(),
)
def test_extension_types(data: bytes) -> None:
    refused(DecodeError, data)


@pytest.mark.parametrize(
    "data",
    [
        b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # float64 NaN
        b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # float64 +inf
        b"\xcb\xff\xf0\x00\x00\x00\x00\x00\x00",  # float64 -inf
        b"\xca\x7f\x80\x00\x00",  # float32 +inf
        b"\xca\x7f\xc0\x00\x00",  # float32 NaN
        b"\x81\xa1v\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN inside a map
    ],
    ids=lambda d: d.hex(),
)
def test_non_finite_floats(data: bytes) -> None:
    refused(DecodeError, data)


def test_container_length_limit_is_applied() -> None:
    data = b"\xdc\x00\x05" + b"\x00" * 5
    assert codec.unpack(data, max_size=64) == [0] * 5
    # A claimed length beyond the message's own size cannot be honoured: refused up front.
    refused(DecodeError, b"\xdc\x01\x00" + b"\x00" * 10, max_size=64)


# --- JSON (operators' side) -------------------------------------------------------------


def test_dumps_json_is_compact_and_sorted() -> None:
    assert codec.dumps_json({"b": 1, "a": [True, None]}) == b'{"a":[true,null],"b":1}'


def test_dumps_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        codec.dumps_json({"a": float("nan")})


def test_json_round_trip() -> None:
    value = {"a": [1, 2.5, "é", None, True], "b": {"c": {}}}
    assert codec.loads_json(codec.dumps_json(value), max_size=1024) == value


def test_json_duplicate_keys() -> None:
    error = refused_json(DecodeError, b'{"a": 1, "a": 2}')
    assert "duplicate" in str(error)


@pytest.mark.parametrize("text", [b"NaN", b"[Infinity]", b'{"a": -Infinity}', b"1e999", b"-1e400"])
def test_json_non_finite(text: bytes) -> None:
    refused_json(DecodeError, text)


@pytest.mark.parametrize(
    "text", [b"", b"{", b"\xff", b'{"a": 1} x', b"[1,]", b"'a'", b"1" * 5000], ids=repr
)
def test_json_malformed(text: bytes) -> None:
    refused_json(DecodeError, text, max_size=10_000)


def test_json_depth() -> None:
    ok = json.dumps(nested(MAX_DEPTH)).encode()
    assert codec.loads_json(ok, max_size=1024) == nested(MAX_DEPTH)
    refused_json(DecodeError, json.dumps(nested(MAX_DEPTH + 1)).encode())
    deep = b"[" * 200_000 + b"]" * 200_000
    refused_json(DecodeError, deep, max_size=len(deep))


def test_json_size_cap() -> None:
    refused_json(PayloadTooLarge, b"[" + b"1," * 600 + b"1]")


def test_json_not_bytes() -> None:
    refused_json(DecodeError, '{"a": 1}')
