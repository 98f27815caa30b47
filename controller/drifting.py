"""The drift engine: devices' reports and presence in, drift status, group status and events out.

:class:`DriftEngine` runs inside a controller built with ``Controller(config,
drift=DriftSettings(...))``. It rides on the controller's one MQTT connection:

* **Ingest.** Routes (QoS 0, so a retained flood is never cut by the broker's queue limit)
  on ``devices/+/reported``, ``devices/+/presence``, and on ``devices/+/drift`` and
  ``groups/+/status`` (what is retained now: the ``previous`` of every decision, and what
  other engines decided). A handler only files the raw payload under the device named by
  the *topic* and marks the device dirty: a flood from one device costs one dict store per
  message, and only the latest report of each device is ever decoded (coalescing). A
  report whose body names another device is not believed.
* **Detection.** A worker wakes on every new report or presence, on every batch of
  publications (the controller calls :meth:`DriftEngine.published`: every device is
  re-evaluated against the new desired state), and on a periodic tick (pending devices
  becoming overdue, reconcile retries). It calls the pure
  :func:`~setpoint.controller.detecting.detect` for each device it has to look at and
  compares with what is retained: level-triggered, so a lost or duplicated message
  changes nothing.
* **Output, only on change.** Retained JSON drift status per device, a retained group
  summary per group, and a non-retained ``drift`` event (``opened``, ``changed``,
  ``resolved``) with the previous state and when it began.
* **Remediation.** A device of an ``enforce`` group that is drifted gets a signed
  ``reconcile`` command (rate-limited per device); ``observe`` groups are only reported.
* **Restart.** Nothing is published before the retained reports, presence and drift
  statuses have all arrived (a barrier round trip) and the controller has settled its
  desired state; decisions equal to what is retained publish nothing, so a restart makes
  no burst of events. After a reconnect, drift and group statuses the broker lost are
  published again (without events).
* **Sharing the stream.** With ``share=NAME`` the live reports come through the MQTT 5
  shared subscription ``$share/NAME/<prefix>/devices/+/reported`` (each report reaches one
  of the engines); retained reports are not delivered to shared subscriptions, so each
  engine reads them once per connection with a plain subscription on a short-lived second
  connection. Presence (rare) and drift statuses are read by every engine. Every status
  carries the ``report_seq`` it was computed from; on a re-evaluation that no message
  triggered (a publication, a tick), an engine holding an older report than the one
  behind the retained status leaves that device to the engine that has the newer one.

What it does not do: publish bundles (the controller does), or keep history.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Literal

from setpoint.proto import bundles, commands, reports, status
from setpoint.proto.bundles import Bundle
from setpoint.proto.errors import ProtocolError
from setpoint.proto.reports import Report
from setpoint.proto.status import DRIFT_STATES, DriftStatus, GroupStatus, ResourceDiff
from setpoint.proto.topics import Topics

from . import detecting
from .broker import Message, Subscription
from .detecting import ClearDrift, Desired, DriftAction, Reconcile, ShowDrift
from .errors import BrokerUnavailable
from .metrics import Metrics

if TYPE_CHECKING:
    from .executing import Executor
    from .planning import Current
    from .rendering import Target
    from .service import Publication

log = logging.getLogger(__name__)

DEFAULT_TICK: Final = 1.0
DEFAULT_RECONCILE_INTERVAL: Final = 30.0
COMMAND_TTL: Final = 300
MAX_DEVICES: Final = 100_000
PUBLISH_CONCURRENCY: Final = 64
SETTLE_TIMEOUT: Final = 30.0
Change = Literal["opened", "changed", "resolved"]
# Told every device status this engine publishes or reads (None: cleared): the controller's
# rollouts, which see them all without a second subscription (no_local hides our own).
StatusListener = Callable[[str, DriftStatus | None], None]


@dataclass(frozen=True, slots=True)
class DriftSettings:
    """How the engine runs (``setpoint controller`` flags)."""

    grace: float = detecting.DEFAULT_GRACE
    silent_after: float | None = detecting.DEFAULT_SILENT_AFTER
    tick: float = DEFAULT_TICK
    share: str | None = None
    reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL
    command_ttl: int = COMMAND_TTL
    metrics_listen: tuple[str, int] | None = None
    max_devices: int = MAX_DEVICES


@dataclass(slots=True)
class _Device:
    """Everything the engine knows about one device (mutable; owned by the engine)."""

    name: str
    raw: bytes | None = None  # the latest report not decoded yet (b"": cleared)
    arrived: float = 0.0  # wall time the latest raw report or presence arrived
    raw_at: float = 0.0  # wall time the latest raw report arrived
    live: bool = False  # a report came from the live stream (shared mode)
    report: Report | None = None
    reported_at: float | None = None
    report_error: str = ""
    presence: str | None = None
    status: DriftStatus | None = None  # what the broker retains (ours or another engine's)
    last_command: float | None = None  # monotonic
    healed: tuple[ResourceDiff, ...] = ()  # put back since the previous report we decoded
    command_seq: int = 0


@dataclass(frozen=True, slots=True)
class _Fleet:
    """The desired side, rebuilt from the controller after each batch of publications."""

    desired: dict[str, Desired] = field(default_factory=dict)
    groups: dict[str, Bundle] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)
    # Per device, the published entries its Desired was worked out from (see desired_for).
    inputs: dict[str, tuple[Any, Any, Desired]] = field(default_factory=dict)
    # The devices whose Desired differs from the previous fleet's (see desired_for).
    changed: set[str] = field(default_factory=set)


class _Tally:
    """One group's summary, kept up to date one status change at a time.

    What :func:`~setpoint.controller.detecting.summarise` computes over every member, held
    as running counts so that a pass costs what changed, not the group's size: devices per
    state (a member without a status counts as ``unknown``), members in sync on the group's
    version, and the ``since`` of pending members (a heap; stale entries are dropped when
    they reach the top).
    """

    __slots__ = ("counts", "in_sync", "members", "pending", "version")

    def __init__(self, version: int | None, members: int) -> None:
        self.version = version
        self.members = members
        self.counts: Counter[str] = Counter(unknown=members)
        self.in_sync = 0
        self.pending: list[tuple[float, str]] = []

    def move(self, name: str, old: DriftStatus | None, new: DriftStatus | None) -> None:
        for found, sign in ((old, -1), (new, 1)):
            state = found.state if found is not None else "unknown"
            self.counts[state] += sign
            if found is not None and state == "in_sync" and found.applied_version == self.version:
                self.in_sync += sign
        if new is not None and new.state == "pending":
            heapq.heappush(self.pending, (new.since, name))

    def oldest_pending(self, current: Callable[[str], DriftStatus | None]) -> float | None:
        heap = self.pending
        while heap:
            since, name = heap[0]
            found = current(name)
            if found is not None and found.state == "pending" and found.since == since:
                return since
            heapq.heappop(heap)
        return None


def change_of(previous: DriftStatus | None, new: DriftStatus) -> Change | None:
    """The drift event a status change makes, or None when it makes none.

    ``opened``: it was in sync (or new) and is not; ``resolved``: it is in sync again;
    ``changed``: another state, or the same drift on other resources. Pure.
    """
    if previous is None:
        return "changed" if new.state == "in_sync" else "opened"
    if previous.state == new.state:
        if new.state in ("drifted", "blocked") and previous.resources != new.resources:
            return "changed"
        return None
    if new.state == "in_sync":
        return "resolved"
    if previous.state == "in_sync":
        return "opened"
    return "changed"


def drift_event_fields(
    previous: DriftStatus | None, new: DriftStatus, change: Change
) -> dict[str, Any]:
    """The fields of a ``drift`` event (see ``proto/SPEC.md`` 7.3). Pure."""
    body = status.drift_to_dict(new)
    body.pop("last_seen", None)
    body["change"] = change
    body["previous"] = previous.state if previous is not None else None
    body["previous_since"] = previous.since if previous is not None else None
    return body


def healed_since(before: Report | None, after: Report) -> tuple[ResourceDiff, ...]:
    """Resources ``after`` says were put back that ``before`` did not. Pure.

    A shim keeps ``healed`` (with when and what) on a resource until the next version, so a
    new or different ``healed`` detail is a heal that happened between the two reports.
    Without a ``before`` (first report since start) nothing is new: no false drift.
    """
    if before is None:
        return ()
    old = {(r.id, r.detail) for r in before.resources if r.status == "healed"}
    return tuple(
        ResourceDiff(r.id, r.detail or "healed")
        for r in after.resources
        if r.status == "healed" and (r.id, r.detail) not in old
    )


def desired_for(published: Mapping[Any, Any], previous: _Fleet | None = None) -> _Fleet:
    """Per device, its :class:`Desired`, from the controller's published bundles. Pure.

    With the ``previous`` fleet, a device whose published entries (its own and its
    group's) are the very objects they were is not worked out again, and ``changed``
    names the devices whose Desired differs from the previous one's (added or gone
    included): those worked out again and not equal, so the caller compares no maps."""
    groups: dict[str, Any] = {}
    devices: dict[str, Any] = {}
    for target, current in published.items():
        (groups if target.kind == "group" else devices)[target.id] = current
    fleet = _Fleet(
        groups={g: c.bundle for g, c in groups.items()},
        commits={g: c.bundle.commit for g, c in groups.items()},
    )
    known = 0  # devices of ``previous`` still desired: when all are, none is gone
    for device, current in devices.items():
        bundle: Bundle = current.bundle
        group_id = bundle.group
        if group_id is None or group_id not in groups:
            continue
        group_current = groups[group_id]
        if previous is not None:
            before = previous.inputs.get(device)
            if before is not None and before[0] is current and before[1] is group_current:
                fleet.desired[device] = before[2]
                fleet.inputs[device] = before
                fleet.members.setdefault(group_id, []).append(device)
                known += 1
                continue
        group: Bundle = group_current.bundle
        newest = max((group_current, current), key=lambda c: c.published_at or 0.0)
        # A batched rollout pins the device to the group version it runs until its batch
        # is released: that is its desired group version (its content is not retained).
        pin = bundle.group_version
        held = pin is not None and pin < group.version
        fleet.desired[device] = Desired(
            device=device,
            group=group_id,
            mode=group.mode,
            group_version=pin if held and pin is not None else group.version,
            group_digest="" if held else group.content_digest(),
            device_version=bundle.version,
            device_digest=bundle.content_digest(),
            commit=newest.bundle.commit,
            resources=tuple(bundles.effective(group, bundle)),
            published_at=max(group_current.published_at or 0.0, current.published_at or 0.0),
            pinned_from=group.version if held else None,
        )
        fleet.inputs[device] = (current, group_current, fleet.desired[device])
        fleet.members.setdefault(group_id, []).append(device)
        if previous is not None:
            old = previous.desired.get(device)
            known += old is not None
            if old != fleet.desired[device]:
                fleet.changed.add(device)
    if previous is not None and known != len(previous.desired):
        fleet.changed.update(previous.desired.keys() - fleet.desired.keys())
    return fleet


def subscriptions(topics: Topics, settings: DriftSettings) -> list[Subscription]:
    """What a drift engine takes in (its controller subscribes its link to these)."""
    reported = topics.all_reported()
    if settings.share:
        reported = topics.shared(settings.share, reported)
    return [
        # Reports and presence come in floods: through the link's lean ingest connection.
        Subscription(reported, bulk=True),
        Subscription(topics.all_presence(), bulk=True),
        Subscription(topics.all_drift(), no_local=True),
        Subscription(topics.all_group_status(), no_local=True),
    ]


class DriftEngine:
    """The drift engine of one controller (``attach`` before connecting, ``run`` as a task)."""

    name = "drift"

    def __init__(
        self,
        settings: DriftSettings | None = None,
        *,
        executor: Executor | None = None,
        topics: Topics | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        on_status: StatusListener | None = None,
    ) -> None:
        self.settings = settings or DriftSettings()
        self._executor = executor
        self._topics = topics or Topics()
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._devices: dict[str, _Device] = {}
        self._dirty: set[str] = set()
        self._full = True
        self._restore = False
        self._group_status: dict[str, GroupStatus] = {}
        # Every device's status as counted in the tallies and gauges (the engine's view of
        # what is retained; kept per name so that a device dropped and seen again counts once).
        self._counted: dict[str, DriftStatus] = {}
        self._tallies: dict[str, _Tally] = {}  # per group, by desired membership
        self._member_of: dict[str, str] = {}
        self._gauge_counts: dict[str, Counter[str]] = {}  # per status group, for the gauge
        self._gauges_stale = True
        self._drift_delivered: set[str] = set()
        self._groups_delivered: set[str] = set()
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        # Set once this connection's retained statuses, reports and presence have all
        # arrived; cleared on every connect. No pass runs in between: a pass deciding on a
        # half-read picture (presence read, the retained drift status not yet) publishes a
        # change that the late retained status then undoes, and the next pass repeats it
        # (two identical events) or leaves the engine believing what the broker no longer holds.
        self._session_synced = asyncio.Event()
        self._sessions_synced = 0
        self._fleet = _Fleet()
        self._fleet_stale = True
        self._published: Mapping[Target, Current] = {}
        self._reeval: set[str] = set()  # to decide again though no message came (not triggered)
        self._groups_touched = False
        self._refused_logged: dict[str, str] = {}
        self._on_status = on_status
        self.ready = asyncio.Event()
        self.passes = 0
        self._stepped = asyncio.Condition()
        self.decoded = 0
        self.evaluations = 0  # devices decided (detect calls), for tests and benchmarks
        self.events_published = 0

    # --- Wiring ----------------------------------------------------------------------------

    def _tell(self, device: str, found: DriftStatus | None) -> None:
        if self._on_status is not None:
            self._on_status(device, found)

    async def run(self, settle: Callable[[float], Awaitable[None]]) -> None:
        """Serve metrics; once the first connection is read whole and ``settle`` (the
        controller's first pass over its desired state) returned, decide for ever."""
        listen = self.settings.metrics_listen
        if listen is not None:
            port = await asyncio.to_thread(self.metrics.serve, *listen)
            log.info("metrics on http://%s:%d/metrics", listen[0] or "0.0.0.0", port)
        try:
            await self._synced.wait()
            try:
                await settle(SETTLE_TIMEOUT)
            except TimeoutError:
                log.warning("drift: the controller has not settled; evaluating anyway")
            self._full = True
            self.ready.set()
            log.info("drift engine ready: %d devices known", len(self._devices))
            await self._working()
        finally:
            await asyncio.to_thread(self.metrics.close)

    # --- Facts in (called in the link's pump: must be quick) -------------------------------

    def _device(self, name: str) -> _Device | None:
        dev = self._devices.get(name)
        if dev is None:
            if len(self._devices) >= self.settings.max_devices:
                self._refuse(name, "too-many-devices", f"over {self.settings.max_devices} devices")
                return None
            dev = self._devices[name] = _Device(name)
        return dev

    def _name(self, message: Message, kind: str) -> str | None:
        try:
            ref = self._topics.parse(message.topic)
        except ProtocolError:
            self.metrics.reports_rejected.labels("bad-topic").inc()
            return None
        return ref.name if ref.kind == kind else None

    def _refuse(self, device: str, reason: str, detail: str) -> None:
        self.metrics.reports_rejected.labels(reason).inc()
        if self._refused_logged.get(device) != reason:  # once per device and reason in a row
            self._refused_logged[device] = reason
            log.warning("report from %s not believed (%s): %s", device, reason, detail)

    def take_report(self, message: Message, *, from_retained_read: bool = False) -> None:
        name = self._name(message, "device-reported")
        if name is None:
            return
        self.metrics.reports.inc()
        if len(message.payload) > reports.MAX_REPORT_BYTES:
            self._refuse(name, "too-large", f"{len(message.payload)} bytes")
            return
        dev = self._device(name)
        if dev is None:
            return
        if from_retained_read:
            if dev.live:
                return  # the live stream already brought something newer
        elif not message.retain:
            dev.live = True
        if dev.raw is not None:
            self.metrics.coalesced.inc()
        dev.raw = message.payload
        dev.arrived = dev.raw_at = self._clock()
        self._touch(name)

    def take_presence(self, message: Message) -> None:
        name = self._name(message, "device-presence")
        if name is None:
            return
        self.metrics.presence.inc()
        if not message.payload:
            presence = None
        else:
            try:
                presence = reports.decode_presence(message.payload)
            except ProtocolError as exc:
                self._refuse(name, "bad-presence", str(exc))
                return
        dev = self._devices.get(name) if presence is None else self._device(name)
        if dev is None or dev.presence == presence:
            return
        dev.presence = presence
        dev.arrived = self._clock()
        self._touch(name)

    def take_drift(self, message: Message) -> None:
        name = self._name(message, "device-drift")
        if name is None:
            return
        self._drift_delivered.add(name)
        if not message.payload:
            dev = self._devices.get(name)
            if dev is not None:
                self._set_status(dev, None)
            self._tell(name, None)
            return
        try:
            found = status.drift_from_json(message.payload)
        except ProtocolError as exc:
            log.warning("ignoring unreadable drift status of %s: %s", name, exc)
            return
        if found.device != name:
            return
        dev = self._device(name)
        if dev is not None:
            self._set_status(dev, found)
            self._tell(name, found)

    def take_group_status(self, message: Message) -> None:
        name = self._name(message, "group-status")
        if name is None:
            return
        self._groups_delivered.add(name)
        if not message.payload:
            self._group_status.pop(name, None)
            return
        with contextlib.suppress(ProtocolError):
            self._group_status[name] = status.group_status_from_json(message.payload)

    def _touch(self, name: str) -> None:
        self._dirty.add(name)
        self._wake.set()

    def published(self, batch: Sequence[Publication], current: Mapping[Target, Current]) -> None:
        """The controller's publications: ``current`` is what it publishes now."""
        for p in batch:
            self.metrics.publications.labels(p.target.kind, p.reason).inc()
        self._published = current
        self._fleet_stale = True  # the next pass re-detects the devices whose desired changed
        self._wake.set()

    def connected(self) -> None:
        """A new connection: nothing is decided until it has delivered every retained message."""
        self._session_synced.clear()
        self._drift_delivered.clear()
        self._groups_delivered.clear()

    def synced(self, retained_reports: Iterable[Message] = ()) -> None:
        """The connection delivered every retained message (a barrier came back); in
        shared mode ``retained_reports`` are the retained reports, read apart."""
        count = 0
        for message in retained_reports:
            count += 1
            self.take_report(message, from_retained_read=True)
        if self.settings.share:
            log.info("drift: read %d retained reports (shared mode)", count)
        self._sessions_synced += 1
        if self._sessions_synced > 1:
            self._restore = True  # the broker may have lost what we published
            self._full = True
        self._synced.set()
        self._session_synced.set()
        self._wake.set()

    # --- The worker ------------------------------------------------------------------------

    async def _working(self) -> None:
        assert self._executor is not None
        executor = self._executor
        tick = max(0.05, self.settings.tick)
        next_tick = time.monotonic() + tick
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_tick - time.monotonic())):
                    await self._wake.wait()
            self._wake.clear()
            ticking = time.monotonic() >= next_tick
            if ticking:
                next_tick = time.monotonic() + tick
            await executor.wait_connected()
            await self._session_synced.wait()
            try:
                await self.step(tick=ticking)
            except BrokerUnavailable as exc:
                log.warning(
                    "drift: publishing interrupted (%s); re-evaluating after reconnect", exc
                )
                self._full = True

    def _refresh_fleet(self) -> None:
        if self._fleet_stale:
            before = self._fleet
            self._fleet = desired_for(self._published, before)
            self._fleet_stale = False
            self._rebuild_tallies()
            # Work proportional to what changed: only the devices whose desired state moved
            # are decided again (and every group summary is looked at: as many as groups).
            self._reeval |= self._fleet.changed
            self._groups_touched = True

    def _rebuild_tallies(self) -> None:
        """Recount every group's summary from scratch (after the desired side changed)."""
        fleet = self._fleet
        self._member_of = {d: g for g, members in fleet.members.items() for d in members}
        self._tallies = {
            g: _Tally(bundle.version, len(fleet.members.get(g, ())))
            for g, bundle in fleet.groups.items()
        }
        for name, found in self._counted.items():
            tally = self._tallies.get(self._member_of.get(name, ""))
            if tally is not None:
                tally.move(name, None, found)
        self._gauges_stale = True

    def _set_status(self, dev: _Device, new: DriftStatus | None) -> None:
        """Record ``dev``'s retained status and move it in the tallies and gauge counts."""
        dev.status = new
        name = dev.name
        old = self._counted.get(name)
        if old is new:
            return
        if new is None:
            del self._counted[name]
        else:
            self._counted[name] = new
        tally = self._tallies.get(self._member_of.get(name, ""))
        if tally is not None:
            tally.move(name, old, new)
        if old is not None:
            self._gauge_counts[old.group or ""][old.state] -= 1
        if new is not None:
            self._gauge_counts.setdefault(new.group or "", Counter())[new.state] += 1
        self._gauges_stale = True

    def _decode(self, dev: _Device) -> None:
        raw, dev.raw = dev.raw, None
        if raw is None:
            return
        self.decoded += 1
        if not raw:  # cleared retained report: the device was reset or removed
            dev.report, dev.reported_at, dev.report_error = None, None, ""
            return
        try:
            report = reports.decode(raw)
        except ProtocolError as exc:
            self._refuse(dev.name, "malformed", str(exc))
            dev.report_error = f"malformed: {exc}"
            return
        if report.device != dev.name:
            error = f"the report on {dev.name}'s topic claims to be from {report.device!r}"
            self._refuse(dev.name, "wrong-device", error)
            dev.report_error = f"wrong-device: {error}"
            return
        self._refused_logged.pop(dev.name, None)
        dev.healed = healed_since(dev.report, report)
        dev.report, dev.reported_at, dev.report_error = report, dev.raw_at, ""

    def _evaluate(self, dev: _Device, now: float) -> DriftStatus | None:
        self.evaluations += 1
        desired = self._fleet.desired.get(dev.name)
        if desired is None and dev.report is None and dev.presence is None and not dev.report_error:
            return None  # nothing to say about it: its status is cleared
        reported_at = dev.reported_at
        old = dev.status
        if old is not None and dev.report is not None and old.report_seq == dev.report.seq:
            reported_at = old.last_seen or reported_at  # the same report, read again
        new = detecting.detect(
            desired,
            dev.report,
            dev.presence,
            now,
            device=dev.name,
            previous=old,
            reported_at=reported_at,
            grace=self.settings.grace,
            silent_after=self.settings.silent_after,
            command_seq=dev.command_seq or None,
        )
        if dev.report is None and dev.report_error and new.state == "unknown":
            new = replace(new, reason=f"no readable report ({dev.report_error})")
        seq = dev.report.seq if dev.report is not None else None
        return replace(new, report_seq=seq)

    def _gone_silent(self, status: DriftStatus, now: float) -> bool:
        """Its heartbeat is overdue and it is not shown offline yet: the tick decides it."""
        return status.state != "offline" and detecting.is_silent(
            status.last_seen, now, self.settings.silent_after
        )

    def _stale_here(self, dev: _Device) -> bool:
        """Shared mode: another engine decided from a newer report than ours."""
        if not self.settings.share or dev.status is None or dev.status.report_seq is None:
            return False
        return dev.report is None or dev.report.seq < dev.status.report_seq

    async def step(self, *, tick: bool = False) -> None:
        """One pass: decide every device that needs it, publish what changed."""
        self.passes += 1
        self._refresh_fleet()
        now = self._clock()
        triggered, self._dirty = self._dirty, set()
        full, self._full = self._full, False
        restore, self._restore = self._restore, False
        reeval, self._reeval = self._reeval, set()
        groups_touched, self._groups_touched = self._groups_touched, False
        names: set[str] = set(triggered) | reeval
        if full:
            names |= set(self._devices) | set(self._fleet.desired)
        elif tick:
            names |= {
                n
                for n, d in self._devices.items()
                if d.status is not None
                and (
                    d.status.state == "pending"
                    or self._wants_command(d, d.status)
                    or self._gone_silent(d.status, now)
                )
            }
        actions: list[DriftAction] = []
        touched_groups: set[str] = set()
        latencies: list[float] = []
        self._decide(names, triggered, now, restore, actions, touched_groups, latencies)
        if full or restore or groups_touched:
            touched_groups |= set(self._fleet.groups) | set(self._group_status)
        await self._carry_out(actions)
        await self._publish_groups(touched_groups, now, restore)
        done = self._clock()
        for arrived in latencies:
            self.metrics.latency.observe(max(0.0, done - arrived))
        self._set_gauges()
        async with self._stepped:
            self._stepped.notify_all()

    def _decide(
        self,
        names: set[str],
        triggered: set[str],
        now: float,
        restore: bool,
        actions: list[DriftAction],
        touched_groups: set[str],
        latencies: list[float],
    ) -> None:
        """Decide each of ``names``; what to do goes to ``actions`` (typed, carried out by
        :meth:`_carry_out` through the executor)."""
        for name in sorted(names):
            dev = self._device(name)
            if dev is None:
                continue
            self._decode(dev)
            if name not in triggered and self._stale_here(dev):
                continue
            new = self._evaluate(dev, now)
            if name in triggered:
                latencies.append(dev.arrived)
            old = dev.status
            before = len(actions)
            if new is None:
                if old is not None:
                    actions.append(ClearDrift(name))
                    touched_groups |= {old.group or "", self._member_of.get(name, "")}
                del self._devices[name]
                continue
            if name in triggered and dev.healed and (old is None or old.state != "drifted"):
                # Healed before we saw it drifted (its drifted report was coalesced away, or
                # came and went between two reports): still an operator's drift, told as such.
                drifted = replace(
                    new,
                    state="drifted",
                    resources=dev.healed,
                    reason="enforce mode: the device put it back",
                    since=dev.raw_at,
                )
                actions.append(ShowDrift(name, old, drifted))
                actions.append(ShowDrift(name, drifted, replace(new, since=now)))
                touched_groups.add(new.group or "")
            elif old is None or not new.same_condition(old):
                actions.append(ShowDrift(name, old, new))
                touched_groups |= {new.group or "", (old.group or "") if old else ""}
            elif restore and name not in self._drift_delivered:
                actions.append(ShowDrift(name, old, old, event=False))
            if len(actions) > before:  # its group's summary is counted by membership
                touched_groups.add(self._member_of.get(name, ""))
            if self._wants_command(dev, new):
                actions.append(self._reconcile(dev, new, now))

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds after a pass (for tests and tools)."""
        async with asyncio.timeout(timeout), self._stepped:
            await self._stepped.wait_for(predicate)

    async def _gather(self, coros: list[Coroutine[Any, Any, None]]) -> None:
        """Run ``coros``, at most :data:`PUBLISH_CONCURRENCY` at a time.

        On the first failure the others are cancelled, and those that never started are
        closed (an unstarted coroutine left behind is a "never awaited" warning).
        """
        if not coros:
            return
        semaphore = asyncio.Semaphore(PUBLISH_CONCURRENCY)

        async def limited(coro: Coroutine[Any, Any, None]) -> None:
            async with semaphore:
                await coro

        try:
            async with asyncio.TaskGroup() as tg:
                for coro in coros:
                    tg.create_task(limited(coro))
        except* BrokerUnavailable as group:
            raise group.exceptions[0] from None
        finally:
            for coro in coros:
                coro.close()  # a no-op for those that ran

    # --- Output ----------------------------------------------------------------------------

    async def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        assert self._executor is not None
        await self._executor.publish(topic, payload, retain=retain)

    async def _carry_out(self, actions: Sequence[DriftAction]) -> None:
        """Carry ``actions`` out through the executor: each device's in order, devices side
        by side (at most :data:`PUBLISH_CONCURRENCY` at a time)."""
        by_device: dict[str, list[DriftAction]] = {}
        for action in actions:
            by_device.setdefault(action.device, []).append(action)

        async def one_device(todo: list[DriftAction]) -> None:
            for action in todo:
                await self._execute(action)

        await self._gather([one_device(todo) for todo in by_device.values()])

    async def _execute(self, action: DriftAction) -> None:
        assert self._executor is not None
        # A device the decision removed (cleared) is still counted until it is cleared.
        dev = self._devices.get(action.device) or _Device(action.device)
        if isinstance(action, ClearDrift):
            await self._publish(self._topics.device_drift(action.device), b"", retain=True)
            self._set_status(dev, None)
            self._tell(action.device, None)
        elif isinstance(action, ShowDrift):
            await self._publish_status(dev, action.old, action.new, event=action.event)
        else:
            await self._send_reconcile(dev, action)

    async def _publish_status(
        self, dev: _Device, old: DriftStatus | None, new: DriftStatus, *, event: bool = True
    ) -> None:
        await self._publish(self._topics.device_drift(dev.name), new.to_json(), retain=True)
        self._set_status(dev, new)
        self._tell(dev.name, new)
        change = change_of(old, new) if event else None
        if change is None:
            return
        if change != "changed" or new.state != "in_sync" or old is not None:
            log.info(
                "drift %s: %s %s -> %s%s",
                change,
                dev.name,
                old.state if old else "-",
                new.state,
                f" ({', '.join(r.id for r in new.resources)})" if new.resources else "",
            )
        assert self._executor is not None
        await self._executor.event("drift", **drift_event_fields(old, new, change))
        self.events_published += 1
        self.metrics.drift_events.labels(new.group or "-", change).inc()

    def _wants_command(self, dev: _Device, new: DriftStatus) -> bool:
        desired = self._fleet.desired.get(dev.name)
        if new.state != "drifted" or desired is None or desired.mode != "enforce":
            return False
        last = dev.last_command
        return last is None or time.monotonic() - last >= self.settings.reconcile_interval

    def _reconcile(self, dev: _Device, new: DriftStatus, now: float) -> Reconcile:
        dev.last_command = time.monotonic()
        # Milliseconds since the epoch: strictly increasing across restarts without state.
        seq = max(dev.command_seq + 1, int(now * 1000))
        why = "drifted: " + ", ".join(r.id for r in new.resources)
        return Reconcile(
            dev.name, new.group, seq, int(now), int(now) + self.settings.command_ttl, why[:256]
        )

    async def _send_reconcile(self, dev: _Device, action: Reconcile) -> None:
        command = commands.Command(
            action.device, "reconcile", action.seq, action.issued_at, action.expires_at,
            action.reason,
        )  # fmt: skip
        assert self._executor is not None
        await self._executor.command(command)
        dev.command_seq = max(dev.command_seq, action.seq)
        log.info("reconcile command seq %d sent to %s (%s)", action.seq, dev.name, action.reason)
        self.metrics.commands.labels(action.group or "-").inc()
        await self._executor.event(
            "reconcile", device=dev.name, group=action.group, seq=action.seq, reason=action.reason
        )

    def group_statuses(self, now: float | None = None) -> dict[str, GroupStatus]:
        """Every group's summary, counted from scratch over the statuses retained now.

        The passes use the running tallies instead (:meth:`_summary`); this is the
        reference they must agree with.
        """
        now = self._clock() if now is None else now
        result: dict[str, GroupStatus] = {}
        for group, bundle in self._fleet.groups.items():
            members = [self._devices.get(d) for d in self._fleet.members.get(group, [])]
            statuses = [
                d.status if d is not None and d.status is not None else self._unknown(d, group)
                for d in members
            ]
            result[group] = detecting.summarise(
                group,
                statuses,
                version=bundle.version,
                commit=self._fleet.commits.get(group),
                mode=bundle.mode,
                now=now,
            )
        return result

    @staticmethod
    def _unknown(dev: _Device | None, group: str) -> DriftStatus:
        return DriftStatus(dev.name if dev else "?", group, "unknown", None, None, None, 0.0)

    def _summary(self, group: str, now: float) -> GroupStatus | None:
        """``group``'s summary from its tally: as many steps as states, not members."""
        bundle = self._fleet.groups.get(group)
        tally = self._tallies.get(group)
        if bundle is None or tally is None:
            return None
        members = tally.members
        return GroupStatus(
            group=group,
            version=bundle.version,
            commit=self._fleet.commits.get(group),
            mode=bundle.mode,
            devices=members,
            counts={state: tally.counts.get(state, 0) for state in DRIFT_STATES},
            converged_pct=round(100.0 * tally.in_sync / members, 1) if members else 100.0,
            oldest_pending=tally.oldest_pending(self._counted.get),
            time=now,
        )

    async def _publish_groups(self, groups: set[str], now: float, restore: bool) -> None:
        """The summaries that moved (or the broker lost), in one pipelined round."""
        changed: dict[str, GroupStatus | None] = {}
        for group in sorted(g for g in groups if g):
            new = self._summary(group, now)
            old = self._group_status.get(group)
            if new is None:
                if old is not None:
                    changed[group] = None
                continue
            if old is None or replace(old, time=0.0) != replace(new, time=0.0):
                changed[group] = new
            elif restore and group not in self._groups_delivered:
                changed[group] = old
        if not changed:
            return
        assert self._executor is not None
        await self._executor.publish_many([
            (self._topics.group_status(g), s.to_json() if s is not None else b"", True)
            for g, s in changed.items()
        ])  # fmt: skip
        for group, new in changed.items():
            if new is None:
                self._group_status.pop(group, None)
            else:
                self._group_status[group] = new

    def _set_gauges(self) -> None:
        """Set the per-group, per-state gauge from the running counts, when they moved."""
        if not self._gauges_stale:
            return
        self._gauges_stale = False
        counts: dict[str, Counter[str]] = {g: Counter() for g in self._fleet.groups}
        for group, per in list(self._gauge_counts.items()):
            if per.total() == 0 and group not in counts:
                del self._gauge_counts[group]  # a group no status names any more
                continue
            counts[group] = per
        self.metrics.set_devices(counts, DRIFT_STATES)

    # --- For tests and tools ----------------------------------------------------------------

    def statuses(self) -> dict[str, DriftStatus]:
        """Every device's status as retained now (ours or another engine's)."""
        return {n: d.status for n, d in sorted(self._devices.items()) if d.status is not None}
