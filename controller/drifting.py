"""Drift: devices' reports and presence in, drift status, group status and events decided.

:class:`DriftEngine` is the drift part of the controller's one reconcile loop
(``Controller(config, drift=DriftSettings(...))``). It has no task, no connection and no
loop of its own; it keeps the facts about devices and decides, and the controller's loop
carries its decisions out through the one executor:

* **Facts in.** The controller hands it every message of its subscriptions
  (:func:`subscriptions`): ``shards/+/devices/+/reported`` and ``.../presence`` (every
  report shard; QoS 0, so a retained flood is never cut by the broker's queue limit),
  ``devices/+/drift`` and ``groups/+/status`` (what is retained now: the ``previous`` of
  every decision, and what other engines decided). ``take_*`` only files the raw payload
  under the device named by the *topic* and marks the device dirty: a flood from one
  device costs one dict store per message, and only the latest report of each device is
  ever decoded (coalescing). A report whose body names another device is not believed; a
  report or presence under a shard that is not its device's is dropped and counted
  (``reports_rejected{reason="wrong-shard"}``: the ACL cannot hold a device to its
  shard). A report older than the one held (a lower ``seq``: SPEC 6.6) is dropped and
  counted (``reports_rejected{reason="stale"}``): a clustered engine's node that comes back
  from a split or a freeze delivers what the device sent it before it moved on. The
  controller's publications come in through :meth:`DriftEngine.published`,
  naming the targets that changed.
* **Decide.** Each pass of the loop (woken by a report or presence, a batch of
  publications, or the drift tick: pending devices becoming overdue, reconcile retries,
  silent devices) calls :meth:`DriftEngine.decide`: the pure
  :func:`~setpoint.controller.detecting.detect` for each device it has to look at,
  compared with what is retained, into typed actions (``ShowDrift``, ``ClearDrift``,
  ``Reconcile``); then :meth:`DriftEngine.summaries` into ``ShowGroup`` / ``ClearGroup``
  for the groups whose summary moved. The loop hands each action to the executor and,
  once it is done, back to :meth:`DriftEngine.done`, which records it (retained status,
  running tallies and gauges, metrics). Level-triggered: a lost or duplicated message
  changes nothing.
* **Work proportional to what changed.** After a batch of publications only the devices
  whose published entries (their own or their group's) changed are worked out again
  (:func:`refresh`) and decided again; group summaries and gauges are running counts
  moved one device at a time (:class:`_Tally`), and only the groups they moved are
  summarised.
* **Remediation.** A device of an ``enforce`` group that is drifted gets a signed
  ``reconcile`` command (rate-limited per device); ``observe`` groups are only reported.
* **Restart.** Nothing is decided before the connection's retained reports, presence and
  drift statuses have all arrived (:meth:`DriftEngine.synced`, after a barrier round
  trip) and the loop has planned the desired state; decisions equal to what is retained
  publish nothing, so a restart makes no burst of events. After a reconnect, drift and
  group statuses the broker lost are published again (without events).
* **Sharing the stream.** With ``share=NAME`` the live reports come through the MQTT 5
  shared subscription ``$share/NAME/<prefix>/shards/+/devices/+/reported`` (each report reaches one
  of the engines); retained reports are not delivered to shared subscriptions, so the
  controller reads them once per connection (``broker.read_retained``) and hands them to
  :meth:`DriftEngine.synced`. Presence (rare) and drift statuses are read by every
  engine. Every status carries the ``report_seq`` it was computed from; on a
  re-evaluation that no message triggered (a publication, a tick), an engine holding an
  older report than the one behind the retained status leaves that device to the engine
  that has the newer one.

What it does not do: publish anything (the executor does), or keep history.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

from setpoint.proto import bundles, reports, status
from setpoint.proto.bundles import Bundle
from setpoint.proto.errors import ProtocolError, WrongShardError
from setpoint.proto.reports import Report
from setpoint.proto.status import DRIFT_STATES, DriftStatus, GroupStatus, ResourceDiff
from setpoint.proto.topics import Topics

from . import detecting, resending
from .broker import Message, Subscription
from .detecting import (
    Change,
    ClearDrift,
    ClearGroup,
    Desired,
    DriftAction,
    GroupAction,
    Reconcile,
    ShowDrift,
    ShowGroup,
    change_of,
    drift_event_fields,
)
from .metrics import Metrics
from .rendering import Target

if TYPE_CHECKING:
    from .planning import Current
    from .service import Publication

log = logging.getLogger(__name__)

DEFAULT_TICK: Final = 1.0
DEFAULT_RECONCILE_INTERVAL: Final = 30.0
COMMAND_TTL: Final = 300
MAX_DEVICES: Final = 100_000

__all__ = [
    "Change",
    "DriftEngine",
    "DriftSettings",
    "change_of",
    "desired_for",
    "drift_event_fields",
    "healed_since",
    "refresh",
    "subscriptions",
]


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
    # A live device still pending on a version published this long ago gets its envelope
    # again (controller/resending.py); None: never.
    resend_after: float | None = resending.DEFAULT_RESEND_AFTER
    # Replicas that split the report shards (docs/decisions/0009-report-shards.md): the
    # shards whose devices this engine decides (None: every shard), and whether it keeps
    # the group summaries (the leader does, from every device's retained status; a shard
    # owner does not, and keeps the statuses of its own shards' devices only).
    shards: frozenset[str] | None = None
    summaries: bool = True


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
    """The desired side, per device, from the controller's published bundles.

    Built whole by :func:`desired_for`; kept up to date in place by :func:`refresh` (the
    engine owns it), one changed target at a time."""

    desired: dict[str, Desired] = field(default_factory=dict)
    groups: dict[str, Bundle] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)
    # Per group, the devices whose Desired names it (only groups that are published).
    members: dict[str, set[str]] = field(default_factory=dict)
    # Per group, every device whose published bundle names it (published or not): the
    # devices to work out again when that group's bundle changes; and per device, the
    # group its bundle names.
    claims: dict[str, set[str]] = field(default_factory=dict)
    claim_of: dict[str, str] = field(default_factory=dict)
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

    def __init__(self, version: int | None) -> None:
        self.version = version
        self.members = 0
        self.counts: Counter[str] = Counter()
        self.in_sync = 0
        self.pending: list[tuple[float, str]] = []

    def join(self, name: str, found: DriftStatus | None) -> None:
        self.members += 1
        self.move(name, None, found, unknown_before=False)

    def leave(self, name: str, found: DriftStatus | None) -> None:
        self.members -= 1
        self.move(name, found, None, unknown_after=False)

    def move(
        self,
        name: str,
        old: DriftStatus | None,
        new: DriftStatus | None,
        *,
        unknown_before: bool = True,
        unknown_after: bool = True,
    ) -> None:
        for found, sign, counted in ((old, -1, unknown_before), (new, 1, unknown_after)):
            if found is None and not counted:
                continue
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


def _desired_of(device: str, group_id: str, current: Any, group_current: Any) -> Desired:
    """One device's Desired from its published entry and its group's. Pure."""
    bundle: Bundle = current.bundle
    group: Bundle = group_current.bundle
    newest = max((group_current, current), key=lambda c: c.published_at or 0.0)
    # A batched rollout pins the device to the group version it runs until its batch is
    # released: that is its desired group version (its content is not retained).
    pin = bundle.group_version
    held = pin is not None and pin < group.version
    return Desired(
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


def desired_for(published: Mapping[Any, Any], previous: _Fleet | None = None) -> _Fleet:
    """Per device, its :class:`Desired`, from the controller's published bundles (every
    one of them; :func:`refresh` updates a fleet from the targets that changed). Pure.

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
        group_id = current.bundle.group
        if group_id is None:
            continue
        fleet.claims.setdefault(group_id, set()).add(device)
        fleet.claim_of[device] = group_id
        if group_id not in groups:
            continue
        group_current = groups[group_id]
        before = previous.inputs.get(device) if previous is not None else None
        if before is not None and before[0] is current and before[1] is group_current:
            desired = before[2]
        else:
            desired = _desired_of(device, group_id, current, group_current)
            if previous is not None and previous.desired.get(device) != desired:
                fleet.changed.add(device)
        fleet.desired[device] = desired
        fleet.inputs[device] = (current, group_current, desired)
        fleet.members.setdefault(group_id, set()).add(device)
        if previous is not None:
            known += device in previous.desired
    if previous is not None and known != len(previous.desired):
        fleet.changed.update(previous.desired.keys() - fleet.desired.keys())
    return fleet


