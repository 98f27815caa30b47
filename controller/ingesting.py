"""The controller's report ingest: a lean MQTT 3.1.1 receive connection, with backpressure.

Devices' reports and presence are most of what the controller receives, and they come
in floods (a fleet applying a commit, a restart replaying every retained report). The
controller's main connection (aiomqtt, MQTT 5: :mod:`.broker`) costs far more per message
than the broker does to send it, so :class:`~.broker.Link` takes the routes marked
``bulk`` in through this second connection instead (``docs/decisions/0005-ingest-path.md``):

* **Receive only.** CONNECT with a clean session (user name, password and TLS as the
  link's :class:`~.broker.BrokerSettings`), one SUBSCRIBE, PUBLISH at QoS 0 and 1 in
  (QoS 1 acknowledged, the PUBACKs of one read written at once), PINGREQ every half
  keepalive. The codec is :mod:`setpoint.mqttwire`. No objects per message beyond the
  :class:`~.broker.Message` handed to the handler.
* **Routing by the topic's last level.** A dict from the last level of each filter
  (``reported``, ``presence``, ``barrier``) to its handler; a filter is matched level by
  level only when two filters end alike.
* **Backpressure.** Messages wait in a bounded queue for the task that hands them to the
  handlers (yielding to the event loop between batches, so the drift engine and its
  publications run). When ``max_waiting`` messages wait, the connection stops parsing and
  pauses reading (``transport.pause_reading()``): the kernel's socket buffer and the
  broker hold the backlog, not the controller's heap. It reads again once the queue is
  down to ``low_water``. :attr:`IngestStats.high_water` is the most that ever waited.
* **Barrier.** :meth:`IngestConnection.barrier` publishes a nonce to this connection's
  private topic and waits until the handler loop reaches it: every message the broker
  sent before has then been handled.

The connection does not reconnect by itself: the link opens one per session and ends the
session (both connections, then its backoff) when this one is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from setpoint import mqttwire
from setpoint.mqttwire import PUBLISH

from .errors import BrokerUnavailable

log = logging.getLogger(__name__)

MAX_WAITING: Final = 4096  # messages parsed and not yet handled, at most
BATCH: Final = 256  # messages handled between two yields to the event loop

Handler = Callable[[str, bytes, bool], None]  # (topic, payload, retain)


@dataclass(slots=True)
class IngestStats:
    """What the ingest connections did (kept across sessions)."""

    received: int = 0
    pauses: int = 0  # times reading was paused because the queue was full
    high_water: int = 0  # the most messages that ever waited at once


def split_filter(topic_filter: str) -> tuple[str, str]:
    """``(share-free filter, last level)`` of a bulk route's filter.

    ``$share/<name>/<filter>`` delivers topics of ``<filter>``; the last level must be a
    literal (a bulk route is dispatched on it), so ``#`` and ``+`` there are refused.
    """
    plain = topic_filter
    if plain.startswith("$share/"):
        parts = plain.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            raise ValueError(f"malformed shared subscription {topic_filter!r}")
        plain = parts[2]
    last = plain.rpartition("/")[2]
    if last in ("", "+", "#") or "+" in last or "#" in last:
        raise ValueError(f"a bulk route's filter must end in a literal level, not {topic_filter!r}")
    return plain, last


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest); pure."""
    want, have = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


class Routes:
    """Handlers by the last level of their filter (see the module docstring)."""

    def __init__(self) -> None:
        self._by_last: dict[str, list[tuple[str, Handler]]] = {}

    def add(self, topic_filter: str, handler: Handler) -> None:
        plain, last = split_filter(topic_filter)
        self._by_last.setdefault(last, []).append((plain, handler))

    def dispatch(self, topic: str, payload: bytes, retain: bool) -> None:
        routes = self._by_last.get(topic[topic.rfind("/") + 1 :])
        if routes is None:
            return
        if len(routes) == 1:
            routes[0][1](topic, payload, retain)
            return
        for plain, handler in routes:
            if matches(plain, topic):
                handler(topic, payload, retain)


