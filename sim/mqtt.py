"""A lean MQTT 3.1.1 client for load tools: a packet codec and one asyncio protocol.

The simulator needs ten thousand connections in one process; a full client object per
device (paho, aiomqtt) costs far too much memory and CPU for that. This module is the
smallest client that behaves correctly on the wire: CONNECT (clean session, keepalive, a
will, optional user name and password), SUBSCRIBE / UNSUBSCRIBE, PUBLISH at QoS 0 and 1 in
both directions (incoming QoS 1 is acknowledged), PINGREQ and DISCONNECT. No QoS 2, no
MQTT 5, no TLS, no reconnect: what a test tool needs, nothing more.

* The codec (:func:`connect`, :func:`publish`, :func:`subscribe`, ... and :class:`Parser`)
  is pure: bytes in, bytes or packets out. It lives in :mod:`setpoint.mqttwire`, shared
  with the controller's report ingest, and is re-exported here.
* :class:`Connection` is an :class:`asyncio.Protocol` with ``__slots__``: no task per
  connection, callbacks only, so a connection costs a transport and a few small objects.

Not for the shim (it uses paho-mqtt); the controller takes reports in through its own
lean connection on the same codec (``docs/decisions/0005-ingest-path.md``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable

# The codec lives in setpoint.mqttwire (shared with the controller's ingest); re-exported.
from setpoint.mqttwire import (
    CONNACK,
    CONNACK_CODES,
    CONNECT,
    DISCONNECT,
    DISCONNECT_PACKET,
    MAX_REMAINING,
    PINGREQ,
    PINGREQ_PACKET,
    PINGRESP,
    PINGRESP_PACKET,
    PUBACK,
    PUBLISH,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    Packet,
    Parser,
    ProtocolError,
    connect,
    parse_publish,
    puback,
    publish,
    subscribe,
    unsubscribe,
)

__all__ = [
    "CONNACK",
    "CONNACK_CODES",
    "CONNECT",
    "DISCONNECT",
    "DISCONNECT_PACKET",
    "MAX_REMAINING",
    "PINGREQ",
    "PINGREQ_PACKET",
    "PINGRESP",
    "PINGRESP_PACKET",
    "PUBACK",
    "PUBLISH",
    "SUBACK",
    "SUBSCRIBE",
    "UNSUBACK",
    "UNSUBSCRIBE",
    "Connection",
    "Packet",
    "Parser",
    "ProtocolError",
    "connect",
    "open_connection",
    "parse_publish",
    "puback",
    "publish",
    "subscribe",
    "unsubscribe",
]


# --- The asyncio protocol ---------------------------------------------------------------------


class Connection(asyncio.Protocol):
    """One MQTT connection driven by callbacks (no task of its own).

    ``on_message(topic, payload, retain)`` is called for every PUBLISH received (QoS 1 is
    acknowledged first); ``on_ready()`` once the CONNACK accepted the session;
    ``on_lost(error)`` when the connection ends (``None`` after :meth:`disconnect`).
    :meth:`publish` with ``qos=1`` returns a future that completes on the PUBACK, or None
    when ``wait`` is False (the acknowledgement is then only counted).
    """

    __slots__ = (
        "_acks",
        "_connect",
        "_next_id",
        "_parser",
        "_subacks",
        "acked",
        "client_id",
        "connected",
        "on_lost",
        "on_message",
        "on_ready",
        "transport",
    )

    def __init__(
        self,
        client_id: str,
        connect_packet: bytes,
        *,
        on_message: Callable[[str, bytes, bool], None] | None = None,
        on_ready: Callable[[], None] | None = None,
        on_lost: Callable[[Exception | None], None] | None = None,
    ) -> None:
        self.client_id = client_id
        self._connect = connect_packet
        self.on_message = on_message
        self.on_ready = on_ready
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._parser = Parser()
        self._next_id = 0
        self._acks: dict[int, asyncio.Future[None]] | None = None
        self._subacks: dict[int, asyncio.Future[bytes]] | None = None
        self.connected = False
        self.acked = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self._connect)

    def data_received(self, data: bytes) -> None:
        try:
            packets = self._parser.feed(data)
            for kind, flags, body in packets:
                if kind == PUBLISH:
                    topic, payload, qos, retain, packet_id = parse_publish(flags, body)
                    if qos and self.transport is not None:
                        self.transport.write(puback(packet_id))
                    if self.on_message is not None:
                        self.on_message(topic, payload, retain)
                elif kind == PUBACK:
                    self._acked((body[0] << 8) | body[1])
                elif kind == CONNACK:
                    code = body[1] if len(body) >= 2 else 255
                    if code != 0:
                        raise ProtocolError(
                            f"broker refused the connection: {CONNACK_CODES.get(code, code)}"
                        )
                    self.connected = True
                    if self.on_ready is not None:
                        self.on_ready()
                elif kind in (SUBACK, UNSUBACK):
                    self._subacked((body[0] << 8) | body[1], body[2:])
                elif kind == PINGRESP:
                    pass
                else:
                    raise ProtocolError(f"unexpected packet type {kind} from the broker")
        except ProtocolError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connected = False
        self.transport = None
        error = exc
        for waiting in (self._acks, self._subacks):
            for future in (waiting or {}).values():
                if not future.done():
                    future.set_exception(ConnectionError(f"{self.client_id}: connection lost"))
        self._acks = self._subacks = None
        if self.on_lost is not None:
            self.on_lost(error)

    # Sending
    def _packet_id(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    def _acked(self, packet_id: int) -> None:
        self.acked += 1
        if self._acks is not None:
            future = self._acks.pop(packet_id, None)
            if future is not None and not future.done():
                future.set_result(None)

    def _subacked(self, packet_id: int, codes: bytes) -> None:
        if self._subacks is not None:
            future = self._subacks.pop(packet_id, None)
            if future is not None and not future.done():
                future.set_result(codes)

    def write(self, data: bytes) -> bool:
        """Send raw bytes; False if the connection is gone."""
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, wait: bool = False
    ) -> asyncio.Future[None] | None:
        packet_id = self._packet_id() if qos else 0
        future: asyncio.Future[None] | None = None
        if qos and wait:
            future = asyncio.get_running_loop().create_future()
            if self._acks is None:
                self._acks = {}
            self._acks[packet_id] = future
        sent = self.write(publish(topic, payload, qos=qos, retain=retain, packet_id=packet_id))
        if not sent and future is not None:
            self._acks.pop(packet_id, None)  # type: ignore[union-attr]
            future.set_exception(ConnectionError(f"{self.client_id}: not connected"))
        return future

    def subscribe(self, filters: Iterable[tuple[str, int]]) -> asyncio.Future[bytes]:
        """Subscribe; the future gives the SUBACK's return codes (0x80 = refused)."""
        return self._request(lambda pid: subscribe(pid, filters))

    def unsubscribe(self, filters: Iterable[str]) -> asyncio.Future[bytes]:
        return self._request(lambda pid: unsubscribe(pid, filters))

    def _request(self, build: Callable[[int], bytes]) -> asyncio.Future[bytes]:
        packet_id = self._packet_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if self._subacks is None:
            self._subacks = {}
        self._subacks[packet_id] = future
        if not self.write(build(packet_id)):
            self._subacks.pop(packet_id, None)
            future.set_exception(ConnectionError(f"{self.client_id}: not connected"))
        return future

    def ping(self) -> bool:
        return self.write(PINGREQ_PACKET)

    def disconnect(self) -> None:
        """A clean DISCONNECT: the broker discards the will."""
        if self.write(DISCONNECT_PACKET) and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker publishes the will."""
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.on_lost is not None:
            callback, self.on_lost = self.on_lost, None
            callback(exc)


async def open_connection(
    host: str,
    port: int,
    client_id: str,
    *,
    keepalive: int = 60,
    clean: bool = True,
    will: tuple[str, bytes, int, bool] | None = None,
    username: str | None = None,
    password: str | None = None,
    on_message: Callable[[str, bytes, bool], None] | None = None,
    on_lost: Callable[[Exception | None], None] | None = None,
    timeout: float = 10.0,
) -> Connection:
    """Connect and wait for the CONNACK (raise on refusal or timeout)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def lost(exc: Exception | None) -> None:
        if not ready.done():
            ready.set_exception(exc or ConnectionError(f"{client_id}: connection closed"))
        if on_lost is not None:
            on_lost(exc)

    packet = connect(
        client_id, keepalive=keepalive, clean=clean, will=will, username=username, password=password
    )
    conn = Connection(
        client_id,
        packet,
        on_message=on_message,
        on_ready=lambda: ready.done() or ready.set_result(None),
        on_lost=lost,
    )
    await loop.create_connection(lambda: conn, host, port)
    async with asyncio.timeout(timeout):
        await ready
    return conn