def refresh(
    fleet: _Fleet, published: Mapping[Any, Any], targets: Iterable[Target]
) -> tuple[set[str], set[str]]:
    """Bring ``fleet`` (in place) up to date with ``published`` after ``targets`` changed
    in it: only those devices, and the devices of those groups, are worked out again.
    Returns the devices whose Desired changed (added or gone included) and the groups
    whose bundle changed (added or gone included). What :func:`desired_for` would give,
    in work proportional to the change."""
    changed: set[str] = set()
    groups_moved: set[str] = set()
    redo: set[str] = set()
    for target in targets:
        if target.kind == "group":
            groups_moved.add(target.id)
            current = published.get(target)
            if current is None:
                fleet.groups.pop(target.id, None)
                fleet.commits.pop(target.id, None)
            else:
                fleet.groups[target.id] = current.bundle
                fleet.commits[target.id] = current.bundle.commit
            redo |= fleet.claims.get(target.id, set())
        else:
            redo.add(target.id)
    for device in redo:
        old = fleet.desired.pop(device, None)
        if old is not None:
            members = fleet.members.get(old.group)
            if members is not None:
                members.discard(device)
                if not members:
                    del fleet.members[old.group]
        before = fleet.inputs.pop(device, None)
        current = published.get(Target("device", device))
        group_id = current.bundle.group if current is not None else None
        claimed = fleet.claim_of.pop(device, None)
        if claimed is not None and claimed != group_id:
            claims = fleet.claims.get(claimed)
            if claims is not None:
                claims.discard(device)
                if not claims:
                    del fleet.claims[claimed]
        if current is None or group_id is None:
            changed.update((device,) if old is not None else ())
            continue
        fleet.claims.setdefault(group_id, set()).add(device)
        fleet.claim_of[device] = group_id
        group_current = published.get(Target("group", group_id))
        if group_current is None:
            changed.update((device,) if old is not None else ())
            continue
        if before is not None and before[0] is current and before[1] is group_current:
            desired = before[2]
        else:
            desired = _desired_of(device, group_id, current, group_current)
        fleet.desired[device] = desired
        fleet.inputs[device] = (current, group_current, desired)
        fleet.members.setdefault(group_id, set()).add(device)
        if old != desired:
            changed.add(device)
    return changed, groups_moved


