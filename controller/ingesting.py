"""The controller's report ingest: a receive connection on the transport, with backpressure.

Devices' reports and presence are most of what the controller receives, and they come
in floods (a fleet applying a commit, a restart replaying every retained report). The
:class:`~.broker.Link` takes the routes marked ``bulk`` in through this second connection
(``docs/decisions/0005-ingest-path.md``), so that the acknowledgements of the
controller's own publications, on its main connection, never wait behind a flood:

* **On the transport.** One :class:`setpoint.transport.Session` (gmqtt underneath,
  ``docs/decisions/0008-mqtt-transport.md``): MQTT 5, then 3.1.1 if the broker refuses it;
  a clean session with the user name, password and TLS of the link's
  :class:`~.broker.BrokerSettings`; one SUBSCRIBE whose refusals are errors naming the
  filter; QoS 1 acknowledged and keepalive kept by the transport.
* **Routing by the topic's last level.** A dict from the last level of each filter
  (``reported``, ``presence``, ``barrier``) to its handler; a filter is matched level by
  level only when two filters end alike.
* **Backpressure.** Messages wait in the transport's bounded queue (``max_waiting``
  messages, and :data:`MAX_WAITING_BYTES`) for the task that hands them to the handlers
  (yielding to the event loop between batches, so the drift engine and its publications
  run). When it is full the transport stops reading the socket: the kernel's socket buffer
  and the broker hold the backlog, not the controller's heap; what gmqtt had already read
  still arrives (at most about 256 KiB beyond the bound). It reads again once the queue is
  down to a quarter. :attr:`IngestStats.high_water` is the most that ever waited.
* **Barrier.** :meth:`IngestConnection.barrier` publishes a nonce to this connection's
  private topic and waits until the handler loop reaches it: every message the broker
  sent before has then been handled.

The connection does not reconnect by itself: the link opens one per session and ends the
session (both connections, then its backoff) when this one is lost.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from setpoint.transport import Session, Settings, Subscription, TransportError

from .errors import BrokerUnavailable

log = logging.getLogger(__name__)

MAX_WAITING: Final = 4096  # messages received and not yet handled, at most
MAX_WAITING_BYTES: Final = 16 * 1024 * 1024  # and their bytes (topics and payloads)
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


class IngestConnection:
    """One session's receive connection: open, serve (hand messages over), barrier, close."""

    def __init__(
        self, session: Session, routes: Routes, barrier_topic: str, stats: IngestStats
    ) -> None:
        self.session = session
        self.routes = routes
        self.barrier_topic = barrier_topic
        self.stats = stats
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
        protocol: str = "auto",
    ) -> IngestConnection:
        """Connect, subscribe to ``filters`` and this connection's barrier topic."""
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be at least 1, got {max_waiting}")
        settings = Settings(
            host, port, client_id, protocol=protocol,  # type: ignore[arg-type]
            ssl_context=ssl_context, username=username, password=password,
            keepalive=keepalive, connect_timeout=timeout,
            max_inbound_bytes=MAX_WAITING_BYTES, max_inbound_messages=max_waiting,
        )  # fmt: skip
        try:
            session = await Session.open(settings)
        except TransportError as exc:
            raise BrokerUnavailable(f"ingest connection: {exc}") from exc
        try:
            wanted = [Subscription(f, q) for f, q in filters]
            async with asyncio.timeout(timeout):
                await session.subscribe([*wanted, Subscription(barrier_topic, 0)])
        except TimeoutError as exc:
            session.close()
            raise BrokerUnavailable(f"ingest connection: no SUBACK within {timeout}s") from exc
        except TransportError as exc:
            session.close()
            raise BrokerUnavailable(f"ingest connection: {exc}") from exc
        return cls(session, routes, barrier_topic, stats)

    async def serve(self) -> None:
        """Hand the messages to the handlers until the connection is lost (raises
        :class:`BrokerUnavailable`) or cancelled."""
        session, stats = self.session, self.stats
        dispatch, barrier = self.routes.dispatch, self.barrier_topic
        pauses = 0
        try:
            while True:
                batch = await session.take(BATCH)
                stats.received += len(batch)
                for message in batch:
                    if message.topic == barrier:
                        self._barrier_arrived(message.payload)
                    else:
                        dispatch(message.topic, message.payload, message.retain)
                if session.high_water > stats.high_water:
                    stats.high_water = session.high_water
                if session.pauses != pauses:
                    stats.pauses += session.pauses - pauses
                    pauses = session.pauses
                await asyncio.sleep(0)  # let the engine and its publications run
        except TransportError as exc:
            raise BrokerUnavailable(f"ingest connection lost: {exc}") from exc

    async def barrier(self, timeout: float) -> None:
        """Return once every message the broker sent on this connection before the call
        has been handed to its handler."""
        nonce = secrets.token_hex(8).encode("ascii")
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[nonce] = arrived
        lost = self.session.lost
        try:
            async with asyncio.timeout(timeout):
                await self.session.publish(self.barrier_topic, nonce)
                await asyncio.wait({arrived, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not arrived.done():
                raise BrokerUnavailable("ingest connection lost before the barrier came back")
        except TransportError as exc:
            raise BrokerUnavailable(f"ingest connection lost: {exc}") from exc
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
        self.session.close()
