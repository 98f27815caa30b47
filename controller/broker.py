r"""The controller's MQTT connection, kept alive: connect, subscribe, pump, reconnect.

Built on the project's transport (:mod:`setpoint.transport`, gmqtt underneath,
``docs/decisions/0008-mqtt-transport.md``). :class:`Link` runs the loop: connect (MQTT 5,
falling back to 3.1.1 if the broker refuses it) to one node of ``--broker`` (several
nodes are tried in turn: a node that does not answer within the connect timeout, or
refuses, hands over to the next), subscribe its :class:`Subscription`\ s in one SUBSCRIBE,
and deliver what happens as facts to its one ``deliver`` function, in order:
:class:`Connected` (the session is live, nothing of it delivered yet), each
:class:`Message`, :class:`Disconnected`. Work a session's owner starts for it (the
controller's sync) ends the session with :meth:`Session.fail`. When the connection
breaks, every waiting publish fails at once with :class:`BrokerUnavailable`, and after a
backoff (the kit's policy, reset by a successful connect) it starts over.

:meth:`Link.barrier` proves that everything the broker sent before has been handled: it
publishes a nonce to the client's private topic and waits for it to come back. MQTT keeps
the order of one connection, so once the nonce is back, every retained message that the
SUBSCRIBE released has been dispatched too. No guessing with quiet periods. (Routes are
subscribed at QoS 0 by default, the barrier too, so that a burst of thousands of retained
messages is not cut by the broker's per-client queue limit for QoS 1.)

Subscriptions marked ``bulk`` (device reports and presence: floods) come in through a
second session of the transport to the same node (:mod:`.ingesting`), opened after the
main one subscribed; a session ends, and both reconnect, when either breaks. The barrier
covers both: a nonce goes out and comes back on each. Measured (``bench.converge``, 10,000
devices): with the floods on the main connection, the acknowledgements of the
controller's own publications queue behind them (MQTT 5 lets at most the broker's receive
maximum, 100 on mosquitto, wait at once) and convergence took 24 s instead of 9 s.
Incoming messages wait in the transport's bounded queues; past the bound it stops reading
the socket (the kernel and the broker hold the backlog). Publications are pipelined:
:meth:`Session.send` writes a QoS 1 PUBLISH and returns a future of its PUBACK, and
:meth:`Link.publish_many` puts a round of statuses in flight together.

The transport's exceptions stop here; above this module there is only
``BrokerUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from setpoint import transport
from setpoint.kit import brokers
from setpoint.kit.backoff import Backoff, Retry
from setpoint.kit.brokers import BrokerSettings
from setpoint.kit.tasks import raise_if_cancelled
from setpoint.proto.topics import Topics

from . import ingesting
from .errors import BrokerUnavailable
from .ingesting import IngestConnection, IngestStats, Routes

__all__ = ["Backoff", "BrokerSettings"]  # the kit's, named where the controller wires them

log = logging.getLogger(__name__)

MAX_INBOX_BYTES: Final = 64 * 1024 * 1024  # what the connection may hold unread
MAX_INBOX_MESSAGES: Final = 16_384  # and in messages (the pump hands over 256 at a time)
BATCH: Final = 256  # messages handed over between two yields to the event loop
MAX_BARRIER_BYTES: Final = 64  # a nonce is 16; anything larger on the echo topic is junk
PROBE: Final = b"probe"  # what Link.probe publishes on the echo topic (no nonce: dropped)
DEFAULT_BACKOFF: Final = Backoff(0.1, 5.0)


@dataclass(frozen=True, slots=True)
class Message:
    """An incoming message, free of the transport's types."""

    topic: str
    payload: bytes
    retain: bool


def new_client_id(role: str = "controller") -> str:
    return f"setpoint-{role}-{secrets.token_hex(4)}"


def tls_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    context = ssl.create_default_context(cafile=settings.ca)
    if settings.cert:
        context.load_cert_chain(settings.cert, settings.key)
    return context


