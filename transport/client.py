"""One MQTT connection (:class:`Session`) and a reconnecting client (:class:`Client`) on gmqtt.

The codec and the protocol state machine are gmqtt's (``docs/decisions/0008-mqtt-transport.md``);
this module adds what setpoint needs on top, the same for every user:

* **Versions.** ``protocol="auto"`` (the default) connects with MQTT 5 and, when the broker
  refuses it (CONNACK "unacceptable protocol version", or it drops the connection before a
  CONNACK), once more with MQTT 3.1.1; ``"5"`` or ``"3.1.1"`` forces one.
  :attr:`Session.protocol` says which one is up.
* **TLS and credentials.** An :class:`ssl.SSLContext` (with a client certificate for mutual
  TLS); user name and password.
* **Subscriptions checked.** :meth:`Session.subscribe` waits for the SUBACK and raises
  :class:`~.errors.SubscriptionRefused` naming the refused filter and its code.
* **Inbound backpressure.** Messages wait in a queue bounded by bytes
  (``max_inbound_bytes``); past it the socket is not read (``pause_reading``), so the
  kernel and the broker hold the backlog. Reading resumes when :meth:`Session.take` has
  emptied the queue to a quarter of the bound (``max_inbound_messages`` bounds it in
  messages too). What gmqtt had already read when the bound was reached still arrives:
  its read chunk and its stream buffer, at most about 256 KiB beyond the bound.
* **Outbound backpressure and pipelining.** QoS 1 publishes are pipelined: at most
  ``max_inflight`` wait for their PUBACK (matched by packet id), :meth:`Session.publish`
  waits for room and returns a future of the acknowledgement. Any publish waits while the
  socket's write buffer is above the transport's high-water mark.
* **Coalesced writes.** The packets of one turn of the event loop go to the socket in one
  write at the end of the turn, in order (gmqtt makes one system call per packet), at once
  past ``WRITE_COALESCE_BYTES``; :meth:`Session.close` writes its DISCONNECT after them.
* **Source address.** ``Settings.source_address`` is the local address the connection
  leaves from (a simulator spreads its devices over 127.0.0.x).
* **Typed errors.** Every failure is a :class:`~.errors.TransportError`; a packet gmqtt
  cannot handle, or a stream it stops reading, ends the session with
  :class:`~.errors.ProtocolViolation` at once. A stream whose next packet never completes
  (a length that claims more than comes), or a broker that stops answering (stalled, or
  not reading the socket), ends at gmqtt's heartbeat, nothing parsed for twice the
  keepalive, with :class:`~.errors.ConnectionLost`, the socket aborted. The fuzz test
  (``tests/transport/test_fuzz.py``, longer: ``python -m bench.transport_fuzz``) holds it
  to that.
* **Reconnect.** :meth:`Client.run` opens a session, hands it to the caller's coroutine and,
  when the session ends with a :class:`~.errors.TransportError`, waits the kit's
  :class:`~setpoint.kit.backoff.Backoff` and opens the next.

gmqtt's own reconnect and QoS replay are switched off: a session is one connection with a
clean session, and the caller re-subscribes in its ``on_session``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import gmqtt
from gmqtt.mqtt.connection import MQTTConnection
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.mqtt.handler import MqttPackageHandler
from gmqtt.mqtt.protocol import MQTTProtocol

from setpoint.kit.backoff import Backoff

from .errors import (
    ConnectionLost,
    ConnectRefused,
    ProtocolViolation,
    SubscriptionRefused,
    TransportError,
    Unreachable,
)

log = logging.getLogger(__name__)

Protocol = Literal["auto", "5", "3.1.1"]
PROTOCOLS: Final = ("auto", "5", "3.1.1")
MAX_INBOUND_BYTES: Final = 8 * 1024 * 1024
MAX_INFLIGHT: Final = 1024
# Packets written in one turn of the event loop go to the socket in one write; past this
# many bytes waiting, at once (a caller that never yields still meets the transport's
# write-buffer backpressure).
WRITE_COALESCE_BYTES: Final = 64 * 1024
_VERSION_NAMES: Final = {MQTTv50: "5", MQTTv311: "3.1.1"}

# gmqtt logs every packet at DEBUG and a lost connection at WARNING; the transport raises
# a typed error for those instead, so its loggers say only what it cannot report.
for _name in ("gmqtt", "gmqtt.mqtt.protocol", "gmqtt.mqtt.handler", "gmqtt.mqtt.connection"):
    logging.getLogger(_name).setLevel(logging.ERROR)


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Settings:
    """Where and how to connect; one per client."""

    host: str
    port: int
    client_id: str
    protocol: Protocol = "auto"
    ssl_context: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    connect_timeout: float = 10.0
    will: Will | None = None
    max_inbound_bytes: int = MAX_INBOUND_BYTES
    max_inbound_messages: int | None = None  # a second bound, in messages (None: bytes only)
    max_inflight: int = MAX_INFLIGHT
    # MQTT 5 CONNECT properties (e.g. session_expiry_interval); ignored on 3.1.1.
    connect_properties: dict[str, Any] = field(default_factory=dict)
    # The local address the connection leaves from (port chosen by the system); None: any.
    source_address: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"MQTT protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.max_inbound_bytes < 1 or self.max_inflight < 1:
            raise ValueError("max_inbound_bytes and max_inflight must be at least 1")
        if self.max_inbound_messages is not None and self.max_inbound_messages < 1:
            raise ValueError(
                f"max_inbound_messages must be at least 1, got {self.max_inbound_messages}"
            )
        if not 0 <= self.keepalive <= 0xFFFF:
            raise ValueError(f"keepalive must be 0-65535 seconds, got {self.keepalive}")
        if self.source_address is not None:
            try:
                ipaddress.ip_address(self.source_address)
            except ValueError:
                raise ValueError(
                    f"source_address must be an IP address of this machine (e.g."
                    f" 127.0.0.2), got {self.source_address!r}"
                ) from None


@dataclass(slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int


@dataclass(frozen=True, slots=True)
class Subscription:
    """One filter of a SUBSCRIBE. ``no_local`` needs MQTT 5 (ignored on 3.1.1)."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False


