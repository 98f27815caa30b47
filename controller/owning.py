"""A shard owner: the drift part of the controller, for the report shards this replica owns.

Replicas that split the report shards (``docs/decisions/0009-report-shards.md``) each run
one :class:`ShardOwner`, leader or not. The replica's :class:`~.sharding.ShardLeases`
decides which shards it owns and calls :meth:`ShardOwner.own` whenever that changes; the
owner then serves exactly those shards, on a connection of its own (a
:class:`~.broker.Link`):

* **In.** ``Topics.shard_filters(owned)`` (reports and presence of its shards, on the
  link's bulk ingest connection), the leader's retained bundles (``groups/+/desired``,
  ``devices/+/desired``, verified with the replica's own keys by a
  :class:`~.retained.RetainedView`: the desired side, worked out as the leader's engine
  does after a restart; nothing is rendered), and ``devices/+/drift`` (the ``previous``
  of each decision; the engine keeps its own shards' statuses only).
* **Decide.** A :class:`~.drifting.DriftEngine` with ``shards=owned`` and no group
  summaries (the leader keeps those, from every device's retained status): it decides
  only the devices of the owned shards.
* **Out.** Through an :class:`~.executing.Executor`: drift statuses, ``drift`` events and
  signed ``reconcile`` commands, for its devices only.

**A change of the owned shards** starts a new link and a new engine for the new set: the
new engine decides nothing before its connection's retained statuses, reports and
presence have arrived (the engine's barrier, as after a restart), and a decision equal to
the retained status publishes nothing, so a handoff publishes no event for a device whose
state did not change. The old link is cancelled at once (the lease said to stop: nothing
more goes out for a shard given up). What this costs: the retained bundles and statuses
are read again at every change of the set, which happens when a replica comes or goes.

When a bundle was first published is not retained; the owner takes a bundle's
``issued_at`` for one it finds on the broker and the time it arrived for one that comes
while it runs, kept while the version stays (a refresh re-signs the same version).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from setpoint.kit import tasks
from setpoint.proto.errors import ProtocolError
from setpoint.proto.topics import Topics

from .audit import AuditLog
from .broker import (
    Backoff,
    BrokerSettings,
    Connected,
    Disconnected,
    Fact,
    Link,
    Message,
    Session,
    Subscription,
    new_client_id,
)
from .drifting import DriftEngine, DriftSettings, subscriptions
from .errors import BrokerUnavailable
from .executing import Executor
from .metrics import Metrics
from .planning import Current
from .rendering import Target
from .retained import RetainedView
from .signing import Signer

log = logging.getLogger(__name__)


class ShardOwner:
    """Serves the shards it is told to own (:meth:`own`) until cancelled (:meth:`run`)."""

    def __init__(
        self,
        broker: BrokerSettings,
        topics: Topics,
        signer: Signer,
        settings: DriftSettings,
        state_dir: Path,
        *,
        publish_timeout: float = 10.0,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._broker = broker
        self._topics = topics
        self._signer = signer
        self._listen = settings.metrics_listen
        self._settings = dataclasses.replace(
            settings, summaries=False, share=None, metrics_listen=None
        )
        # One set of metrics for every engine this owner runs (and the leader's controller
        # in this replica): served on --metrics-listen by the owner, from start to stop.
        self.metrics = Metrics()
        self._state_dir = state_dir
        self._publish_timeout = publish_timeout
        self._backoff = backoff
        self._clock = clock
        self._wanted: frozenset[str] = frozenset()
        self._changed = asyncio.Event()
        self.owned: frozenset[str] = frozenset()  # what the current link serves
        self.engine: DriftEngine | None = None  # the current one (for tests and tools)
        self.changes = 0  # how many times the owned set changed

    def own(self, shards: frozenset[str]) -> None:
        """From now on, own ``shards`` (called by the replica; returns at once)."""
        self._wanted = frozenset(shards)
        self._changed.set()

    async def run(self) -> None:
        serving: asyncio.Task[None] | None = None
        if self._listen is not None:
            port = await asyncio.to_thread(self.metrics.serve, *self._listen)
            log.info("metrics on http://%s:%d/metrics", self._listen[0] or "0.0.0.0", port)
        try:
            while True:
                waiting = asyncio.ensure_future(self._changed.wait())
                try:
                    await asyncio.wait(
                        {waiting, serving} if serving else {waiting},
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waiting.cancel()
                if serving is not None and serving.done():
                    serving.result()  # a bug in serving: raised here, the replica stops
                self._changed.clear()
                if self._wanted == self.owned:
                    continue
                if serving is not None:
                    # Stop publishing for the old set at once. A cancellation of this
                    # owner meanwhile (a replica stopping gives its shards up, then
                    # cancels the owner) is raised here, not taken for the old set's.
                    await tasks.stop(serving)
                    serving = None
                self.owned = self._wanted
                self.changes += 1
                log.info("owning report shards: %s", ",".join(sorted(self.owned)) or "none")
                if self.owned:
                    serving = asyncio.create_task(self._serve(self.owned), name="setpoint-owner")
        finally:
            if serving is not None:
                await tasks.stop(serving)
            await asyncio.to_thread(self.metrics.close)

    async def _serve(self, shards: frozenset[str]) -> None:
        await _Serving(self, shards).run()


class _Serving:
    """One owned set: a link, a retained view, an engine and the loop that runs them."""

    def __init__(self, owner: ShardOwner, shards: frozenset[str]) -> None:
        topics = owner._topics
        self._topics = topics
        self._clock = owner._clock
        settings = dataclasses.replace(owner._settings, shards=shards)
        self.engine = owner.engine = DriftEngine(
            settings, topics=topics, clock=owner._clock, metrics=owner.metrics
        )
        self._wake = asyncio.Event()
        self.retained = RetainedView(topics, owner._signer.trusted, self._wake.set)
        wanted = [
            Subscription(topics.all_group_desired()),
            Subscription(topics.all_device_desired()),
            *subscriptions(topics, settings),
        ]
        broker = dataclasses.replace(owner._broker, client_id=new_client_id("owner"))
        self.link = Link(
            broker,
            topics,
            wanted,
            self._take,
            backoff=owner._backoff,
            publish_timeout=owner._publish_timeout,
        )
        self.executor = Executor(self.link, topics, AuditLog(owner._state_dir), owner._clock)
        self.executor.signer = owner._signer
        self._current: dict[Target, Current] = {}
        self._syncs: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        linking = asyncio.create_task(self.link.run(), name="setpoint-owner-link")
        try:
            await self._loop()
        finally:
            linking.cancel()
            for task in list(self._syncs):
                task.cancel()
            await asyncio.gather(linking, *self._syncs, return_exceptions=True)

    # --- Facts in ------------------------------------------------------------------------

    def _take(self, fact: Fact) -> None:
        engine = self.engine
        if isinstance(fact, Connected):
            self.retained.reset()
            engine.connected()
            task = asyncio.get_running_loop().create_task(self._sync(fact.session))
            self._syncs.add(task)
            task.add_done_callback(self._syncs.discard)
            return
        if isinstance(fact, Disconnected):
            self.retained.reset()
            return
        assert isinstance(fact, Message)
        try:
            kind = self._topics.parse(fact.topic).kind
        except ProtocolError:
            engine.take_report(fact)  # counted (a wrong shard, or a bad topic)
            return
        if kind in ("group-desired", "device-desired"):
            self.retained.handle(fact)
        elif kind == "device-reported":
            if engine.take_report(fact):
                self._wake.set()
        elif kind == "device-presence":
            if engine.take_presence(fact):
                self._wake.set()
        elif kind == "device-drift":
            engine.take_drift(fact)

    async def _sync(self, session: Session) -> None:
        try:
            await self.link.barrier()
        except BrokerUnavailable as exc:
            session.fail(exc)
            return
        if session.lost.is_set():
            return
        self.retained.mark_synced()
        self.engine.synced()
        self._wake.set()

    # --- The loop ------------------------------------------------------------------------

    async def _loop(self) -> None:
        engine = self.engine
        tick_at = 0.0
        while True:
            timeout = None
            if engine.session_synced:
                timeout = max(0.0, tick_at - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            if not (self.retained.synced and engine.session_synced):
                continue
            self._follow_bundles()
            tick = time.monotonic() >= tick_at
            if tick:
                tick_at = time.monotonic() + max(0.05, engine.settings.tick)
            try:
                await self.executor.carry_out_all(engine.decide(tick=tick), engine.done)
                engine.summaries()  # none: the leader keeps them (ends the pass's half)
            except BrokerUnavailable as exc:
                log.warning("owner: publishing interrupted: %s (resuming after reconnect)", exc)
                engine.interrupted()
                continue
            await engine.passed()

    def _follow_bundles(self) -> None:
        """The desired side from the retained bundles: only the targets that moved."""
        changed = self.retained.take_changed()
        entries = self.retained.entries
        targets = set(entries) | set(self._current) if changed is None else changed
        if not targets:
            return
        now = self._clock()
        for target in targets:
            entry = entries.get(target)
            bundle = entry.bundle if entry is not None else None
            before = self._current.get(target)
            if bundle is None:
                self._current.pop(target, None)
            elif before is None or before.bundle.version != bundle.version:
                since = now if self.retained.synced and changed is not None else bundle.issued_at
                self._current[target] = Current(bundle, published_at=float(since))
            elif before.bundle != bundle:
                self._current[target] = Current(bundle, published_at=before.published_at)
        self.engine.retained_moved(None if changed is None else targets, dict(self._current))
