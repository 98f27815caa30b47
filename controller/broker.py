r"""The controller's one MQTT connection, kept alive: connect, subscribe, pump, reconnect.

aiomqtt does not reconnect by itself, so :class:`Link` runs the loop: connect (MQTT 5,
falling back to 3.1.1 if the broker refuses it), subscribe its :class:`Subscription`\ s in
one SUBSCRIBE, and deliver what happens as facts to its one ``deliver`` function, in
order: :class:`Connected` (the session is live, nothing of it delivered yet), each
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

Subscriptions marked ``bulk`` (device reports and presence: floods) are not taken in through
aiomqtt but through a lean MQTT 3.1.1 receive connection of the same session
(:mod:`.ingesting`, with backpressure), opened after the main one subscribed; a session
ends, and both reconnect, when either breaks. The barrier covers both: a nonce goes out
and comes back on each.

aiomqtt's and paho's exceptions stop here; above this module there is only
``BrokerUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.subscribeoptions import SubscribeOptions

from setpoint.kit.backoff import Backoff, Retry
from setpoint.kit.brokers import BrokerSettings
from setpoint.proto.topics import Topics

from . import ingesting
from .errors import BrokerUnavailable
from .ingesting import IngestConnection, IngestStats, Routes

__all__ = ["Backoff", "BrokerSettings"]  # the kit's, named where the controller wires them

log = logging.getLogger(__name__)

MAX_INBOX_BYTES: Final = 64 * 1024 * 1024  # what the main connection may hold unread
DROP_LOG_INTERVAL: Final = 60.0
MAX_BARRIER_BYTES: Final = 64  # a nonce is 16; anything larger on the echo topic is junk
DEFAULT_BACKOFF: Final = Backoff(0.1, 10.0)
_V5_REFUSED: Final = {1, 132}  # 3.1.1 "unacceptable protocol version"; 5 "unsupported"


@dataclass(frozen=True, slots=True)
class Message:
    """An incoming message, free of aiomqtt's types."""

    topic: str
    payload: bytes
    retain: bool


def new_client_id(role: str = "controller") -> str:
    return f"setpoint-{role}-{secrets.token_hex(4)}"


class _Inbox(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's queue of incoming messages, with a byte budget: aiomqtt reads the socket
    whatever the pump's pace, so a flood (an operator's 1 MiB messages on the one topic it
    may write) would pile up here without end. Past ``MAX_INBOX_BYTES`` messages are
    dropped and counted (logged once a minute); the broker's own per-client caps
    (secure.conf) bound what waits on its side. A full retained read of a large fleet
    (10,000 bundles of ~2 KiB) stays far below the budget."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self.held = 0
        self.dropped = 0
        self._logged = -DROP_LOG_INTERVAL

    @staticmethod
    def _size(message: aiomqtt.Message) -> int:
        payload = message.payload
        return len(payload) if isinstance(payload, bytes | bytearray | str) else 0

    def put_nowait(self, item: aiomqtt.Message) -> None:
        size = self._size(item)
        if self.held + size > MAX_INBOX_BYTES:
            self.dropped += 1
            now = asyncio.get_running_loop().time()
            if now - self._logged >= DROP_LOG_INTERVAL:
                self._logged = now
                log.warning(
                    "dropping incoming messages: %d MiB wait unread (%d dropped so far; the"
                    " latest on %s)", self.held >> 20, self.dropped, item.topic,
                )  # fmt: skip
            return
        super().put_nowait(item)
        self.held += size

    def get_nowait(self) -> aiomqtt.Message:
        item = super().get_nowait()
        self.held -= self._size(item)
        return item


def tls_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    context = ssl.create_default_context(cafile=settings.ca)
    if settings.cert:
        context.load_cert_chain(settings.cert, settings.key)
    return context