class IngestProtocol(asyncio.Protocol):
    """One receive connection: parse, queue (bounded), acknowledge; no task of its own."""

    def __init__(
        self,
        connect_packet: bytes,
        stats: IngestStats,
        *,
        max_waiting: int = MAX_WAITING,
        low_water: int | None = None,
    ) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be at least 1, got {max_waiting}")
        self._connect = connect_packet
        self.stats = stats
        self.max_waiting = max_waiting
        self.low_water = max_waiting // 4 if low_water is None else low_water
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[tuple[str, bytes, bool]] = collections.deque()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.arrived = asyncio.Event()  # something was queued
        self.paused = False
        self.last_heard = time.monotonic()
        self._parser = mqttwire.Parser()
        self._subacks: dict[int, asyncio.Future[bytes]] = {}
        self._next_id = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self._connect)

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        try:
            self._take(data)
        except mqttwire.ProtocolError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        error = BrokerUnavailable(f"ingest connection lost: {exc or 'closed'}")
        for future in (self.ready, *self._subacks.values()):
            if not future.done():
                future.set_exception(error)
        self._subacks.clear()
        if not self.lost.done():
            self.lost.set_result(None)
        self.arrived.set()  # wake the handler loop: it sees the loss

    # Reading
    def _take(self, data: bytes) -> None:
        waiting = self.waiting
        room = self.max_waiting - len(waiting)
        packets = self._parser.feed(data, room)
        acks: list[bytes] = []
        queued = 0
        for kind, flags, body in packets:
            if kind == PUBLISH:
                topic, payload, qos, retain, packet_id = mqttwire.parse_publish(flags, body)
                if qos:
                    acks.append(mqttwire.puback(packet_id))
                waiting.append((topic, payload, retain))
                queued += 1
            else:
                self._control(kind, body)
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))
        if queued:
            self.stats.received += queued
            if len(waiting) > self.stats.high_water:
                self.stats.high_water = len(waiting)
            self.arrived.set()
        if len(waiting) >= self.max_waiting and not self.paused:
            self._pause()

    def _control(self, kind: int, body: bytes) -> None:
        if kind == mqttwire.CONNACK:
            code = body[1] if len(body) >= 2 else 255
            if code != 0:
                reason = mqttwire.CONNACK_CODES.get(code, str(code))
                raise mqttwire.ProtocolError(f"the broker refused the connection: {reason}")
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == mqttwire.SUBACK:
            future = self._subacks.pop((body[0] << 8) | body[1], None)
            if future is not None and not future.done():
                future.set_result(body[2:])
        elif kind in (mqttwire.PINGRESP, mqttwire.PUBACK):
            pass  # liveness only (last_heard); our PUBLISHes are QoS 0
        else:
            raise mqttwire.ProtocolError(f"unexpected packet type {kind} from the broker")

    def _pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
        self.paused = True
        self.stats.pauses += 1

    def taken(self) -> None:
        """The handler loop emptied the queue down to ``low_water``: parse what was kept,
        and read again once nothing is kept."""
        if not self.paused or len(self.waiting) > self.low_water:
            return
        try:
            self._take(b"")
        except mqttwire.ProtocolError as exc:
            self._fail(exc)
            return
        if len(self.waiting) < self.max_waiting:  # what the parser still keeps is partial
            self.paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    # Sending
    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise BrokerUnavailable("ingest connection lost")
        self.transport.write(data)

    def subscribe(self, filters: Iterable[tuple[str, int]]) -> asyncio.Future[bytes]:
        self._next_id = self._next_id % 0xFFFF + 1
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._subacks[self._next_id] = future
        self.write(mqttwire.subscribe(self._next_id, filters))
        return future

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(mqttwire.DISCONNECT_PACKET)
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        log.warning("ingest connection: %s", exc)
        if not self.ready.done():
            self.ready.set_exception(BrokerUnavailable(str(exc)))
        if self.transport is not None:
            self.transport.abort()


