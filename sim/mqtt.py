"""The simulator's MQTT connections: one :class:`setpoint.transport.Session` per device.

A simulated device does little per message, so its connection delivers every message
straight to a callback (the transport's ``on_message`` mode, no queue) and publishes
without waiting (:meth:`Connection.publish` returns the PUBACK's future, or None). MQTT 5
first, then 3.1.1 (a clustered NATS engine speaks only 3.1.1), as every component does.
The codec is gmqtt's (``docs/decisions/0008-mqtt-transport.md``); a refused subscription
is a :class:`~setpoint.transport.SubscriptionRefused` from :meth:`Connection.subscribe`,
which :class:`~.running.Swarm` retries with the kit's backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from setpoint.transport import (
    ConnectionLost,
    ConnectRefused,
    Session,
    Settings,
    Subscription,
    SubscriptionRefused,
    TransportError,
    Will,
)

__all__ = [
    "ConnectRefused",
    "Connection",
    "ConnectionLost",
    "SubscriptionRefused",
    "TransportError",
    "open_connection",
]

OnMessage = Callable[[str, bytes, bool], None]


class Connection:
    """One device's connection (see the module docstring)."""

    __slots__ = ("_on_lost", "client_id", "session")

    def __init__(
        self,
        client_id: str,
        session: Session,
        on_lost: Callable[[Connection, Exception | None], None] | None,
    ) -> None:
        self.client_id = client_id
        self.session = session
        self._on_lost = on_lost
        session.lost.add_done_callback(self._lost)

    def _lost(self, lost: asyncio.Future[TransportError]) -> None:
        if self._on_lost is not None:
            self._on_lost(self, None if self.session._closing else lost.result())

    @property
    def connected(self) -> bool:
        return self.session.connected

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, wait: bool = False
    ) -> asyncio.Future[None] | None:
        """Publish now; with ``wait`` and QoS 1, the PUBACK's future. None if not connected
        (a device that lost its connection publishes again after it is back)."""
        try:
            done = self.session.publish_nowait(topic, payload, qos=qos, retain=retain)
        except TransportError:
            return None
        return done if wait and qos else None

    def subscribe(self, filters: Iterable[tuple[str, int]]) -> asyncio.Future[list[int]]:
        """Subscribe; the future gives the granted QoS per filter, or raises
        :class:`SubscriptionRefused` (or another :class:`TransportError`)."""
        wanted = [Subscription(f, q) for f, q in filters]
        future = asyncio.ensure_future(self.session.subscribe(wanted))
        future.add_done_callback(_retrieved)  # a caller that does not look is not warned
        return future

    def unsubscribe(self, filters: Iterable[str]) -> None:
        with contextlib.suppress(TransportError):
            self.session.unsubscribe(list(filters))

    def ping(self) -> bool:
        try:
            self.session.ping()
        except TransportError:
            return False
        return True

    def disconnect(self) -> None:
        """A clean DISCONNECT: the broker discards the will."""
        self.session.close()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker publishes the will."""
        self.session.abort()


async def open_connection(
    host: str,
    port: int,
    client_id: str,
    *,
    keepalive: int = 60,
    will: tuple[str, bytes, int, bool] | None = None,
    username: str | None = None,
    password: str | None = None,
    on_message: OnMessage | None = None,
    on_lost: Callable[[Connection, Exception | None], None] | None = None,
    timeout: float = 10.0,
    protocol: str = "auto",
) -> Connection:
    """Connect and wait for the CONNACK (a :class:`TransportError` on refusal or timeout);
    ``will`` is ``(topic, payload, qos, retain)``."""
    settings = Settings(
        host, port, client_id, protocol=protocol,  # type: ignore[arg-type]
        username=username, password=password, keepalive=keepalive, connect_timeout=timeout,
        will=Will(*will) if will is not None else None,
    )  # fmt: skip
    session = await Session.open(settings, on_message or _ignore)
    _slim(session)
    return Connection(client_id, session, on_lost)


def _slim(session: Session) -> None:
    """Give back what a connected device never uses again (~2.3 KB of its ~19 KB).

    An :class:`asyncio.Event` owns a deque of waiters (~760 bytes with its first block)
    from birth. Three of gmqtt's per connection are only waited on while connecting: the
    client's ``_connack_received`` and ``_connection_lost`` (``connect()``) and the
    protocol's ``_connected`` (the start of its read loop). Once connected, they are only
    set and cleared, which iterates their waiters: an empty tuple does, and a wait (which
    nothing does any more) would fail loudly instead of hanging. Where
    the rest goes is in ``docs/performance.md`` ("The simulator's memory per device").
    """
    client = session._client
    connection = client._connection if client is not None else None
    if connection is None:
        return
    for event in (
        client._connack_received,
        client._connection_lost,
        connection._protocol._connected,
    ):
        if not event._waiters:
            event._waiters = ()


def _retrieved(future: asyncio.Future[list[int]]) -> None:
    if not future.cancelled():
        future.exception()


def _ignore(topic: str, payload: bytes, retain: bool) -> None:
    pass