_NONE: collections.deque[Message] = collections.deque()  # never appended to
_NEVER = asyncio.Event()  # stands for _arrived where nothing waits on it


class _Handler(MqttPackageHandler):  # type: ignore[misc]
    """gmqtt's packet handler, strict: what it would log and skip ends the session.

    Methods of a class rather than closures set on each handler: a simulator holds ten
    thousand of them."""

    _session: Session

    def _handle_packet(self, cmd: int, packet: bytes) -> None:
        # gmqtt logs and skips a packet it cannot handle; the session ends instead.
        try:
            super()._handle_packet(cmd, packet)
        except Exception as exc:
            self._session._violation(f"a packet of type {cmd >> 4} that cannot be read ({exc!r})")

    def _parse_properties(self, packet: bytes) -> tuple[dict[str, Any] | None, bytes | None]:
        # Most MQTT 5 packets carry no property at all (length byte 0): skip gmqtt's
        # parser for them (it was 7% of the controller's CPU under a flood of reports).
        # An invalid property ends the session instead of being logged and skipped.
        if self._connection_state.protocol_version >= MQTTv50 and packet[:1] == b"\x00":
            return {}, packet[1:]
        found, rest = super()._parse_properties(packet)
        if found is None:
            self._session._violation("an invalid MQTT 5 property")
        return found, rest