def transport_settings(
    settings: BrokerSettings,
    client_id: str,
    node: tuple[str, int] | None = None,
    **extra: object,
) -> transport.Settings:
    """The transport's settings for ``node`` (default: the first) of ``settings``."""
    host, port = node or (settings.host, settings.port)
    return transport.Settings(
        host, port, client_id, protocol=settings.protocol,  # type: ignore[arg-type]
        ssl_context=tls_context(settings), username=settings.username,
        password=settings.password, keepalive=settings.keepalive,
        connect_timeout=settings.connect_timeout, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def nodes(settings: BrokerSettings) -> list[tuple[str, int]]:
    """Every node of ``settings``, in the order to try them."""
    return [(settings.host, settings.port), *settings.others]


class Session:
    """One live connection. Publishing fails fast when it breaks."""

    def __init__(self, connection: transport.Session, number: int, node: str = "") -> None:
        self._connection = connection
        self.number = number
        self.node = node  # host:port of the broker node this session is connected to
        self.v5 = connection.protocol == "5"
        self.lost = asyncio.Event()
        connection.lost.add_done_callback(lambda _f: self.lost.set())
        self._failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    def fail(self, error: BaseException) -> None:
        """End this session because of ``error`` (work it started went wrong with the
        broker): the link reconnects, as after any broker trouble. Ignored once lost."""
        if not self.lost.is_set() and not self._failed.done():
            self._failed.set_result(error)

    async def failure(self) -> None:
        """Raise :class:`BrokerUnavailable` once :meth:`fail` is called (a task of the
        session's group)."""
        error = await self._failed
        raise BrokerUnavailable(str(error) or error.__class__.__name__) from error

    async def send(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Write a PUBLISH (waiting only for room among the QoS 1 publishes in flight and
        in the socket's buffer); the future completes on its PUBACK (QoS 1), and fails
        with the transport's error if the connection breaks first (see :meth:`acked`)."""
        if self.lost.is_set():
            raise BrokerUnavailable("not connected to the broker")
        try:
            return await self._connection.publish(topic, payload, qos=qos, retain=retain)
        except transport.TransportError as exc:
            raise BrokerUnavailable(f"publish to {topic} failed: {exc}") from exc

    @staticmethod
    async def acked(topic: str, ack: asyncio.Future[None], timeout: float) -> None:
        """Wait for ``ack`` (from :meth:`send`); BrokerUnavailable if it does not come."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(ack)
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"the broker did not acknowledge {topic} within {timeout:g}s"
            ) from exc
        except transport.TransportError as exc:
            raise BrokerUnavailable(
                f"connection lost before the broker acknowledged {topic}: {exc}"
            ) from exc

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float
    ) -> float:
        """Publish and, for QoS 1, return once the broker acknowledged (PUBACK): the
        seconds from the PUBLISH written to its PUBACK (waiting for room not counted;
        ``controller/rereading.py`` tells a slow one)."""
        try:
            async with asyncio.timeout(timeout):
                ack = await self.send(topic, payload, qos=qos, retain=retain)
        except TimeoutError as exc:
            raise BrokerUnavailable(f"no room to publish {topic} within {timeout:g}s") from exc
        written = time.monotonic()
        await self.acked(topic, ack, timeout)
        return time.monotonic() - written


@dataclass(frozen=True, slots=True)
class Subscription:
    """A topic filter the controller takes in.

    ``no_local`` (MQTT 5) skips this client's own publications. ``bulk`` marks a flood
    (device reports and presence): its filter must end in a literal level
    (``devices/+/reported``, also as ``$share/<name>/...``); QoS 0 or 1, and no
    ``no_local``.

    QoS 0 is the default on purpose: a view rebuilt from retained messages on every
    connect loses nothing by it, while at QoS 1 mosquitto queues at most
    ``max_queued_messages`` (default 1000) per client and silently drops the rest of a
    SUBSCRIBE's retained messages (and the barrier behind them).
    """

    topic_filter: str
    qos: int = 0
    no_local: bool = False
    bulk: bool = False

    def __post_init__(self) -> None:
        if self.bulk:
            if self.no_local:
                raise ValueError(f"a bulk subscription cannot be no_local ({self.topic_filter!r})")
            if self.qos not in (0, 1):
                raise ValueError(
                    f"a bulk subscription is QoS 0 or 1, not {self.qos} ({self.topic_filter!r})"
                )
            ingesting.split_filter(self.topic_filter)  # raises ValueError on a bad filter


@dataclass(frozen=True, slots=True)
class Connected:
    """A session is live: subscribed, and nothing it brought has been delivered yet."""

    session: Session


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The session (or the attempt to open one) ended; a new one follows after a backoff."""


Fact = Message | Connected | Disconnected
Deliver = Callable[[Fact], None]


class Link:
    """Keeps one MQTT connection up and delivers what happens on it as facts.

    ``subscriptions`` are fixed at construction; every message that matches one, and
    every change of the connection (:class:`Connected`, :class:`Disconnected`), goes to
    the one ``deliver`` function, in order, called in the pump (it must not block).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        topics: Topics,
        subscriptions: Sequence[Subscription],
        deliver: Deliver,
        *,
        backoff: Backoff | None = None,
        publish_timeout: float = 10.0,
    ) -> None:
        self.settings = settings
        self.client_id = settings.client_id or new_client_id()
        self.topics = topics
        self.publish_timeout = publish_timeout
        self._backoff = Retry(backoff or DEFAULT_BACKOFF)
        self._deliver = deliver
        self._barrier_topic = topics.barrier(self.client_id)
        self._wanted = (Subscription(self._barrier_topic), *subscriptions)
        self._session: Session | None = None
        self._sessions = 0
        self._replaced = asyncio.Event()  # set (and renewed) whenever _session changes
        self._node = 0  # index into nodes(settings) of the node to try next
        self.failures = 0
        self.failed = asyncio.Event()  # set on every failure (to connect, or of a session)
        self._barriers: dict[bytes, asyncio.Future[None]] = {}
        self._ingest: IngestConnection | None = None
        self.ingest_stats = IngestStats()
        self.ingest_max_waiting: int | None = None  # None: ingesting.MAX_WAITING

    # --- State ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._session.lost.is_set()

    async def wait_connected(self) -> Session:
        """The live session, once there is one. A session that is lost but not yet
        replaced is waited out, not polled: a loop on the old ``_connected`` event, which
        stayed set between ``lost`` and the loop's clean-up, never yielded (a client-id
        takeover storm once held the controller at 100% CPU that way)."""
        while True:
            session = self._session
            if session is not None and not session.lost.is_set():
                return session
            await self._replaced.wait()  # the next session (or the end of this one)

    def _set_session(self, session: Session | None) -> None:
        self._session = session
        replaced, self._replaced = self._replaced, asyncio.Event()
        replaced.set()

    # --- Publishing ---------------------------------------------------------------------

    def session(self) -> Session:
        """The current session; BrokerUnavailable if there is none."""
        session = self._session
        if session is None:
            raise BrokerUnavailable("not connected to the broker")
        return session

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> float:
        """Publish on the current session; BrokerUnavailable if there is none or it breaks.
        Returns the seconds the broker took to acknowledge it (:meth:`Session.publish`)."""
        return await self.session().publish(
            topic, payload, qos=qos, retain=retain, timeout=self.publish_timeout
        )

    async def probe(self) -> float:
        """Publish one QoS 1 message to this client's own echo topic (the barrier's; it
        comes back and is dropped) and return the seconds the broker took to acknowledge
        it: whether the broker answers promptly (``controller/rereading.py``)."""
        return await self.publish(self._barrier_topic, PROBE, qos=1)

    async def reread(self, topic_filters: Sequence[str]) -> None:
        """Subscribe to ``topic_filters`` (some of this link's subscriptions) again on the
        live session and return once every retained message that brought has been
        delivered (a barrier behind them).

        The broker replaces each subscription with the new one without interrupting its
        flow and sends the filter's retained messages again (MQTT 3.1.1 and 5, section
        3.8.4; retain handling 0), read from what it holds now: a fresh read of the
        retained topics on the same connection, with nothing live lost and the order of
        one connection kept (mosquitto 2.0 and nats-server 2.9.10 do so; checked by
        ``tests/controller/test_rereading_live.py``). BrokerUnavailable if it fails."""
        wanted = [r for r in self._wanted if r.topic_filter in topic_filters and not r.bulk]
        unknown = set(topic_filters) - {r.topic_filter for r in wanted}
        if unknown:
            raise ValueError(f"not subscriptions of this link's main connection: {sorted(unknown)}")
        session = self.session()
        if session.lost.is_set():
            raise BrokerUnavailable("not connected to the broker")
        await self._subscribe(session._connection, wanted)
        await self._main_barrier(None)

    async def publish_many(
        self, messages: Sequence[tuple[str, bytes, bool]], *, qos: int = 1
    ) -> None:
        """Publish ``(topic, payload, retain)`` messages pipelined: every PUBLISH is
        written as soon as there is room (at most the transport's ``max_inflight`` wait
        for their PUBACK), in order, then every acknowledgement is awaited. Returns once
        all are acknowledged; BrokerUnavailable (for the first that failed) if not."""
        if not messages:
            return
        session = self.session()
        timeout = self.publish_timeout
        acks: list[tuple[str, asyncio.Future[None]]] = []
        try:
            for topic, payload, retain in messages:
                try:
                    async with asyncio.timeout(timeout):
                        ack = await session.send(topic, payload, qos=qos, retain=retain)
                except TimeoutError as exc:
                    raise BrokerUnavailable(
                        f"no room to publish {topic} within {timeout:g}s"
                    ) from exc
                acks.append((topic, ack))
            for topic, ack in acks:
                await session.acked(topic, ack, timeout)
        finally:
            for _topic, ack in acks:
                if ack.done() and not ack.cancelled():
                    ack.exception()  # retrieved: one failure is raised, not one per message

    async def barrier(self, timeout: float | None = None) -> None:
        """Return once every message the broker sent before this call has been handled
        (on both connections of the session)."""
        ingest = self._ingest
        try:
            if ingest is not None:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(ingest.barrier(timeout or self.publish_timeout))
                    tg.create_task(self._main_barrier(timeout))
            else:
                await self._main_barrier(timeout)
        except* BrokerUnavailable as group:
            raise _first(group) from None

    async def _main_barrier(self, timeout: float | None) -> None:
        nonce = secrets.token_hex(8).encode("ascii")
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[nonce] = arrived
        topic = self._barrier_topic
        try:
            session = self.session()
            await self.publish(topic, nonce, qos=1)
            lost = asyncio.ensure_future(session.lost.wait())
            try:
                async with asyncio.timeout(timeout or self.publish_timeout):
                    await asyncio.wait({arrived, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
            if not arrived.done():
                raise BrokerUnavailable("connection lost before the barrier message came back")
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"the broker did not echo the barrier message; check that this client may"
                f" publish and subscribe to {topic!r}"
            ) from exc
        finally:
            self._barriers.pop(nonce, None)

    def _barrier_arrived(self, payload: bytes) -> None:
        if len(payload) > MAX_BARRIER_BYTES:
            return  # not one of our nonces: nothing to look up
        arrived = self._barriers.get(payload)
        if arrived is not None and not arrived.done():
            arrived.set_result(None)

    # --- The loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect; forever (until cancelled)."""
        while True:
            try:
                await self._serve()
            except* BrokerUnavailable as group:
                raise_if_cancelled()  # a cancellation that came with the failure ends the loop
                log.warning("broker: %s", _first(group))
                self.failures += 1
                self.failed.set()
            finally:
                session = self._session
                self._set_session(None)
                if session is not None:
                    session.lost.set()
                self._deliver(Disconnected())
            delay = self._backoff.next()
            log.info("reconnecting to %s in %.1fs", self._where(), delay)
            await asyncio.sleep(delay)

    def _where(self) -> str:
        host, port = nodes(self.settings)[self._node]
        return f"{'mqtts' if self.settings.tls else 'mqtt'}://{host}:{port}"

    async def _open(self) -> transport.Session:
        """A connection to the current node; on failure the next node is current (and,
        when every node of a ``+srv`` name failed, DNS is asked again)."""
        all_nodes = nodes(self.settings)
        node = all_nodes[self._node % len(all_nodes)]
        settings = transport_settings(
            self.settings,
            self.client_id,
            node,
            max_inbound_bytes=MAX_INBOX_BYTES,
            max_inbound_messages=MAX_INBOX_MESSAGES,
        )
        try:
            return await transport.Session.open(settings)
        except transport.TransportError as exc:
            where = self._where()
            await self._next_node()
            raise BrokerUnavailable(f"cannot connect to {where}: {exc}") from exc

    async def _next_node(self) -> None:
        count = len(nodes(self.settings))
        self._node = (self._node + 1) % count
        if self._node == 0 and self.settings.discovery:
            try:
                self.settings = await asyncio.to_thread(
                    brokers.rediscovered, self.settings, random.SystemRandom()
                )
            except brokers.BrokerURLError as exc:
                log.warning("asking DNS again for %s: %s", self.settings.discovery, exc)

    async def _serve(self) -> None:
        connection = await self._open()
        ingest: IngestConnection | None = None
        try:
            self._backoff.reset()
            self._sessions += 1
            node = (connection.settings.host, connection.settings.port)
            session = Session(connection, self._sessions, f"{node[0]}:{node[1]}")
            log.info(
                "connected to %s as %s (MQTT %s)",
                self._where(),
                self.client_id,
                connection.protocol,
            )
            await self._subscribe(connection)
            ingest = self._ingest = await self._open_ingest(node)
            self._set_session(session)
            self._deliver(Connected(session))
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(connection), name="mqtt-pump")
                if ingest is not None:
                    tg.create_task(ingest.serve(), name="mqtt-ingest")
                tg.create_task(session.failure(), name="mqtt-session-failure")
                # The body waits with its tasks, so that their failure reaches it as the
                # group's own cancellation, which the group takes back: a cancellation of
                # the link that comes with the failure then still counts (run(); Python
                # 3.11's group leaves its own counted when its body had ended).
                await asyncio.get_running_loop().create_future()
        finally:
            self._ingest = None
            if ingest is not None:
                ingest.close()
            connection.close()

    async def _open_ingest(self, node: tuple[str, int]) -> IngestConnection | None:
        """The session's receive connection for the bulk routes (None if there are none),
        to the same node, with the same credentials and TLS. The floods of reports come
        in there, so the acknowledgements of the controller's own publications (on the
        main connection) never queue behind them."""
        bulk = [r for r in self._wanted if r.bulk]
        if not bulk:
            return None
        routes = Routes()
        deliver = self._deliver
        for route in bulk:
            routes.add(route.topic_filter, lambda t, p, r: deliver(Message(t, p, r)))
        s = self.settings
        ident = f"{self.client_id}-in"
        extra = {} if self.ingest_max_waiting is None else {"max_waiting": self.ingest_max_waiting}
        return await IngestConnection.open(
            host=node[0],
            port=node[1],
            client_id=ident,
            routes=routes,
            filters=[(r.topic_filter, r.qos) for r in bulk],
            barrier_topic=self.topics.barrier(ident),
            stats=self.ingest_stats,
            keepalive=s.keepalive,
            username=s.username,
            password=s.password,
            ssl_context=tls_context(s),
            timeout=s.connect_timeout,
            protocol=s.protocol,
            **extra,
        )

    async def _subscribe(
        self, connection: transport.Session, only: Sequence[Subscription] | None = None
    ) -> None:
        """SUBSCRIBE the main connection's subscriptions (``only``: those) in one packet."""
        wanted = [
            transport.Subscription(r.topic_filter, r.qos, r.no_local)
            for r in (self._wanted if only is None else only)
            if not r.bulk
        ]
        try:
            async with asyncio.timeout(self.publish_timeout):
                await connection.subscribe(wanted)
        except TimeoutError as exc:
            raise BrokerUnavailable(f"no SUBACK within {self.publish_timeout:g}s") from exc
        except transport.SubscriptionRefused as exc:
            raise BrokerUnavailable(
                f"the broker refused the subscription to {exc.topic_filter!r}"
                f" (code {exc.code:#x}): the broker's ACL does not allow it to this client,"
                " or a clustered engine cannot serve it yet (NATS refuses QoS 1"
                " subscriptions while it elects stream leaders after a node died);"
                " reconnecting to try again"
            ) from exc
        except transport.TransportError as exc:
            raise BrokerUnavailable(f"subscribing: {exc}") from exc

    async def _pump(self, connection: transport.Session) -> None:
        """Hand every message of the main connection over, in order, until it is lost."""
        deliver, barrier = self._deliver, self._barrier_topic
        try:
            while True:
                for m in await connection.take(BATCH):
                    if m.topic == barrier:
                        self._barrier_arrived(m.payload)
                    else:
                        deliver(Message(m.topic, m.payload, m.retain))
                await asyncio.sleep(0)  # let the engines and their publications run
        except transport.TransportError as exc:
            raise BrokerUnavailable(f"connection lost: {exc}") from exc