def _older(found: DriftStatus, ours: DriftStatus | None) -> bool:
    """``found`` was decided from an older report of the device than ``ours`` (report
    ``seq`` rises with every report, across restarts: SPEC 6.6)."""
    if ours is None or found.report_seq is None or ours.report_seq is None:
        return False
    return found.report_seq < ours.report_seq


def subscriptions(topics: Topics, settings: DriftSettings) -> list[Subscription]:
    """What a drift engine takes in (its controller subscribes its link to these)."""
    statuses = [Subscription(topics.all_drift(), no_local=True)]
    if settings.summaries:
        statuses.append(Subscription(topics.all_group_status(), no_local=True))
    if settings.shards is not None:
        # A shard owner: the report and presence filters of its shards (the leader of
        # replicas that split the shards: none, it reads the statuses only).
        return [
            *(Subscription(f, bulk=True) for f in topics.shard_filters(settings.shards)),
            *statuses,
        ]
    reported = topics.all_reported()
    if settings.share:
        reported = topics.shared(settings.share, reported)
    return [
        # Reports and presence come in floods: through the link's lean ingest connection.
        Subscription(reported, bulk=True),
        Subscription(topics.all_presence(), bulk=True),
        *statuses,
    ]


def _version_of(applied: Any, target_id: str) -> int | None:
    """The version a report says the device runs of ``target_id``'s bundle (None: none, or
    another target's)."""
    return applied.version if applied is not None and applied.target == target_id else None