class _Protocol(MQTTProtocol):  # type: ignore[misc]
    """gmqtt's protocol with its writes coalesced: gmqtt writes every packet to the socket
    as it builds it (a ``send`` system call per PUBLISH: 14-25% of the controller's CPU in a
    pipelined round of statuses, 7-26% of the simulator's); here the packets of one turn of
    the event loop wait in a list and go in one write at the end of it (:meth:`flush`,
    scheduled by the first), in the order written. Past :data:`WRITE_COALESCE_BYTES`
    waiting they go at once. A lone message waits one turn of the loop: the broker round
    trip measured the same as with the first packet of a turn written at once (within
    10 µs, either way, 3,000 samples a run), which coalesced less (a turn's first packet
    and the rest: two writes, and only one packet in most turns of the simulator's
    devices)."""

    _pending: list[bytes] | None = None  # None: nothing waits, no flush scheduled
    _pending_bytes = 0

    def write_data(self, data: bytes) -> None:
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self._pending_bytes = len(data)
            self._loop.call_soon(self.flush)
            return
        pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= WRITE_COALESCE_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write what waits (a no-op when nothing does)."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._pending_bytes = 0
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the connection is going: what waited goes with it, as gmqtt would
        if self._connection is not None:
            self._connection._last_data_out = time.monotonic()
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))


class _Gmqtt(gmqtt.Client):  # type: ignore[misc]
    """gmqtt's client with its own reconnect off and the hooks a :class:`Session` needs."""

    def __init__(self, session: Session, *args: Any, **kwargs: Any) -> None:
        self._session = session
        super().__init__(*args, **kwargs)
        handler = self._package_handler
        handler.__class__ = _Handler  # gmqtt builds its handler itself; same layout
        handler._session = session

    async def _create_connection(
        self, host: str, port: int, ssl: Any, clean_session: bool, keepalive: int
    ) -> MQTTConnection:
        # gmqtt's own (0.8), with the transport's protocol and source address: gmqtt opens
        # the socket with neither a protocol factory nor a local address a client can give.
        self._exit_reconnecting_state()
        self._package_handler.clear_topics_aliases()
        self._connack_received.clear()
        self._connection_lost.clear()
        handler = self._package_handler
        state = self._connection_state

        def protocol() -> _Protocol:
            return _Protocol(connection_state=state, id_generator=handler.id_generator)

        source = self._session.settings.source_address
        transport, made = await asyncio.get_running_loop().create_connection(
            protocol, host, port, ssl=ssl, local_addr=(source, 0) if source else None
        )
        return MQTTConnection(
            transport, made, clean_session, keepalive, package_handler=handler, logger=self._logger
        )

    def reconnect(self, delay: bool = False) -> asyncio.Future[None]:
        # gmqtt schedules this on a lost connection, a refused CONNACK and a refused MQTT 5;
        # a session does not reconnect (the Client opens a new one).
        self._session._gone(None)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def _remove_message_from_queue(self, mid: int) -> None:  # a PUBACK
        self._session._acked(mid)