class Session:
    """One live connection. Publishing fails fast when it breaks."""

    def __init__(self, client: aiomqtt.Client, number: int, v5: bool) -> None:
        self._client = client
        self.number = number
        self.v5 = v5
        self.lost = asyncio.Event()
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

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float
    ) -> None:
        """Publish and, for QoS 1, return once the broker acknowledged (PUBACK)."""
        if self.lost.is_set():
            raise BrokerUnavailable("not connected to the broker")
        publishing = asyncio.ensure_future(
            self._client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
        )
        losing = asyncio.ensure_future(self.lost.wait())
        try:
            done, _ = await asyncio.wait({publishing, losing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (publishing, losing):
                if not task.done():
                    task.cancel()
            await asyncio.gather(publishing, losing, return_exceptions=True)
        if publishing in done and not publishing.cancelled():
            error = publishing.exception()
            if error is None:
                return
            raise BrokerUnavailable(f"publish to {topic} failed: {error}") from error
        raise BrokerUnavailable(f"connection lost before the broker acknowledged {topic}")


@dataclass(frozen=True, slots=True)
class Subscription:
    """A topic filter the controller takes in.

    ``no_local`` (MQTT 5) skips this client's own publications. ``bulk`` takes it in
    through the lean ingest connection (for floods: device reports and presence). Its
    filter must end in a literal level, which routes it (``devices/+/reported``, also as
    ``$share/<name>/...``); QoS 0 or 1, and no ``no_local`` (MQTT 3.1.1 has none).

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
        self._v5 = True
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

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish on the current session; BrokerUnavailable if there is none or it breaks."""
        session = self._session
        if session is None:
            raise BrokerUnavailable("not connected to the broker")
        await session.publish(topic, payload, qos=qos, retain=retain, timeout=self.publish_timeout)

    async def barrier(self, timeout: float | None = None) -> None:
        """Return once every message the broker sent before this call has been handled."""
        nonce = secrets.token_hex(8).encode("ascii")
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[nonce] = arrived
        ingest = self._ingest
        try:
            if ingest is not None:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(ingest.barrier(timeout or self.publish_timeout))
                    tg.create_task(self._main_barrier(nonce, arrived, timeout))
            else:
                await self._main_barrier(nonce, arrived, timeout)
        except* BrokerUnavailable as group:
            raise _first(group) from None
        finally:
            self._barriers.pop(nonce, None)

    async def _main_barrier(
        self, nonce: bytes, arrived: asyncio.Future[None], timeout: float | None
    ) -> None:
        try:
            await self.publish(self.topics.barrier(self.client_id), nonce, qos=1)
            async with asyncio.timeout(timeout or self.publish_timeout):
                await arrived
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"the broker did not echo the barrier message; check that this client may"
                f" publish and subscribe to {self.topics.barrier(self.client_id)!r}"
            ) from exc

    def _barrier_arrived(self, message: Message) -> None:
        if len(message.payload) > MAX_BARRIER_BYTES:
            return  # not one of our nonces: nothing to look up
        arrived = self._barriers.get(message.payload)
        if arrived is not None and not arrived.done():
            arrived.set_result(None)

    # --- The loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect; forever (until cancelled)."""
        while True:
            try:
                await self._serve()
            except* BrokerUnavailable as group:
                log.warning("broker %s: %s", self.settings.url(), _first(group))
                self.failures += 1
                self.failed.set()
            finally:
                session = self._session
                self._set_session(None)
                if session is not None:
                    session.lost.set()
                self._deliver(Disconnected())
            delay = self._backoff.next()
            log.info("reconnecting to %s in %.1fs", self.settings.url(), delay)
            await asyncio.sleep(delay)

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        client = aiomqtt.Client(
            s.host,
            s.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if self._v5 else aiomqtt.ProtocolVersion.V311,
            username=s.username,
            password=s.password,
            tls_context=tls_context(s),
            keepalive=s.keepalive,
            timeout=s.connect_timeout,
            max_inflight_messages=100,
            queue_type=_Inbox,
            # Small messages that wait for an answer: Nagle would add ~40 ms to each.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            logger=logging.getLogger("setpoint.controller.mqtt"),
        )
        client.pending_calls_threshold = 10_000
        return client

    async def _serve(self) -> None:
        client = self._client()
        try:
            async with client:
                self._backoff.reset()
                self._sessions += 1
                session = Session(client, self._sessions, self._v5)
                log.info(
                    "connected to %s as %s (MQTT %s)",
                    self.settings.url(),
                    self.client_id,
                    "5" if self._v5 else "3.1.1",
                )
                granted = await client.subscribe(
                    self._subscriptions(), timeout=self.publish_timeout
                )
                self._check_granted(granted)
                ingest = await self._open_ingest()
                self._ingest = ingest
                self._set_session(session)
                self._deliver(Connected(session))
                try:
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._pump(client, session), name="mqtt-pump")
                        if ingest is not None:
                            tg.create_task(ingest.serve(), name="mqtt-ingest")
                        tg.create_task(session.failure(), name="mqtt-session-failure")
                finally:
                    session.lost.set()
                    self._ingest = None
                    if ingest is not None:
                        ingest.close()
        except MqttConnectError as exc:
            code = exc.rc if isinstance(exc.rc, int) else getattr(exc.rc, "value", None)
            if self._v5 and code in _V5_REFUSED:
                log.info("broker refused MQTT 5; using MQTT 3.1.1")
                self._v5 = False
                self._backoff.reset()
            raise BrokerUnavailable(f"connection refused: {exc}") from exc
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(str(exc) or exc.__class__.__name__) from exc

    async def _open_ingest(self) -> IngestConnection | None:
        """The session's lean receive connection for the bulk routes (None if there are
        none); same broker, credentials and TLS as the main connection."""
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
            host=s.host,
            port=s.port,
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
            **extra,
        )

    def _main_routes(self) -> list[Subscription]:
        return [r for r in self._wanted if not r.bulk]

    def _subscriptions(self) -> list[tuple[str, Any]]:
        if self._v5:
            return [
                (r.topic_filter, SubscribeOptions(qos=r.qos, noLocal=r.no_local))
                for r in self._main_routes()
            ]
        return [(r.topic_filter, r.qos) for r in self._main_routes()]

    def _check_granted(self, granted: object) -> None:
        codes = list(granted) if isinstance(granted, list | tuple) else []
        for route, code in zip(self._main_routes(), codes, strict=False):
            value = int(getattr(code, "value", code))
            if value >= 0x80:
                raise BrokerUnavailable(
                    f"the broker refused the subscription to {route.topic_filter!r}"
                    f" (code {value:#x}): the broker's ACL does not allow it to this client,"
                    " or a clustered engine cannot serve it yet (NATS refuses QoS 1"
                    " subscriptions while it elects stream leaders after a node died);"
                    " reconnecting to try again"
                )

    async def _pump(self, client: aiomqtt.Client, session: Session) -> None:
        try:
            async for raw in client.messages:
                payload = raw.payload
                if isinstance(payload, str):
                    payload = payload.encode("utf-8")
                elif not isinstance(payload, bytes | bytearray):
                    payload = b"" if payload is None else str(payload).encode("utf-8")
                message = Message(str(raw.topic), bytes(payload), bool(raw.retain))
                if message.topic == self._barrier_topic:
                    self._barrier_arrived(message)
                else:
                    self._deliver(message)
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"connection lost: {exc}") from exc
        finally:
            session.lost.set()


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
    try:
        async with aiomqtt.Client(
            settings.host,
            settings.port,
            identifier=ident,
            username=settings.username,
            password=settings.password,
            tls_context=tls_context(settings),
            timeout=settings.connect_timeout,
        ) as client:
            await client.subscribe([(topic_filter, 0), (marker, 0)])
            await client.publish(marker, b"x", qos=1)
            async with asyncio.timeout(timeout):
                async for raw in client.messages:
                    topic = str(raw.topic)
                    if topic == marker:
                        break
                    if raw.retain and isinstance(raw.payload, bytes | bytearray):
                        found.append(Message(topic, bytes(raw.payload), True))
    except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
        raise BrokerUnavailable(f"reading the retained {topic_filter}: {exc}") from exc
    return found


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