class DriftEngine:
    """The drift part of one controller's reconcile loop: facts about devices in,
    typed actions decided (:meth:`decide`, :meth:`summaries`), recorded once carried
    out (:meth:`done`). No task, no connection: the controller's loop runs it."""

    name = "drift"

    def __init__(
        self,
        settings: DriftSettings | None = None,
        *,
        topics: Topics | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or DriftSettings()
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
        self._gauges_moved: set[str] = set()  # groups whose gauge is to be set again
        # What the tick looks at (see _due): kept as statuses change.
        self._pending: set[str] = set()
        self._drifted: set[str] = set()
        self._silent_at: list[tuple[float, str]] = []  # (when it falls silent, device)
        self._drift_delivered: set[str] = set()
        self._groups_delivered: set[str] = set()
        # True once this connection's retained statuses, reports and presence have all
        # arrived; False from every connect. Nothing is decided in between: a pass deciding
        # on a half-read picture (presence read, the retained drift status not yet)
        # publishes a change that the late retained status then undoes, and the next pass
        # repeats it (two identical events) or leaves the engine believing what the broker
        # no longer holds.
        self.session_synced = False
        self._sessions_synced = 0
        self._fleet = _Fleet()
        self._published: Mapping[Target, Current] = {}
        # The targets published since the fleet was last refreshed (None: every one).
        self._moved: set[Target] | None = None
        self._reeval: set[str] = set()  # to decide again though no message came (not triggered)
        self._groups_touched: set[str] = set()  # groups whose summary may have moved
        self._all_groups = True  # every group's summary to be looked at
        self._refused_logged: dict[str, str] = {}
        # What the pass under way decided (between decide and passed).
        self._pass_now = 0.0
        self._pass_restore = False
        self._latencies: list[float] = []
        self.ready = asyncio.Event()
        self.passes = 0
        self._stepped = asyncio.Condition()
        self.decoded = 0
        self.evaluations = 0  # devices decided (detect calls), for tests and benchmarks
        self.events_published = 0

    @property
    def _fleet_stale(self) -> bool:
        return self._moved is None or bool(self._moved)

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
        except WrongShardError as exc:  # a device cannot be held to its shard by the ACL
            self._refuse(exc.device, "wrong-shard", str(exc))
            return None
        except ProtocolError:
            self.metrics.reports_rejected.labels("bad-topic").inc()
            return None
        return ref.name if ref.kind == kind else None

    def _refuse(self, device: str, reason: str, detail: str) -> None:
        self.metrics.reports_rejected.labels(reason).inc()
        if self._refused_logged.get(device) != reason:  # once per device and reason in a row
            self._refused_logged[device] = reason
            log.warning("report from %s not believed (%s): %s", device, reason, detail)

    def take_report(self, message: Message, *, from_retained_read: bool = False) -> bool:
        """A report (True: its device is to be decided again)."""
        name = self._name(message, "device-reported")
        if name is None:
            return False
        self.metrics.reports.inc()
        if len(message.payload) > reports.MAX_REPORT_BYTES:
            self._refuse(name, "too-large", f"{len(message.payload)} bytes")
            return False
        dev = self._device(name)
        if dev is None:
            return False
        if from_retained_read:
            if dev.live:
                return False  # the live stream already brought something newer
        elif not message.retain:
            dev.live = True
        if dev.raw is not None:
            self.metrics.coalesced.inc()
        dev.raw = message.payload
        dev.arrived = dev.raw_at = self._clock()
        self._dirty.add(name)
        return True

    def take_presence(self, message: Message) -> bool:
        """A presence message (True: its device is to be decided again)."""
        name = self._name(message, "device-presence")
        if name is None:
            return False
        self.metrics.presence.inc()
        if not message.payload:
            presence = None
        else:
            try:
                presence = reports.decode_presence(message.payload)
            except ProtocolError as exc:
                self._refuse(name, "bad-presence", str(exc))
                return False
        dev = self._devices.get(name) if presence is None else self._device(name)
        if dev is None or dev.presence == presence:
            return False
        dev.presence = presence
        dev.arrived = self._clock()
        self._dirty.add(name)
        return True

    def take_drift(self, message: Message) -> tuple[str, DriftStatus | None] | None:
        """A retained drift status (another engine's, or ours read back): the device and
        its status now (None: cleared), for the rollouts; None if it was not taken.

        A status decided from an older report than the one ours was decided from is not
        taken (nor counted as delivered, so a restore publishes ours again): in shared mode
        another engine's status can reach us, on the main connection, after we decided and
        published from a newer report that came in on the ingest connection; the broker
        holds ours, and taking theirs made the next pass publish ours again (a second
        event), or miss the drift's resolution."""
        name = self._name(message, "device-drift")
        if name is None or not (self.settings.summaries or self._mine(name)):
            return None  # a shard owner keeps its own shards' statuses only
        self._drift_delivered.add(name)
        if self.settings.summaries:
            # Another engine's decision (a shard owner's, for the leader): the summaries of
            # its groups, before and after, may have moved.
            before = self._counted.get(name)
            self._groups_touched |= (
                {self._member_of.get(name, ""), before.group or ""}
                if (before is not None)
                else {self._member_of.get(name, "")}
            )
        if not message.payload:
            dev = self._devices.get(name)
            if dev is not None:
                self._set_status(dev, None)
            return name, None
        try:
            found = status.drift_from_json(message.payload)
        except ProtocolError as exc:
            log.warning("ignoring unreadable drift status of %s: %s", name, exc)
            return None
        if found.device != name:
            return None
        dev = self._device(name)
        if dev is None:
            return None
        if _older(found, dev.status):
            self._drift_delivered.discard(name)
            return None
        self._set_status(dev, found)
        if self.settings.summaries:
            self._groups_touched.add(found.group or "")
        return name, found

    def _mine(self, name: str) -> bool:
        """Whether this engine decides device ``name`` (its shard is one of ours)."""
        shards = self.settings.shards
        return shards is None or (bool(shards) and Topics.shard_of(name) in shards)

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

    def published(
        self, batch: Sequence[Publication] | None, current: Mapping[Target, Current]
    ) -> None:
        """The controller's publications: ``current`` is what it publishes now (read, never
        changed, by the next pass), ``batch`` what changed in it (None: anything may have)."""
        self._published = current
        if batch is None:
            self._moved = None
            return
        for p in batch:
            self.metrics.publications.labels(p.target.kind, p.reason).inc()
        if self._moved is not None:
            self._moved.update(p.target for p in batch)

    def retained_moved(
        self, targets: set[Target] | None, current: Mapping[Target, Current]
    ) -> None:
        """A shard owner's desired side: the bundles retained on the broker (``current``,
        read, never changed, by the next pass) moved on ``targets`` (None: any may have)."""
        self._published = current
        if targets is None:
            self._moved = None
        elif self._moved is not None:
            self._moved.update(targets)

    def connected(self) -> None:
        """A new connection: nothing is decided until it has delivered every retained message."""
        self.session_synced = False
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
        self.session_synced = True

    def interrupted(self) -> None:
        """The broker did not take what a pass decided: decide everything again (after the
        reconnect's sync)."""
        self._full = True

    # --- The desired side, and the running counts -----------------------------------------

    def _refresh_fleet(self) -> None:
        """Bring the desired side up to date with the controller's publications: only the
        targets published since are worked out again (all of them the first time)."""
        moved, self._moved = self._moved, set()
        if moved is None:
            self._fleet = desired_for(self._published)
            self._recount()
            self._reeval |= set(self._fleet.desired)
            return
        if not moved:
            return
        changed, groups = refresh(self._fleet, self._published, moved)
        # Work proportional to what changed: only the devices whose desired state moved
        # are decided again, only their groups' summaries looked at again.
        self._reeval |= changed
        for name in changed:
            self._membership(name)
        for group in groups:
            self._group_moved(group)

    def _recount(self) -> None:
        """Count every group's summary from scratch (the first time)."""
        fleet = self._fleet
        self._member_of = {}
        self._tallies = {g: _Tally(b.version) for g, b in fleet.groups.items()}
        for group, members in fleet.members.items():
            tally = self._tallies[group]
            for name in members:
                self._member_of[name] = group
                tally.join(name, self._counted.get(name))
        self._gauges_moved |= set(fleet.groups)
        self._all_groups = True

    def _group_moved(self, group: str) -> None:
        """``group``'s bundle changed (or came, or went): its tally follows."""
        bundle = self._fleet.groups.get(group)
        self._groups_touched.add(group)
        self._gauges_moved.add(group)
        if bundle is None:
            self._tallies.pop(group, None)  # its members left it (membership, before)
            return
        tally = self._tallies.get(group)
        if tally is None:
            self._tallies[group] = _Tally(bundle.version)
        elif tally.version != bundle.version:
            # In sync is counted on the group's version: its members (as many as the
            # group has) are counted again.
            tally.version = bundle.version
            tally.in_sync = 0
            for name in self._fleet.members.get(group, ()):
                found = self._counted.get(name)
                if found is not None and found.state == "in_sync":
                    tally.in_sync += found.applied_version == bundle.version

    def _membership(self, name: str) -> None:
        """``name``'s desired state changed: move it between group tallies if its group did."""
        desired = self._fleet.desired.get(name)
        new = desired.group if desired is not None else None
        old = self._member_of.get(name)
        if old == new:
            return
        found = self._counted.get(name)
        if old is not None:
            del self._member_of[name]
            tally = self._tallies.get(old)
            if tally is not None:
                tally.leave(name, found)
            self._groups_touched.add(old)
        if new is not None:
            self._member_of[name] = new
            tally = self._tallies.get(new)
            if tally is None:
                bundle = self._fleet.groups[new]
                tally = self._tallies[new] = _Tally(bundle.version)
            tally.join(name, found)
            self._groups_touched.add(new)

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
        self._pending.discard(name)
        self._drifted.discard(name)
        if new is not None and name in self._devices:
            if new.state == "pending":
                self._pending.add(name)
            elif new.state == "drifted":
                self._drifted.add(name)
            silent_after = self.settings.silent_after
            watched = new.state != "offline" and new.last_seen is not None
            moved = old is None or old.last_seen != new.last_seen or old.state == "offline"
            if silent_after is not None and watched and moved and new.last_seen is not None:
                heapq.heappush(self._silent_at, (new.last_seen + silent_after, name))
        if old is not None:
            self._gauge_counts[old.group or ""][old.state] -= 1
            self._gauges_moved.add(old.group or "")
        if new is not None:
            self._gauge_counts.setdefault(new.group or "", Counter())[new.state] += 1
            self._gauges_moved.add(new.group or "")

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
        if dev.report is not None and report.seq < dev.report.seq:
            # An older report than the one held (a clustered engine's node back from a split
            # or a freeze delivers what the device sent it then): seq rises with every
            # report (SPEC 6.6), so the newer one stands. An equal seq is the same report.
            self._refuse(
                dev.name, "stale", f"seq {report.seq} is older than the seq {dev.report.seq} held"
            )
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

    def _due(self, now: float) -> set[str]:
        """What the tick decides again: pending devices (turning overdue), drifted ones of
        an enforce group whose reconcile command may be sent again, and those whose
        heartbeat is overdue and are not shown offline yet. Kept as statuses change (sets,
        and a heap by when each falls silent): work proportional to those, not the fleet."""
        due = set(self._pending)
        for name in self._drifted:
            dev = self._devices.get(name)
            if dev is not None and dev.status is not None and self._wants_command(dev, dev.status):
                due.add(name)
        heap, later = self._silent_at, []
        while heap and heap[0][0] < now:
            _, name = heapq.heappop(heap)
            found = self._counted.get(name)
            if found is not None and self._gone_silent(found, now):
                due.add(name)
                later.append((now + self.settings.tick, name))  # until it is shown offline
        for entry in later:
            heapq.heappush(heap, entry)
        return due

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

    # --- Decide (the loop's drift step) -------------------------------------------------

    def decide(self, *, tick: bool = False) -> list[DriftAction]:
        """The first half of a drift pass: decide every device that needs it (a message
        came, its desired state moved, everything after a reconnect; with ``tick`` also
        pending, silent and unreconciled devices) into typed actions, in order per device.
        Carry each out through the executor and hand it to :meth:`done`; then ask
        :meth:`summaries`, and call :meth:`passed`."""
        self._refresh_fleet()
        now = self._pass_now = self._clock()
        triggered, self._dirty = self._dirty, set()
        full, self._full = self._full, False
        restore, self._restore = self._restore, False
        self._pass_restore = self._pass_restore or restore
        reeval, self._reeval = self._reeval, set()
        names: set[str] = set(triggered) | reeval
        if full:
            names |= set(self._devices) | set(self._fleet.desired)
            self._all_groups = True
        elif tick:
            names |= self._due(now)
        if restore:
            self._all_groups = True
        actions: list[DriftAction] = []
        self._decide(names, triggered, now, restore, actions, self._groups_touched, self._latencies)
        return actions

    def summaries(self) -> list[GroupAction]:
        """The second half: the group summaries that moved (from the running tallies), as
        typed actions."""
        now, restore = self._pass_now, self._pass_restore
        if self._all_groups:
            self._groups_touched |= set(self._fleet.groups) | set(self._group_status)
        groups, self._groups_touched, self._all_groups = self._groups_touched, set(), False
        actions: list[GroupAction] = []
        if not self.settings.summaries:
            return actions  # the leader summarises the groups
        for group in sorted(g for g in groups if g):
            new = self._summary(group, now)
            old = self._group_status.get(group)
            if new is None:
                if old is not None:
                    actions.append(ClearGroup(group))
                continue
            if old is None or replace(old, time=0.0) != replace(new, time=0.0):
                actions.append(ShowGroup(group, new))
            elif restore and group not in self._groups_delivered:
                actions.append(ShowGroup(group, old))
        return actions

    def done(self, action: DriftAction | GroupAction) -> DriftStatus | None:
        """``action`` was carried out: record it. For a device's status, returns it (None
        when cleared), for the rollouts."""
        if isinstance(action, ShowGroup):
            self._group_status[action.group] = action.new
            return None
        if isinstance(action, ClearGroup):
            self._group_status.pop(action.group, None)
            return None
        # A device the decision removed (cleared) is still counted until it is cleared.
        dev = self._devices.get(action.device) or _Device(action.device)
        if isinstance(action, ClearDrift):
            self._set_status(dev, None)
            return None
        if isinstance(action, Reconcile):
            dev.command_seq = max(dev.command_seq, action.seq)
            log.info(
                "reconcile command seq %d sent to %s (%s)", action.seq, dev.name, action.reason
            )
            self.metrics.commands.labels(action.group or "-").inc()
            return dev.status
        old, new = action.old, action.new
        self._set_status(dev, new)
        change = change_of(old, new) if action.event else None
        if change is not None:
            if change != "changed" or new.state != "in_sync" or old is not None:
                log.info(
                    "drift %s: %s %s -> %s%s",
                    change,
                    dev.name,
                    old.state if old else "-",
                    new.state,
                    f" ({', '.join(r.id for r in new.resources)})" if new.resources else "",
                )
            self.events_published += 1
            self.metrics.drift_events.labels(new.group or "-", change).inc()
        return new

    async def passed(self) -> None:
        """The pass is carried out: latencies, gauges, and whoever waits for a pass."""
        done = self._clock()
        for arrived in self._latencies:
            self.metrics.latency.observe(max(0.0, done - arrived))
        self._latencies = []
        self._pass_restore = False
        self._set_gauges()
        self.passes += 1
        self.ready.set()
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
        the controller's loop through the executor, then recorded by :meth:`done`)."""
        for name in sorted(names):
            if not self._mine(name):
                continue  # another replica owns its shard
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

    def _set_gauges(self) -> None:
        """Set the per-group, per-state gauge of the groups whose running counts moved
        (by the engine that keeps the summaries: a shard owner's counts are partial)."""
        moved, self._gauges_moved = self._gauges_moved, set()
        if not self.settings.summaries:
            return
        for group in moved:
            per = self._gauge_counts.get(group)
            if per is not None and per.total() == 0 and group not in self._fleet.groups:
                del self._gauge_counts[group]  # a group no status names any more
                per = None
            self.metrics.set_group(group, per or {}, DRIFT_STATES)

    def behind(self) -> list[resending.Behind]:
        """The facts of rule 2 (``controller/resending.py``): every device retained as
        ``pending`` that lacks a version of its group or device bundle (not one a batched
        rollout holds it back from), and whether it is alive: a report came since that
        version was published, or its presence is ``online``. Work proportional to the
        pending devices."""
        out: list[resending.Behind] = []
        for name in sorted(self._pending):
            dev = self._devices.get(name)
            desired = self._fleet.desired.get(name)
            if dev is None or desired is None:
                continue
            if dev.status is None or dev.status.state != "pending":
                continue
            if dev.report is None:
                if not self._mine(name):  # the leader of replicas: the owner's status tells
                    found = self._behind_by_status(name, desired, dev.status)
                    out.extend((found,) if found is not None else ())
                continue
            report = dev.report

            lacks, newest = self._lacks(
                name,
                desired,
                _version_of(report.applied_device, name),
                _version_of(report.applied_group, desired.group),
            )
            if not lacks:
                continue
            fresh = dev.reported_at is not None and dev.reported_at > newest
            out.append(resending.Behind(name, tuple(lacks), dev.presence == "online" or fresh))
        return out

    def _behind_by_status(
        self, name: str, desired: Desired, found: DriftStatus
    ) -> resending.Behind | None:
        """Rule 2's facts from the status a shard owner published (the leader of replicas
        that split the shards takes no reports): the versions it says the device runs, and
        alive when it was last seen after the version it lacks was published."""
        lacks, newest = self._lacks(
            name, desired, found.applied_device_version, found.applied_version
        )
        if not lacks:
            return None
        fresh = found.last_seen is not None and found.last_seen > newest
        return resending.Behind(name, tuple(lacks), fresh)

    def _lacks(
        self, name: str, desired: Desired, device_got: int | None, group_got: int | None
    ) -> tuple[list[resending.Lack], float]:
        """The bundles a device runs older versions of (``*_got``: the version it runs of
        its own device bundle and of its group's, None when none or another's), and when
        the newest of those it lacks was published."""
        wanted = [(Target("device", name), desired.device_version, device_got)]
        if desired.pinned_from is None:
            wanted.append((Target("group", desired.group), desired.group_version, group_got))
        lacks: list[resending.Lack] = []
        newest = 0.0
        for target, version, got in wanted:
            if got is not None and got >= version:
                continue
            lacks.append(resending.Lack(target, version, got))
            current = self._published.get(target)
            if current is not None:
                newest = max(newest, current.published_at)
        return lacks, newest

    # --- For tests and tools ----------------------------------------------------------------

    def statuses(self) -> dict[str, DriftStatus]:
        """Every device's status as retained now (ours or another engine's)."""
        return {n: d.status for n, d in sorted(self._devices.items()) if d.status is not None}