class Session:
    """One MQTT connection: subscribe, publish (QoS 0/1, pipelined), take messages."""

    def __init__(
        self, settings: Settings, on_message: Callable[[str, bytes, bool], None] | None = None
    ) -> None:
        self.settings = settings
        self.on_message = on_message
        self.protocol: str = ""
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[TransportError] = loop.create_future()
        # Only a session without on_message queues (and waits on _arrived): an empty deque
        # and an event are ~1.3 KB, which ten thousand simulated devices do not need.
        queued = on_message is None
        self._inbound: collections.deque[Message] = collections.deque() if queued else _NONE
        self._inbound_bytes = 0
        self._paused = False
        self._max_messages = settings.max_inbound_messages or 1 << 62
        self.pauses = 0  # times reading was paused because the queue was full
        self.high_water = 0  # the most messages that ever waited at once
        self._arrived = asyncio.Event() if queued else _NEVER
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._subacks: dict[int, asyncio.Future[Sequence[int]]] = {}
        self._room = asyncio.Semaphore(settings.max_inflight)
        self._unmetered: set[int] = set()  # packet ids of publish_nowait (no room taken)
        self._ids = 0xFFFF - 2  # packet ids usable at once (the broker's receive maximum)
        self._closing = False
        self._client: _Gmqtt | None = None

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, settings: Settings, on_message: Callable[[str, bytes, bool], None] | None = None
    ) -> Session:
        """Connect (MQTT 5, then 3.1.1 if refused, as ``settings.protocol`` says).

        With ``on_message(topic, payload, retain)`` every message goes straight to it, from
        the network callback (no queue, no backpressure: for callers that do little per
        message, such as ten thousand simulated devices); without it, :meth:`take`.
        """
        versions = {"auto": (MQTTv50, MQTTv311), "5": (MQTTv50,), "3.1.1": (MQTTv311,)}
        first: TransportError | None = None
        for version in versions[settings.protocol]:
            session = cls(settings, on_message)
            try:
                await session._connect(version)
                return session
            except (ConnectRefused, ConnectionLost) as exc:
                session._drop()
                # A 3.1.1-only broker refuses MQTT 5 with a code, or just closes the
                # connection; nothing reached at all is no refusal of the version.
                refused_version = (
                    not isinstance(exc, Unreachable)
                    if isinstance(exc, ConnectionLost)
                    else exc.code in (1, 0x84)
                )
                if version == MQTTv50 and settings.protocol == "auto" and refused_version:
                    log.info("MQTT 5 refused by %s:%s (%s); trying 3.1.1",
                             settings.host, settings.port, exc)  # fmt: skip
                    first = exc
                    continue
                raise
            except BaseException:
                session._drop()
                raise
        assert first is not None
        raise first

    async def _connect(self, version: int) -> None:
        s = self.settings
        will = None
        if s.will is not None:
            will = gmqtt.Message(s.will.topic, s.will.payload, qos=s.will.qos, retain=s.will.retain)
        props = s.connect_properties if version == MQTTv50 else {}
        client = _Gmqtt(self, s.client_id, clean_session=True, will_message=will, **props)
        self._client = client
        if s.username is not None:
            client.set_auth_credentials(s.username, s.password)
        handler = client._package_handler
        handler.on_message = self._on_message if self.on_message is None else self._deliver
        handler.on_subscribe = self._on_subscribe
        handler.on_disconnect = self._on_disconnect
        where = f"{s.host}:{s.port}"
        connecting = asyncio.ensure_future(
            client.connect(
                s.host,
                s.port,
                ssl=s.ssl_context or False,
                keepalive=s.keepalive,
                version=version,
                raise_exc=True,
            )
        )
        try:
            async with asyncio.timeout(s.connect_timeout):
                await asyncio.wait({connecting, self.lost}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            connecting.cancel()
            raise ConnectionLost(f"no CONNACK from {where} within {s.connect_timeout}s") from None
        if not connecting.done():
            connecting.cancel()
            if client._connection_state.protocol_version != version:  # gmqtt saw CONNACK 1
                raise ConnectRefused(s.host, s.port, 1)
            raise self.lost.result()
        try:
            connecting.result()
        except gmqtt.mqtt.handler.MQTTConnectError as exc:
            raise ConnectRefused(s.host, s.port, int(exc._code)) from None
        except (OSError, ssl.SSLError) as exc:
            raise Unreachable(f"cannot connect to {where}: {exc}") from exc
        if client._connection_state.protocol_version != version:
            raise ConnectRefused(s.host, s.port, 1)
        if self.lost.done():
            raise self.lost.result()
        self.protocol = _VERSION_NAMES[version]
        # gmqtt 0.8 makes two queues and an event per connection that it never uses
        # (MQTTConnection._buff, MQTTProtocol._queue and _disconnect): ~4 KB of ~24.
        connection = client._connection
        connection._buff = connection._protocol._queue = connection._protocol._disconnect = None
        # gmqtt's packet ids are bounded by the broker's receive maximum (MQTT 5 CONNACK);
        # keep one free for SUBSCRIBE.
        self._ids = max(1, client._package_handler.id_generator._max - 2)
        self._room = asyncio.Semaphore(min(s.max_inflight, self._ids))
        # gmqtt's heartbeat closes the connection when nothing came for twice the keepalive,
        # with its close(): a graceful close, which waits for the socket's write buffer to
        # drain. A broker that stopped reading this socket (stalled, or stopped) never
        # drains it, so the close never ends and the session never learns it is lost: its
        # publishes wait for PUBACKs forever on an idle loop. The session ends at once
        # instead, and the socket is aborted (tests/transport/test_session.py).
        connection.close = self._heartbeat_lost
        # gmqtt's read loop stops on an impossible remaining length and leaves the socket
        # open: that is a violation, not a quiet connection (a callback, not a task: one
        # task fewer per connection for the simulator's ten thousand).
        read_loop = getattr(self._reader()[1], "_read_loop_future", None)
        if read_loop is not None:
            read_loop.add_done_callback(self._read_loop_ended)

    # -- receiving -------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, qos: int, properties: dict[str, Any]) -> int:
        inbound = self._inbound
        inbound.append(Message(topic, payload, bool(properties["retain"]), qos))
        self._inbound_bytes += len(payload) + len(topic)
        if len(inbound) > self.high_water:
            self.high_water = len(inbound)
        if not self._paused and (
            self._inbound_bytes >= self.settings.max_inbound_bytes
            or len(inbound) >= self._max_messages
        ):
            self._pause()
        self._arrived.set()
        return 0

    def _deliver(self, topic: str, payload: bytes, qos: int, properties: dict[str, Any]) -> int:
        self.on_message(topic, payload, bool(properties["retain"]))  # type: ignore[misc]
        return 0

    def _reader(self) -> tuple[asyncio.Transport | None, Any]:
        connection = self._client._connection if self._client is not None else None
        if connection is None:
            return None, None
        protocol = connection._protocol
        return connection._transport, protocol

    def _pause(self) -> None:
        transport, protocol = self._reader()
        if transport is None or transport.is_closing():
            return
        transport.pause_reading()
        self.pauses += 1
        # The stream reader under gmqtt resumes the transport when *it* paused it; it must
        # not undo this pause, so it is told it did not.
        protocol._stream_reader._paused = False
        self._paused = True

    def _resume(self) -> None:
        self._paused = False
        transport, _ = self._reader()
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    async def take(self, limit: int = 256) -> list[Message]:
        """The next messages (at least one, at most ``limit``), oldest first.

        Raises the session's :class:`TransportError` once it is lost and nothing waits.
        """
        if self.on_message is not None:
            raise RuntimeError("this session hands its messages to on_message, not take()")
        inbound = self._inbound
        while not inbound:
            if self.lost.done():
                raise self.lost.result()
            self._arrived.clear()
            await self._arrived.wait()  # set by every message, and by the loss
        if len(inbound) <= limit:
            out = list(inbound)
            inbound.clear()
        else:
            popleft = inbound.popleft
            out = [popleft() for _ in range(limit)]
        self._inbound_bytes -= sum([len(m.payload) + len(m.topic) for m in out])
        if (
            self._paused
            and self._inbound_bytes <= self.settings.max_inbound_bytes // 4
            and len(inbound) <= self._max_messages // 4
        ):
            self._resume()
        return out

    @property
    def waiting_bytes(self) -> int:
        """Bytes of messages received and not yet taken."""
        return self._inbound_bytes

    @property
    def paused(self) -> bool:
        return self._paused

    # -- sending ---------------------------------------------------------------------------

    def _live(self) -> Any:
        if self.lost.done():
            raise self.lost.result()
        if self._client is None or self._client._connection is None:
            raise ConnectionLost("not connected")
        return self._client._connection

    async def _writable(self) -> Any:
        connection = self._live()
        protocol = connection._protocol
        if connection._transport.get_write_buffer_size() > 0:
            await protocol._drain_helper()  # waits while the transport is paused for writing
            connection = self._live()
        return connection

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> asyncio.Future[None]:
        """Send a PUBLISH; returns once it is handed to the connection (waiting for room; on
        the socket at the end of this turn of the loop), with a future that completes on
        its PUBACK (QoS 1) or at once (QoS 0).

        ``properties`` are MQTT 5 publish properties (``message_expiry_interval``,
        ``user_property``...), dropped on 3.1.1.
        """
        if qos not in (0, 1):
            raise ValueError(f"the transport publishes at QoS 0 or 1, not {qos}")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if qos:
            await self._room.acquire()
        try:
            connection = await self._writable()
            message = gmqtt.Message(topic, payload, qos=qos, retain=retain, **(properties or {}))
            mid, _ = connection.publish(message)
        except BaseException:
            if qos:
                self._room.release()
            raise
        if qos:
            self._acks[mid] = done
        else:
            done.set_result(None)
        return done

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> asyncio.Future[None]:
        """:meth:`publish` without waiting: for callers that bound their own rate (a
        simulated device publishes a few messages at a time). Not counted against
        ``max_inflight``."""
        if qos not in (0, 1):
            raise ValueError(f"the transport publishes at QoS 0 or 1, not {qos}")
        connection = self._live()
        if qos and len(self._acks) >= self._ids:
            raise TransportError(
                f"{len(self._acks)} QoS 1 publishes already wait for their PUBACK (the"
                f" broker's receive maximum); use publish(), which waits for room"
            )
        message = gmqtt.Message(topic, payload, qos=qos, retain=retain, **(properties or {}))
        mid, _ = connection.publish(message)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if qos:
            self._unmetered.add(mid)
            self._acks[mid] = done
        else:
            done.set_result(None)
        return done

    def unsubscribe(self, topic_filters: Sequence[str]) -> None:
        """Send an UNSUBSCRIBE (its UNSUBACK is not awaited)."""
        self._live().unsubscribe(list(topic_filters))

    def ping(self) -> None:
        """Send a PINGREQ now (gmqtt also keeps the connection alive by itself)."""
        self._live()._send_ping_request()

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self.protocol) and not self.lost.done()

    def _acked(self, mid: int) -> None:
        future = self._acks.pop(mid, None)
        if future is not None:
            if mid in self._unmetered:
                self._unmetered.discard(mid)
            else:
                self._room.release()
            if not future.done():
                future.set_result(None)

    @property
    def inflight(self) -> int:
        """QoS 1 publishes waiting for their PUBACK."""
        return len(self._acks)

    async def subscribe(self, subscriptions: Iterable[Subscription | str]) -> list[int]:
        """Subscribe and wait for the SUBACK; the granted QoS per filter.

        Raises :class:`SubscriptionRefused` for the first filter the broker refused.
        """
        subs = [Subscription(s) if isinstance(s, str) else s for s in subscriptions]
        if not subs:
            return []
        connection = await self._writable()
        assert self._client is not None
        # gmqtt sets the no_local bit on 3.1.1 too, where the options byte is the QoS alone:
        # a 3.1.1 broker (NATS) drops the connection for it.
        v5 = self.protocol == "5"
        wanted = [
            gmqtt.Subscription(s.topic_filter, qos=s.qos, no_local=s.no_local and v5) for s in subs
        ]
        future: asyncio.Future[Sequence[int]] = asyncio.get_running_loop().create_future()
        mid = connection.subscribe(wanted)
        self._subacks[mid] = future
        await asyncio.wait({future, self.lost}, return_when=asyncio.FIRST_COMPLETED)
        if not future.done():
            self._subacks.pop(mid, None)
            raise self.lost.result()
        codes = list(future.result())
        for sub, code in zip(subs, codes, strict=False):
            if code >= 0x80:
                raise SubscriptionRefused(sub.topic_filter, code)
        if len(codes) != len(subs):
            raise ProtocolViolation(f"a SUBACK with {len(codes)} codes for {len(subs)} filters")
        return codes

    def _on_subscribe(self, mid: int, codes: Sequence[int], properties: Any) -> None:
        future = self._subacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(codes)

    # -- ending ----------------------------------------------------------------------------

    def _on_disconnect(self, packet: Any, exc: Any = None) -> None:
        self._gone(None)

    async def _heartbeat_lost(self) -> None:
        s = self.settings
        self._gone(
            ConnectionLost(
                f"nothing from the broker at {s.host}:{s.port} for {2 * s.keepalive}s (twice"
                " the keepalive): it stopped answering"
            )
        )
        transport, _ = self._reader()
        if transport is not None:
            transport.abort()

    def _violation(self, what: str) -> None:
        s = self.settings
        self._gone(ProtocolViolation(f"the broker at {s.host}:{s.port} sent {what}"))
        transport, _ = self._reader()
        if transport is not None:
            transport.abort()

    def _gone(self, error: TransportError | None) -> None:
        if self.lost.done():
            return
        s = self.settings
        if error is None:
            why = "closed by this client" if self._closing else "closed by the broker or network"
            error = ConnectionLost(f"MQTT connection to {s.host}:{s.port} lost ({why})")
        self.lost.set_result(error)
        for future in (*self._acks.values(), *self._subacks.values()):
            if not future.done():
                future.set_exception(error)
                future.exception()  # whoever awaits it still gets it; no "never retrieved"
        self._acks.clear()
        self._subacks.clear()
        self._arrived.set()

    def _read_loop_ended(self, _future: asyncio.Future[None]) -> None:
        if not self.lost.done() and not self._closing:
            self._violation("a remaining length longer than MQTT allows")

    def _drop(self) -> None:
        self._closing = True
        self._gone(None)
        transport, _ = self._reader()
        if transport is not None:
            transport.abort()

    def close(self) -> None:
        """DISCONNECT (the broker drops the will) and close; at once, nothing to await."""
        self._closing = True
        client, transport = self._client, self._reader()[0]
        if client is not None and transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                client._is_active = False
                client._connection.send_disconnect()
                client._connection._protocol.flush()  # the DISCONNECT before the close
                transport.close()
                # close() waits for the write buffer to drain: not forever.
                asyncio.get_running_loop().call_later(
                    self.settings.connect_timeout, transport.abort
                )
        self._gone(None)

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (the broker publishes the will)."""
        self._drop()


class Client:
    """Sessions one after the other, with the kit's backoff in between."""

    def __init__(self, settings: Settings, *, backoff: Backoff | None = None) -> None:
        self.settings = settings
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.session: Session | None = None
        self.attempt = 0

    async def run(self, on_session: Callable[[Session], Awaitable[None]]) -> None:
        """Forever (until cancelled): open a session and await ``on_session(session)``.

        ``on_session`` subscribes, then serves until the session is lost (a
        :class:`TransportError`, caught here: the next session follows after the backoff).
        A session that reached ``on_session`` resets the backoff. Other exceptions end
        :meth:`run`.
        """
        while True:
            try:
                session = await Session.open(self.settings)
            except TransportError as exc:
                await self._wait(exc)
                continue
            self.session = session
            try:
                await on_session(session)
                self.attempt = 0
                session.close()
                return
            except TransportError as exc:
                opened = self.attempt
                self.attempt = 0 if not isinstance(exc, SubscriptionRefused) else opened
                session.close()
                await self._wait(exc)
            except BaseException:
                session.close()
                raise
            finally:
                self.session = None

    async def _wait(self, exc: TransportError) -> None:
        delay = self.backoff.delay(self.attempt)
        self.attempt += 1
        log.warning("%s; again in %.1fs", exc, delay)
        await asyncio.sleep(delay)