async def read_retained(
    settings: BrokerSettings, topics: Topics, client_id: str, topic_filter: str, timeout: float
) -> list[Message]:
    """Every message retained under ``topic_filter``, read once through a plain (not
    shared) subscription of a short-lived client, up to a marker published behind them.

    For a controller whose live subscription is shared: the broker sends retained
    messages to no member of a shared subscription. Broker trouble is BrokerUnavailable.
    """
    ident = f"{client_id}-r{secrets.token_hex(2)}"
    marker = topics.barrier(ident)
    found: list[Message] = []
    connection: transport.Session | None = None
    failures: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            for node in nodes(settings):
                try:
                    connection = await transport.Session.open(
                        transport_settings(settings, ident, node)
                    )
                    break
                except transport.TransportError as exc:
                    failures.append(str(exc))
            if connection is None:
                raise BrokerUnavailable("; ".join(failures))
            await connection.subscribe([topic_filter, marker])
            await connection.publish(marker, b"x", qos=1)
            while True:
                for m in await connection.take(BATCH):
                    if m.topic == marker:
                        return found
                    if m.retain:
                        found.append(Message(m.topic, m.payload, True))
    except (transport.TransportError, TimeoutError) as exc:
        raise BrokerUnavailable(f"reading the retained {topic_filter}: {exc}") from exc
    finally:
        if connection is not None:
            connection.close()


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
