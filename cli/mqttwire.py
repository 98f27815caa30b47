"""The MQTT 3.1.1 packet codec: bytes in, packets out, and the packets a client sends.

Pure (no I/O, no asyncio), shared by the two lean MQTT clients of the tree: the
simulator's (:mod:`setpoint.sim.mqtt`, ten thousand devices in one process) and the
controller's report ingest (:mod:`setpoint.controller.ingesting`). Only what a client of
QoS 0 and 1 needs: CONNECT (clean session, keepalive, a will, user name and password),
SUBSCRIBE / UNSUBSCRIBE, PUBLISH and PUBACK, PINGREQ and DISCONNECT; :class:`Parser`
splits a stream into ``(type, flags, body)`` and :func:`parse_publish` reads a PUBLISH.
No MQTT 5, no QoS 2. See ``docs/decisions/0005-ingest-path.md``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBSCRIBE: Final = 10
UNSUBACK: Final = 11
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14

PINGREQ_PACKET: Final = b"\xc0\x00"
PINGRESP_PACKET: Final = b"\xd0\x00"
DISCONNECT_PACKET: Final = b"\xe0\x00"
MAX_REMAINING: Final = 268_435_455  # the largest remaining length MQTT can express

CONNACK_CODES: Final = {
    0: "accepted",
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


class ProtocolError(Exception):
    """The peer sent bytes that are not MQTT 3.1.1 (or this client does not speak them)."""


# --- Encoding ---------------------------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    if n > MAX_REMAINING:
        raise ValueError(f"MQTT packet too large: {n} bytes (at most {MAX_REMAINING})")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _str(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) > 0xFFFF:
        raise ValueError(f"MQTT string too long: {len(data)} bytes (at most 65535)")
    return struct.pack("!H", len(data)) + data


def connect(
    client_id: str,
    *,
    keepalive: int = 60,
    clean: bool = True,
    will: tuple[str, bytes, int, bool] | None = None,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """A CONNECT packet; ``will`` is ``(topic, payload, qos, retain)``."""
    if not 0 <= keepalive <= 0xFFFF:
        raise ValueError(f"keepalive must be 0-65535 seconds, got {keepalive}")
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _str(topic) + _str(message)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
        if password is not None:
            flags |= 0x40
            payload += _str(password)
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + struct.pack("!H", keepalive) + payload
    return b"\x10" + _length(len(body)) + body


def publish(
    topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, packet_id: int = 0
) -> bytes:
    """A PUBLISH packet (QoS 0 or 1; QoS 1 needs a ``packet_id`` of 1-65535)."""
    if qos not in (0, 1):
        raise ValueError(f"this client publishes at QoS 0 or 1, not {qos}")
    head = _str(topic)
    if qos:
        if not 0 < packet_id <= 0xFFFF:
            raise ValueError(f"QoS 1 needs a packet id of 1-65535, got {packet_id}")
        head += struct.pack("!H", packet_id)
    first = 0x30 | (qos << 1) | (1 if retain else 0)
    return bytes((first,)) + _length(len(head) + len(payload)) + head + payload


def subscribe(packet_id: int, filters: Iterable[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id)
    for topic_filter, qos in filters:
        body += _str(topic_filter) + bytes((qos,))
    return b"\x82" + _length(len(body)) + body


def unsubscribe(packet_id: int, filters: Iterable[str]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_str(f) for f in filters)
    return b"\xa2" + _length(len(body)) + body


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", packet_id)


# --- Decoding ---------------------------------------------------------------------------------


Packet = tuple[int, int, bytes]  # (type, flags, body)


class Parser:
    """Splits a byte stream into ``(type, flags, body)`` packets.

    ``feed`` returns the complete packets in order and keeps a partial one for the next
    call; a stream that cannot be MQTT raises :class:`ProtocolError`.
    """

    __slots__ = ("_buf", "max_packet")

    def __init__(self, max_packet: int = 4 * 1024 * 1024) -> None:
        self._buf = b""
        self.max_packet = max_packet

    def feed(self, data: bytes, limit: int | None = None) -> list[Packet]:
        """The complete packets in ``data`` (after what was kept), at most ``limit`` of them.

        What is not returned (a partial packet, or packets beyond ``limit``) is kept for the
        next call; ``feed(b"", n)`` takes more of it out.
        """
        buf = self._buf + data if self._buf else data
        packets: list[Packet] = []
        pos, end = 0, len(buf)
        room = -1 if limit is None else limit
        while end - pos >= 2 and room != 0:
            first = buf[pos]
            # Remaining length: 1 to 4 bytes, 7 bits each.
            length = buf[pos + 1]
            i = pos + 2
            if length & 0x80:
                length &= 0x7F
                shift = 7
                while True:
                    if i >= end:
                        self._buf = buf[pos:]
                        return packets
                    byte = buf[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise ProtocolError("remaining length longer than 4 bytes")
            if length > self.max_packet:
                raise ProtocolError(f"packet of {length} bytes exceeds {self.max_packet}")
            if i + length > end:
                break
            packets.append((first >> 4, first & 0x0F, buf[i : i + length]))
            pos = i + length
            room -= 1
        self._buf = buf[pos:] if pos < end else b""
        return packets

    @property
    def buffered(self) -> int:
        """Bytes kept for the next :meth:`feed`."""
        return len(self._buf)


def parse_publish(flags: int, body: bytes) -> tuple[str, bytes, int, bool, int]:
    """``(topic, payload, qos, retain, packet_id)`` of a PUBLISH body."""
    if len(body) < 2:
        raise ProtocolError("PUBLISH shorter than its topic length")
    n = (body[0] << 8) | body[1]
    qos = (flags >> 1) & 3
    start = 2 + n
    if qos:
        if qos > 1:
            raise ProtocolError("QoS 2 is not supported by this client")
        if len(body) < start + 2:
            raise ProtocolError("PUBLISH shorter than its packet id")
        packet_id = (body[start] << 8) | body[start + 1]
        payload = body[start + 2 :]
    else:
        if len(body) < start:
            raise ProtocolError("PUBLISH shorter than its topic")
        packet_id = 0
        payload = body[start:]
    try:
        topic = body[2:start].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("PUBLISH topic is not UTF-8") from exc
    return topic, payload, qos, bool(flags & 1), packet_id
