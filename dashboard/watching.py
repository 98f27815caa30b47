"""The dashboard's MQTT side: it subscribes and never publishes anything but its own barrier.

:class:`Watcher` keeps one connection (reconnecting with a backoff) subscribed to the
retained operator topics (group status, drift, rollout, ring gates, repository status) and
the events, feeds each message to :class:`~setpoint.dashboard.fleet.Fleet` and wakes the
pages' live streams through :class:`Changes`. :func:`fetch_retained` reads a few retained
topics once (the device page's bundles and report), over a short connection of its own,
and returns when a barrier message it sent has come back: every retained message is then in.

aiomqtt's exceptions stop here: above this module there is only :class:`BrokerUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Final

import aiomqtt

from setpoint.kit import brokers
from setpoint.kit.backoff import Backoff, Retry
from setpoint.kit.brokers import BrokerSettings
from setpoint.proto.topics import Topics

from .fleet import Change, Fleet

FETCH_TIMEOUT = 5.0
BACKOFF: Final = Backoff(0.2, 5.0)


class BrokerUnavailable(Exception):
    """The broker could not be reached or did not answer in time."""


_REFUSED_VERSION = frozenset({1, 132})  # CONNACK: 3.1.1's "unacceptable version"; 5's "unsupported"


def client(
    broker: BrokerSettings, identifier: str, host: str, port: int, protocol: str
) -> aiomqtt.Client:
    """An MQTT client of ``broker`` on one node, for one protocol (not connected yet)."""
    tls = (
        aiomqtt.TLSParameters(ca_certs=broker.ca, certfile=broker.cert, keyfile=broker.key)
        if broker.tls
        else None
    )
    return aiomqtt.Client(
        host,
        port,
        identifier=identifier,
        username=broker.username,
        password=broker.password,
        protocol=aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311,
        tls_params=tls,
        timeout=FETCH_TIMEOUT,
    )


@contextlib.asynccontextmanager
async def connected(broker: BrokerSettings, identifier: str) -> AsyncIterator[aiomqtt.Client]:
    """A connected client: each node in turn, each with MQTT 5 then 3.1.1 (``auto``);
    BrokerUnavailable naming every failure if none answers."""
    protocols = ("5", "3.1.1") if broker.protocol == "auto" else (broker.protocol,)
    failures: list[str] = []
    for host, port in ((broker.host, broker.port), *broker.others):
        for protocol in protocols:
            mqtt = client(broker, identifier, host, port, protocol)
            try:
                await mqtt.__aenter__()
            except aiomqtt.MqttError as exc:
                failures.append(f"{host}:{port} (MQTT {protocol}): {exc}")
                code = getattr(exc, "rc", None)
                if int(getattr(code, "value", code) or 0) in _REFUSED_VERSION:
                    continue  # try the older protocol on the same node
                break
            try:
                yield mqtt
            finally:
                with contextlib.suppress(aiomqtt.MqttError):
                    await mqtt.__aexit__(None, None, None)
            return
    raise BrokerUnavailable("; ".join(failures))


class Changes:
    """Wakes every live stream when the fleet changed; each stream decides if it cares."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Queue[Change]] = set()

    def publish(self, change: Change) -> None:
        for queue in self._waiters:
            if queue.qsize() < 1000:  # a stalled browser must not make us hoard memory
                queue.put_nowait(change)

    @contextlib.contextmanager
    def listen(self) -> Iterator[asyncio.Queue[Change]]:
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._waiters.add(queue)
        try:
            yield queue
        finally:
            self._waiters.discard(queue)

    @property
    def listeners(self) -> int:
        return len(self._waiters)


class Watcher:
    """One subscribing connection feeding ``fleet``; :meth:`run` until cancelled."""

    def __init__(self, broker: BrokerSettings, fleet: Fleet, changes: Changes) -> None:
        self.broker = broker
        self.fleet = fleet
        self.changes = changes
        self.connected = asyncio.Event()
        self.error = ""
        self.topics = fleet.topics

    def filters(self) -> list[tuple[str, int]]:
        t = self.topics
        return [
            (t.all_group_status(), 0),
            (t.all_drift(), 0),
            (t.all_group_rollout(), 0),
            (t.all_ring_gates(), 0),
            (t.repository_status(), 0),
            (t.all_events(), 1),
        ]

    async def run(self, clock: Callable[[], float] = time.time) -> None:
        retry = Retry(BACKOFF)
        while True:
            identifier = f"setpoint-dashboard-{secrets.token_hex(4)}"
            try:
                async with connected(self.broker, identifier) as client:
                    await client.subscribe(self.filters())
                    self.connected.set()
                    self.error = ""
                    retry.reset()
                    async for message in client.messages:
                        payload = message.payload
                        data = payload if isinstance(payload, bytes) else str(payload).encode()
                        change = self.fleet.take(message.topic.value, data, clock())
                        if change is not None:
                            self.changes.publish(change)
            except (aiomqtt.MqttError, BrokerUnavailable) as exc:
                self.connected.clear()
                self.error = str(exc) or type(exc).__name__
                if isinstance(exc, BrokerUnavailable) and self.broker.discovery:
                    await self._rediscover()
            await asyncio.sleep(retry.next())

    async def _rediscover(self) -> None:
        """Every node failed and they came from DNS (``mqtt+srv://``): ask again, since a
        cluster's membership changes; keep the nodes if the lookup fails."""
        try:
            self.broker = await asyncio.to_thread(
                brokers.rediscovered, self.broker, random.SystemRandom()
            )
        except brokers.BrokerURLError as exc:
            self.error += f"; asking DNS again: {exc}"


async def fetch_retained(
    broker: BrokerSettings, topics: Topics, filters: list[str], timeout: float = FETCH_TIMEOUT
) -> dict[str, bytes]:
    """Every retained message under ``filters``, once all of them have arrived."""
    identifier = f"setpoint-dashboard-fetch-{secrets.token_hex(4)}"
    barrier = topics.barrier(identifier)
    mark = secrets.token_hex(8).encode()
    found: dict[str, bytes] = {}
    try:
        async with asyncio.timeout(timeout), connected(broker, identifier) as client:
            await client.subscribe([(f, 0) for f in filters] + [(barrier, 0)])
            await client.publish(barrier, mark, qos=0)
            async for message in client.messages:
                payload = message.payload
                data = payload if isinstance(payload, bytes) else b""
                if message.topic.value == barrier:
                    if data == mark:
                        return found
                elif data:
                    found[message.topic.value] = data
    except (aiomqtt.MqttError, TimeoutError) as exc:
        raise BrokerUnavailable(f"reading {', '.join(filters)}: {exc or 'timed out'}") from None
    raise BrokerUnavailable("the broker closed the connection")
