"""Bounded encoding and decoding of msgpack (device side) and JSON (operator side).

Decoding untrusted bytes is bounded before and during the work: the size cap is checked
before a byte is parsed; msgpack's own length limits stop huge containers; duplicate map
keys, non-string keys, extension types, trailing bytes and nesting deeper than
``MAX_DEPTH`` are refused. Every failure is a :class:`~setpoint.proto.errors.DecodeError`.

Encoding is canonical (maps sorted by key, bin for bytes), so the same value always gives
the same bytes and digests are stable.

Pure; no I/O.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any, Final

import msgpack

from .errors import DecodeError, PayloadTooLarge

MAX_DEPTH: Final = 32
MAX_CONTAINER_LEN: Final = 100_000

# Values a decoded message may contain.
Value = None | bool | int | float | str | bytes | list[Any] | dict[str, Any]


def _pairs_to_dict(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise DecodeError(f"map key {key!r} is not a string")
        if key in result:
            raise DecodeError(f"duplicate map key {key!r}")
        result[key] = value
    return result


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not allowed")


def _check_depth(value: Any) -> None:
    """Refuse containers nested deeper than MAX_DEPTH and any non-protocol type."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        elif item is None or isinstance(item, bool | int | str | bytes):
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise DecodeError("non-finite float")
            continue
        else:
            raise DecodeError(f"value of type {type(item).__name__} is not allowed")
        if depth > MAX_DEPTH:
            raise DecodeError(f"nesting deeper than {MAX_DEPTH}")
        stack.extend((child, depth + 1) for child in children)


def unpack(data: bytes, *, max_size: int) -> Any:
    """Decode exactly one msgpack value from ``data`` within the limits."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise PayloadTooLarge(f"{len(data)} bytes is over the {max_size}-byte limit")
    if len(data) == 0:
        raise DecodeError("empty message")
    try:
        value = msgpack.unpackb(
            bytes(data),
            raw=False,
            use_list=True,
            strict_map_key=False,  # checked in _pairs_to_dict, with a clearer message
            object_pairs_hook=_pairs_to_dict,
            ext_hook=_refuse_ext,
            timestamp=0,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=min(max_size, MAX_CONTAINER_LEN),
            max_map_len=min(max_size, MAX_CONTAINER_LEN),
            max_ext_len=0,
        )
    except DecodeError:
        raise
    except msgpack.ExtraData as exc:
        raise DecodeError("trailing bytes after the message") from exc
    except (msgpack.StackError, RecursionError) as exc:
        raise DecodeError(f"nesting deeper than {MAX_DEPTH}") from exc
    except (ValueError, TypeError, msgpack.FormatError, UnicodeDecodeError) as exc:
        raise DecodeError(f"malformed msgpack: {exc or type(exc).__name__}") from exc
    except Exception as exc:  # msgpack raises a few odd types on hostile input
        raise DecodeError(f"malformed msgpack: {exc!r}") from exc
    _check_depth(value)
    return value


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def pack(value: Any) -> bytes:
    """Encode ``value`` as canonical msgpack (sorted map keys, bin type for bytes)."""
    packed: bytes = msgpack.packb(_canonical(value), use_bin_type=True)
    return packed


def digest(value: Any) -> str:
    """Hex SHA-256 of the canonical msgpack encoding of ``value``."""
    return hashlib.sha256(pack(value)).hexdigest()


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DecodeError(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise DecodeError(f"JSON constant {name} is not allowed")


def dumps_json(value: Any) -> bytes:
    """Encode ``value`` as compact UTF-8 JSON with sorted keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def loads_json(data: bytes, *, max_size: int) -> Any:
    """Decode one JSON value from ``data`` within the size cap and depth limit."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise PayloadTooLarge(f"{len(data)} bytes is over the {max_size}-byte limit")
    try:
        value = json.loads(
            bytes(data).decode("utf-8"),
            object_pairs_hook=_json_pairs,
            parse_constant=_refuse_constant,
        )
    except DecodeError:
        raise
    except RecursionError as exc:
        raise DecodeError(f"nesting deeper than {MAX_DEPTH}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"malformed JSON: {exc}") from exc
    _check_depth(value)
    return value
