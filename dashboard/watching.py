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
import dataclasses
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import aiomqtt

from setpoint.kit import brokers
from setpoint.proto.topics import Topics

from .fleet import Change, Fleet

FETCH_TIMEOUT = 5.0
BACKOFF = (0.2, 5.0)


class BrokerUnavailable(Exception):
    """The broker could not be reached or did not answer in time."""


_REFUSED_VERSION = frozenset({1, 132})  # CONNACK: 3.1.1's "unacceptable version"; 5's "unsupported"


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """The broker: ``host``/``port`` and, for a cluster, the ``others`` nodes tried in turn;
    ``protocol`` is ``auto`` (MQTT 5, then 3.1.1 on an engine that refuses 5), ``5`` or
    ``3.1.1``. ``discovery`` is the ``--broker`` value when it names ``mqtt+srv://``
    domains: the nodes are asked of DNS again when every one of them failed."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    tls: bool = False
    protocol: str = "auto"
    others: tuple[tuple[str, int], ...] = ()
    discovery: str = ""

    async def rediscovered(self) -> tuple[BrokerSettings, str]:
        """These settings with the nodes DNS names now, and why not if the lookup failed
        (then the nodes are kept)."""
        try:
            entries = brokers.parse_broker_list(self.discovery)
            nodes = await asyncio.to_thread(brokers.resolve_brokers, entries, random.SystemRandom())
        except brokers.BrokerURLError as exc:
            return self, str(exc)
        first, *rest = nodes
        others = tuple((node.host, node.port) for node in rest)
        return dataclasses.replace(self, host=first.host, port=first.port, others=others), ""

    def client(self, identifier: str, host: str, port: int, protocol: str) -> aiomqtt.Client:
        tls = (
            aiomqtt.TLSParameters(ca_certs=self.ca, certfile=self.cert, keyfile=self.key)
            if self.tls
            else None
        )
        return aiomqtt.Client(
            host,
            port,
            identifier=identifier,
            username=self.username,
            password=self.password,
            protocol=aiomqtt.ProtocolVersion.V5
            if protocol == "5"
            else aiomqtt.ProtocolVersion.V311,
            tls_params=tls,
            timeout=FETCH_TIMEOUT,
        )

    @contextlib.asynccontextmanager
    async def connected(self, identifier: str) -> AsyncIterator[aiomqtt.Client]:
        """A connected client: each node in turn, each with MQTT 5 then 3.1.1 (``auto``);
        BrokerUnavailable naming every failure if none answers."""
        protocols = ("5", "3.1.1") if self.protocol == "auto" else (self.protocol,)
        failures: list[str] = []
        for host, port in ((self.host, self.port), *self.others):
            for protocol in protocols:
                client = self.client(identifier, host, port, protocol)
                try:
                    await client.__aenter__()
                except aiomqtt.MqttError as exc:
                    failures.append(f"{host}:{port} (MQTT {protocol}): {exc}")
                    code = getattr(exc, "rc", None)
                    if int(getattr(code, "value", code) or 0) in _REFUSED_VERSION:
                        continue  # try the older protocol on the same node
                    break
                try:
                    yield client
                finally:
                    with contextlib.suppress(aiomqtt.MqttError):
                        await client.__aexit__(None, None, None)
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
        delay = BACKOFF[0]
        while True:
            identifier = f"setpoint-dashboard-{secrets.token_hex(4)}"
            try:
                async with self.broker.connected(identifier) as client:
                    await client.subscribe(self.filters())
                    self.connected.set()
                    self.error = ""
                    delay = BACKOFF[0]
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
                    # Every node failed: the cluster's membership may have changed.
                    self.broker, failure = await self.broker.rediscovered()
                    if failure:
                        self.error += f"; asking DNS again: {failure}"
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF[1])


async def fetch_retained(
    broker: BrokerSettings, topics: Topics, filters: list[str], timeout: float = FETCH_TIMEOUT
) -> dict[str, bytes]:
    """Every retained message under ``filters``, once all of them have arrived."""
    identifier = f"setpoint-dashboard-fetch-{secrets.token_hex(4)}"
    barrier = topics.barrier(identifier)
    mark = secrets.token_hex(8).encode()
    found: dict[str, bytes] = {}
    try:
        async with asyncio.timeout(timeout), broker.connected(identifier) as client:
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
