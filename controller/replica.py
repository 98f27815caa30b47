"""Controller replicas: run the controller only while this replica holds the lead.

``setpoint controller --lease SECONDS`` starts a replica. It keeps one small MQTT
connection of its own for the retained leader record (``proto.leader``) and feeds what it
receives, and the passing time, into :class:`~setpoint.controller.leadership.Lease`, which
decides; this module only carries the decisions out: it publishes the records the lease
asks for (signed by the controller's :class:`~setpoint.controller.signing.Signer`), starts
the whole controller when the replica takes the lead and cancels it the moment the lease
says to step down. A follower publishes no bundle and no status of the fleet's (with the
drift engine it does own report shards: below).

The controller that starts on a takeover begins as every controller does after a restart:
it reads the retained bundles on the broker (the previous leader's publications among
them), so versions keep rising from what the fleet actually holds.

**Shards.** With a :class:`~setpoint.controller.owning.ShardOwner` (``--lease`` with the
drift engine), every replica, leader or not, also keeps the shard leases and its membership
record on the same connection (:class:`~setpoint.controller.sharding.ShardLeases`
decides), and tells the owner which report shards it owns whenever that changes: the owner
decides the drift of those shards' devices, and the leader's controller summarises the
groups from every device's retained status (``docs/decisions/0009-report-shards.md``).
A replica that stops cleanly gives its shards up at once and clears its membership record.

**Stopping.** On SIGTERM a replica stops within lease/2 plus the unwinding of its
cancelled tasks, whatever the broker does: it waits lease/2 at most for the release of its
shards to be acknowledged, then cancels and waits for every task of its own, the
controllers that stepped down before included (a controller that steps down ends in the
background, and the next one starts once it has ended: one at a time holds the state
directory).

The lease's connection is not on a hot path (a record every third of a lease): a session
of the project's transport (:mod:`setpoint.transport`) speaking MQTT 3.1.1, which every
engine carries, to the nodes of ``--broker`` in turn. The transport's exceptions stop here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from setpoint import transport
from setpoint.kit import tasks
from setpoint.kit.backoff import Backoff, Retry
from setpoint.proto import envelopes, leader
from setpoint.proto.errors import ProtocolError
from setpoint.proto.topics import SHARDS, Topics

from .broker import BrokerSettings, nodes, transport_settings
from .leadership import Lead, Lease, Publish, StepDown
from .owning import ShardOwner
from .sharding import Disown, Own, PublishMembership, PublishShard, ShardAction, ShardLeases
from .signing import Signer

log = logging.getLogger("setpoint.controller.replica")


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    replica_id: str
    lease: float


class Replica:
    """One replica: follows the leader record, and runs ``lead()`` while it leads."""

    def __init__(
        self,
        broker: BrokerSettings,
        topics: Topics,
        signer: Signer,
        settings: ReplicaSettings,
        lead: Callable[[], Coroutine[Any, Any, None]],
        clock: Callable[[], float] = time.monotonic,
        owner: ShardOwner | None = None,
    ) -> None:
        self._broker = broker
        self._topics = topics
        self._topic = topics.controller_leader()
        self._owner = owner
        self.shards = ShardLeases(settings.replica_id, settings.lease, clock()) if owner else None
        self._signer = signer
        self._settings = settings
        self._lead = lead
        self._clock = clock
        self.lease = Lease(settings.replica_id, settings.lease, clock())
        self._client: transport.Session | None = None
        self._leading: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # controllers told to step down
        self._wake = asyncio.Event()
        self._failed: asyncio.Future[None] | None = None

    async def run(self) -> None:
        """Follow, claim and lead until cancelled."""
        log.info(
            "replica %s: following the leader record on %s (lease %gs)",
            self._settings.replica_id,
            self._topic,
            self._settings.lease,
        )
        self._failed = asyncio.get_running_loop().create_future()
        ticking = asyncio.create_task(self._tick_forever(), name="setpoint-lease-ticks")
        connecting = asyncio.create_task(self._connect_forever(), name="setpoint-lease-link")
        running = [ticking, connecting]
        if self._owner is not None:
            owning = asyncio.create_task(self._owner.run(), name="setpoint-shard-owner")
            owning.add_done_callback(self._leader_ended)  # it ends only by an error
            running.append(owning)
        try:
            await asyncio.wait({connecting, self._failed}, return_when=asyncio.FIRST_COMPLETED)
            if self._failed.done():
                self._failed.result()  # the controller's own error, raised here
        finally:
            # Nothing here waits on the broker for more than lease/2, and every task is
            # cancelled and waited for, the controllers that stepped down before included
            # (none is left to asyncio.run, which would wait for it without a word).
            ticking.cancel()
            self._stop_leading("shutting down")
            await self._give_up_shards()
            for task in running:
                task.cancel()
            await asyncio.gather(*running, *self._stopping, return_exceptions=True)

    async def _connect_forever(self) -> None:
        backoff = Retry(Backoff(0.2, 5.0))
        s = self._broker
        ident = f"setpoint-replica-{self._settings.replica_id}"
        node = 0
        while True:
            where = nodes(s)[node % len(nodes(s))]
            settings = dataclasses.replace(
                transport_settings(s, ident, where),
                protocol="3.1.1",
                keepalive=max(2, int(self._settings.lease / 2)),
            )
            try:
                session = await transport.Session.open(settings)
                try:
                    backoff.reset()
                    self._client = session
                    wanted = [self._topic]
                    if self.shards is not None:
                        wanted += [
                            self._topics.all_controller_shards(),
                            self._topics.all_controller_replicas(),
                        ]
                    await session.subscribe([transport.Subscription(t, qos=1) for t in wanted])
                    while True:
                        for message in await session.take():
                            self._route(message.topic, message.payload)
                finally:
                    self._client = None
                    session.close()
            except transport.TransportError as exc:
                log.warning("replica: leader record connection to %s:%s: %s", *where, exc)
                if not isinstance(exc, transport.SubscriptionRefused):
                    node += 1  # the next node of --broker, if there are several
            await asyncio.sleep(backoff.next())

    def _route(self, topic: str, payload: bytes) -> None:
        if topic == self._topic:
            self._take(payload)
            return
        if self.shards is None:
            return
        shard = topic.removeprefix(self._topics.all_controller_shards()[:-1])
        if shard != topic:
            if shard in SHARDS and payload:
                record = self._verified(payload, envelopes.SHARD_LEASE_TYPE, topic)
                if record is not None:
                    self._carry_out_shards(self.shards.shard_received(shard, record, self._clock()))
            return
        replica = topic.removeprefix(self._topics.all_controller_replicas()[:-1])
        if replica == topic:
            return
        if not payload:
            self.shards.member_gone(replica)  # it stopped cleanly
            return
        member = self._verified(payload, envelopes.REPLICA_TYPE, topic)
        if member is not None and member.holder == replica:
            self.shards.member_received(member, self._clock())

    def _verified(
        self, payload: bytes, payload_type: str, topic: str
    ) -> leader.LeaderRecord | None:
        try:
            verified = envelopes.verify_signed(
                payload, self._signer.trusted, payload_type=payload_type
            )
            return leader.decode(verified.payload)
        except ProtocolError as exc:
            log.warning("replica: ignored a record on %s that is not ours: %s", topic, exc)
            return None

    def _take(self, payload: bytes) -> None:
        if not payload:
            return  # cleared: nothing to follow
        try:
            verified = envelopes.verify_signed(
                payload, self._signer.trusted, payload_type=envelopes.LEADER_TYPE
            )
            record = leader.decode(verified.payload)
        except ProtocolError as exc:
            log.warning("replica: ignored a leader record that is not ours: %s", exc)
            return
        self._carry_out(self.lease.received(record, self._clock()))

    async def _tick_forever(self) -> None:
        while True:
            self._carry_out(self.lease.tick(self._clock()))
            if self.shards is not None:
                self._carry_out_shards(self.shards.tick(self._clock()))
            self._wake.clear()
            now = self._clock()
            due = self.lease.due_in(now)
            if self.shards is not None:
                due = min(due, self.shards.due_in(now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), due)

    def _carry_out_shards(self, actions: list[ShardAction]) -> None:
        """Publish the records the shard leases ask for; tell the owner what it owns now
        (a shard given up first: it stops publishing before its release goes out)."""
        assert self.shards is not None and self._owner is not None
        if any(isinstance(a, (Own, Disown)) for a in actions):
            for action in actions:
                if isinstance(action, Own):
                    log.info("replica %s owns shard %s", self._settings.replica_id, action.shard)
                elif isinstance(action, Disown):
                    log.info(
                        "replica %s gives shard %s up: %s",
                        self._settings.replica_id,
                        action.shard,
                        action.reason,
                    )
            self._owner.own(self.shards.owned)
        for action in actions:
            if isinstance(action, PublishShard):
                self._send(
                    self._topics.controller_shard(action.shard),
                    self._signer.sign_leader(action.record, envelopes.SHARD_LEASE_TYPE),
                )
            elif isinstance(action, PublishMembership):
                self._send(
                    self._topics.controller_replica(self._settings.replica_id),
                    self._signer.sign_leader(action.record, envelopes.REPLICA_TYPE),
                )
        self._wake.set()

    async def _give_up_shards(self) -> None:
        """Stopping cleanly: release every owned shard and clear the membership record, so
        that the others take the shards over without waiting for the leases to run out."""
        client = self._client
        if self.shards is None or self._owner is None:
            return
        actions = self.shards.release_all(self._clock())
        self._owner.own(frozenset())
        if not client:
            return
        messages = [
            (self._topics.controller_shard(a.shard),
             self._signer.sign_leader(a.record, envelopes.SHARD_LEASE_TYPE))
            for a in actions
            if isinstance(a, PublishShard)
        ]  # fmt: skip
        messages.append((self._topics.controller_replica(self._settings.replica_id), b""))

        async def publish() -> None:
            with contextlib.suppress(transport.TransportError):
                acks = [await client.publish(t, p, qos=1, retain=True) for t, p in messages]
                await asyncio.gather(*acks)  # the broker has them: the others will see them

        # Not asyncio.timeout: in a task already cancelled (a shutdown) it ends with that
        # CancelledError, not TimeoutError, and the rest of the shutdown would be skipped.
        publishing = asyncio.create_task(publish(), name="setpoint-shards-release")
        await asyncio.wait({publishing}, timeout=self._settings.lease / 2)
        if not publishing.done():
            log.warning("replica: the release of the shards not acknowledged in time")
        await tasks.stop(publishing)

    def _carry_out(self, actions: list[Publish | Lead | StepDown]) -> None:
        for action in actions:
            if isinstance(action, Publish):
                self._publish(action.record)
            elif isinstance(action, Lead):
                log.info("replica %s leads (term %d)", self._settings.replica_id, action.term)
                self._leading = asyncio.create_task(
                    self._lead_after(set(self._stopping)), name="setpoint-leader"
                )
                self._leading.add_done_callback(self._leader_ended)
            else:
                log.warning("replica %s steps down: %s", self._settings.replica_id, action.reason)
                self._stop_leading(action.reason)
        self._wake.set()

    def _publish(self, record: leader.LeaderRecord) -> None:
        self._send(self._topic, self._signer.sign_leader(record))

    def _send(self, topic: str, payload: bytes) -> None:
        client = self._client
        if client is None:
            return  # not connected: the renewal is not confirmed, the lease runs out

        async def send() -> None:
            with contextlib.suppress(transport.TransportError):
                await client.publish(topic, payload, qos=1, retain=True)

        asyncio.get_running_loop().create_task(send())

    def _leader_ended(self, task: asyncio.Task[None]) -> None:
        """The controller ended without being told to: the replica stops with its error
        (a replica that kept renewing the lead without a controller would hold the fleet)."""
        if task.cancelled() or self._failed is None or self._failed.done():
            return
        error = task.exception() or RuntimeError("the controller stopped by itself")
        self._failed.set_exception(error)

    async def _lead_after(self, stopping: set[asyncio.Task[None]]) -> None:
        """Lead once the controllers that stepped down have ended (one controller at a
        time holds the state directory)."""
        if stopping:
            await asyncio.wait(stopping)
        await self._lead()

    def _stop_leading(self, reason: str) -> None:
        """Cancel the controller; it ends in the background (``run`` waits for it)."""
        task, self._leading = self._leading, None
        if task is None:
            return
        log.info("replica %s stops leading: %s", self._settings.replica_id, reason)
        task.cancel()
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