class IngestConnection:
    """One session's receive connection: open, serve (hand messages over), barrier, close."""

    def __init__(
        self,
        protocol: IngestProtocol,
        routes: Routes,
        barrier_topic: str,
        *,
        keepalive: int,
    ) -> None:
        self.protocol = protocol
        self.routes = routes
        self.barrier_topic = barrier_topic
        self.keepalive = keepalive
        self._barriers: dict[bytes, asyncio.Future[None]] = {}

    @classmethod
    async def open(
        cls,
        *,
        host: str,
        port: int,
        client_id: str,
        routes: Routes,
        filters: list[tuple[str, int]],
        barrier_topic: str,
        stats: IngestStats,
        keepalive: int = 30,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        max_waiting: int = MAX_WAITING,
        low_water: int | None = None,
    ) -> IngestConnection:
        """Connect, subscribe to ``filters`` and this connection's barrier topic."""
        loop = asyncio.get_running_loop()
        packet = mqttwire.connect(
            client_id, keepalive=keepalive, clean=True, username=username, password=password
        )
        protocol = IngestProtocol(packet, stats, max_waiting=max_waiting, low_water=low_water)
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: protocol,
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=host if ssl_context is not None else None,
                )
                await protocol.ready
                wanted = [*filters, (barrier_topic, 0)]
                granted = await protocol.subscribe(wanted)
        except TimeoutError as exc:
            protocol.close()
            raise BrokerUnavailable(f"ingest connection: no answer within {timeout}s") from exc
        except (OSError, ssl.SSLError) as exc:
            protocol.close()
            raise BrokerUnavailable(f"ingest connection failed: {exc}") from exc
        except BrokerUnavailable:
            protocol.close()
            raise
        for (topic_filter, _qos), code in zip(wanted, granted, strict=False):
            if code >= 0x80:
                protocol.close()
                raise BrokerUnavailable(
                    f"the broker refused the subscription to {topic_filter!r}"
                    f" (code {code:#x}); check the broker's ACL for this client"
                )
        connection = cls(protocol, routes, barrier_topic, keepalive=keepalive)
        return connection

    async def serve(self) -> None:
        """Hand the messages to the handlers and keep the connection alive, until it is
        lost (raises :class:`BrokerUnavailable`) or cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._keeping_alive(), name="ingest-keepalive")
            tg.create_task(self._handling(), name="ingest-handle")

    async def _handling(self) -> None:
        protocol = self.protocol
        waiting, dispatch, barrier = protocol.waiting, self.routes.dispatch, self.barrier_topic
        popleft = waiting.popleft
        while True:
            await protocol.arrived.wait()
            protocol.arrived.clear()
            while waiting:
                for _ in range(min(BATCH, len(waiting))):
                    topic, payload, retain = popleft()
                    if topic == barrier:
                        self._barrier_arrived(payload)
                    else:
                        dispatch(topic, payload, retain)
                protocol.taken()
                await asyncio.sleep(0)  # let the engine and its publications run
            if protocol.lost.done():
                raise BrokerUnavailable("ingest connection lost")

    async def _keeping_alive(self) -> None:
        protocol = self.protocol
        if not self.keepalive:
            await protocol.lost
            raise BrokerUnavailable("ingest connection lost")
        every = self.keepalive / 2
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await asyncio.shield(protocol.lost)
            if protocol.lost.done():
                raise BrokerUnavailable("ingest connection lost")
            silent = time.monotonic() - protocol.last_heard
            if not protocol.paused and silent > 1.5 * self.keepalive:
                protocol.close()
                raise BrokerUnavailable(f"ingest connection: nothing heard for {silent:.0f}s")
            protocol.write(mqttwire.PINGREQ_PACKET)

    async def barrier(self, timeout: float) -> None:
        """Return once every message the broker sent on this connection before the call
        has been handed to its handler."""
        nonce = secrets.token_hex(8).encode("ascii")
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[nonce] = arrived
        try:
            self.protocol.write(mqttwire.publish(self.barrier_topic, nonce))
            async with asyncio.timeout(timeout):
                await asyncio.wait(
                    {arrived, self.protocol.lost}, return_when=asyncio.FIRST_COMPLETED
                )
            if not arrived.done():
                raise BrokerUnavailable("ingest connection lost before the barrier came back")
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"the broker did not echo the ingest barrier; check that this client may"
                f" publish and subscribe to {self.barrier_topic!r}"
            ) from exc
        finally:
            self._barriers.pop(nonce, None)

    def _barrier_arrived(self, payload: bytes) -> None:
        arrived = self._barriers.get(payload)
        if arrived is not None and not arrived.done():
            arrived.set_result(None)

    def close(self) -> None:
        self.protocol.close()
