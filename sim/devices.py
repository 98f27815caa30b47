"""Simulated devices: shims on the wire, memory instead of a disk.

A :class:`SimDevice` does what ``setpoint shim`` does over MQTT, in the same formats, built
with the same ``setpoint.proto`` functions:

* subscribes to ``devices/<id>/desired`` and ``devices/<id>/command``, then to the desired
  topic of the group its verified device bundle names (leaving the previous group's);
* verifies every bundle for real (``envelopes.verify``, ``bundles.decode``) and judges it
  against its own trust state (target, expiry, version floor: the checks of
  ``TrustState.evaluate``); refusals are reported with the shim's reason words;
* "applies" the effective resources to memory and reports each one ``ok`` with the digest
  of the effective resource (what a real shim observes after a good apply);
* keeps presence: will ``offline`` (retained, QoS 1), ``online`` on connect;
* obeys signed reconcile commands (verified, bound, unexpired, strictly newer).

Ten thousand devices receive the same group bundle, so the signature check and decoding of
a payload are done once per distinct envelope (:class:`Verifier`); what depends on the
device (target, expiry, floor) is judged per device.

Faults are injected by :class:`Faults`: hand-made drift, failed applies, refusals, offline
churn. The I/O (connections, timers) belongs to :mod:`setpoint.sim.running`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from setpoint.proto import bundles, commands, envelopes, reports
from setpoint.proto.bundles import Bundle, BundleKind, Resource
from setpoint.proto.errors import (
    ExpiredError,
    PayloadTooLarge,
    ProtocolError,
    RollbackError,
    SchemaError,
    WrongTargetError,
    refusal_reason,
)
from setpoint.proto.reports import Applied, Failure, Refusal, Report, ResourceReport
from setpoint.proto.topics import Topics
from setpoint.proto.trust import DEFAULT_SKEW, PAYLOAD_TYPES, Floor, TrustState, Verdict

from . import mqtt

SIM_VERSION: Final = "sim-1"
MAX_COMMAND_ENVELOPE: Final = 2 * commands.MAX_COMMAND_BYTES


class SimulatedRefusal(ProtocolError):
    """A refusal injected by ``--refuse-rate`` (reported with reason ``refused``)."""


class Verifier:
    """Signature check and decoding, once per distinct envelope (an LRU of results)."""

    def __init__(self, trusted: Mapping[str, Ed25519PublicKey], size: int = 256) -> None:
        self.trusted = dict(trusted)
        self._cache: OrderedDict[tuple[str, bytes], tuple[Bundle, str] | ProtocolError] = (
            OrderedDict()
        )
        self._size = size
        self.verified = 0  # signature checks actually done
        self.hits = 0

    def bundle(self, kind: BundleKind, data: bytes) -> tuple[Bundle, str]:
        """The bundle in ``data`` and its content digest; raise the refusal's error."""
        key = (kind, data)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._check(kind, data)
            self._cache[key] = cached
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        else:
            self.hits += 1
            self._cache.move_to_end(key)
        if isinstance(cached, ProtocolError):
            raise cached
        return cached

    def _check(self, kind: BundleKind, data: bytes) -> tuple[Bundle, str] | ProtocolError:
        self.verified += 1
        try:
            payload = envelopes.verify(data, self.trusted, payload_type=PAYLOAD_TYPES[kind])
            bundle = bundles.decode(payload)
            if bundle.kind != kind:
                raise SchemaError(f"a {bundle.kind} bundle arrived where a {kind} bundle belongs")
            return bundle, bundle.content_digest()
        except ProtocolError as exc:
            return exc

    def command(self, data: bytes) -> commands.Command:
        if len(data) > MAX_COMMAND_ENVELOPE:
            raise PayloadTooLarge(f"command over the {MAX_COMMAND_ENVELOPE}-byte limit")
        payload = envelopes.verify(
            data, self.trusted, payload_type=envelopes.COMMAND_TYPE, max_size=MAX_COMMAND_ENVELOPE
        )
        return commands.decode(payload)


def judge(
    trust: TrustState,
    bundle: Bundle,
    digest: str,
    now: float,
    skew: float = DEFAULT_SKEW,
) -> Verdict:
    """The per-device half of ``TrustState.evaluate`` (target, expiry, version floor)."""
    kind = bundle.kind
    expected = trust.device if kind == "device" else trust.group
    if expected is None:
        raise WrongTargetError(f"group bundle {bundle.target!r}: no group assigned yet")
    if bundle.target != expected:
        raise WrongTargetError(
            f"{kind} bundle for {bundle.target!r}; this device expects {expected!r}"
        )
    if now > bundle.expires_at + skew:
        raise ExpiredError(
            f"{kind} bundle {bundle.target!r} v{bundle.version} expired at {bundle.expires_at}"
        )
    floor: Floor | None = trust.floor(kind, bundle.target)
    if floor is not None:
        if bundle.version < floor.version:
            raise RollbackError(
                f"{kind} bundle {bundle.target!r} v{bundle.version} is older than"
                f" applied v{floor.version}"
            )
        if bundle.version == floor.version and digest != floor.digest:
            raise RollbackError(
                f"{kind} bundle {bundle.target!r} v{bundle.version} has other content"
                " than the applied bundle of the same version"
            )
    return Verdict(bundle, digest, floor is None or bundle.version > floor.version)


@dataclass(frozen=True, slots=True)
class Faults:
    """What to inject. Rates of events are per second across the fleet (``drift``,
    ``churn``); ``fail`` and ``refuse`` are the probability that a new bundle fails to
    apply or is refused."""

    drift: float = 0.0
    fail: float = 0.0
    refuse: float = 0.0
    churn: float = 0.0
    heal_after: float = 1.0
    offline_for: tuple[float, float] = (1.0, 5.0)

    def __post_init__(self) -> None:
        for name in ("drift", "churn", "heal_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} rate must be >= 0, got {getattr(self, name)}")
        for name in ("fail", "refuse"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} rate is a probability: 0 to 1, got {getattr(self, name)}")


@dataclass(slots=True)
class Counters:
    applied: int = 0
    refused: int = 0
    failed: int = 0
    reports: int = 0
    drifts: int = 0
    heals: int = 0
    commands: int = 0


class Fleet:
    """What every simulated device of one process shares."""

    def __init__(
        self,
        topics: Topics,
        verifier: Verifier | None,
        *,
        faults: Faults = Faults(),
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        skew: float = DEFAULT_SKEW,
    ) -> None:
        self.topics = topics
        self.verifier = verifier
        self.faults = faults
        self.rng = rng or random.Random()
        self.clock = clock
        self.skew = skew
        self.counters = Counters()
        self.on_applied: Callable[[SimDevice], None] | None = None


class SimDevice:
    """One simulated shim: its topics, trust state, what it applied, and its reports."""

    __slots__ = (
        "applied_device",
        "applied_group",
        "command_seq",
        "conn",
        "drifted",
        "failure",
        "fleet",
        "group_topic",
        "id",
        "refusals",
        "seq",
        "statuses",
        "topic_command",
        "topic_desired",
        "topic_presence",
        "topic_reported",
        "trust",
        "want_device",
        "want_group",
    )

    def __init__(self, device_id: str, fleet: Fleet) -> None:
        topics = fleet.topics
        self.id = device_id
        self.fleet = fleet
        self.topic_desired = topics.device_desired(device_id)
        self.topic_command = topics.device_command(device_id)
        self.topic_reported = topics.device_reported(device_id)
        self.topic_presence = topics.device_presence(device_id)
        self.group_topic: str | None = None
        self.trust = TrustState(device_id)
        self.want_device: Verdict | None = None
        self.want_group: Verdict | None = None
        self.applied_device: Verdict | None = None
        self.applied_group: Verdict | None = None
        self.statuses: tuple[ResourceReport, ...] = ()
        self.drifted: str | None = None
        self.refusals: list[Refusal] = []
        self.failure: Failure | None = None
        self.command_seq = 0
        self.seq = 0
        self.conn: mqtt.Connection | None = None

    # --- Wire ------------------------------------------------------------------------------

    def will(self) -> tuple[str, bytes, int, bool]:
        return (self.topic_presence, reports.PRESENCE_OFFLINE, 1, True)

    def subscriptions(self) -> list[tuple[str, int]]:
        wanted = [(self.topic_desired, 1), (self.topic_command, 1)]
        if self.group_topic is not None:
            wanted.append((self.group_topic, 1))
        return wanted

    def connected(self, conn: mqtt.Connection) -> asyncio.Future[list[int]]:
        """A new session: subscribe, say online, and report where we are."""
        self.conn = conn
        subscribed = conn.subscribe(self.subscriptions())
        conn.publish(self.topic_presence, reports.PRESENCE_ONLINE, qos=1, retain=True)
        if self.seq:
            self.report()
        return subscribed

    def on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if not payload:
            return  # a cleared retained message: unsigned, never undoes anything
        now = self.fleet.clock()
        if topic == self.topic_desired:
            self._bundle("device", payload, now)
        elif topic == self.group_topic:
            self._bundle("group", payload, now)
        elif topic == self.topic_command:
            self._command(payload, now)

    # --- Bundles ---------------------------------------------------------------------------

    def _bundle(self, kind: BundleKind, payload: bytes, now: float) -> None:
        fleet = self.fleet
        assert fleet.verifier is not None
        try:
            bundle, digest = fleet.verifier.bundle(kind, payload)
            verdict = judge(self.trust, bundle, digest, now, fleet.skew)
            if verdict.new and fleet.faults.refuse and fleet.rng.random() < fleet.faults.refuse:
                raise SimulatedRefusal(f"{kind} bundle refused by the simulator (--refuse-rate)")
        except ProtocolError as exc:
            self._refuse(kind, payload, exc, now)
            return
        if kind == "device":
            if self.want_device is None or bundle.version >= self.want_device.bundle.version:
                self.want_device = verdict
            self._follow(bundle.group)
        else:
            if self.want_group is None or bundle.version >= self.want_group.bundle.version:
                self.want_group = verdict
        self._converge(now)

    def _follow(self, group: str | None) -> None:
        wanted = None if group is None else self.fleet.topics.group_desired(group)
        if wanted == self.group_topic:
            return
        old, self.group_topic = self.group_topic, wanted
        self.trust = TrustState(self.trust.device, group, self.trust.floors)
        if self.want_group is not None and self.want_group.bundle.target != group:
            self.want_group = None
        conn = self.conn
        if conn is not None:
            if old is not None:
                conn.unsubscribe([old])
            if wanted is not None:
                conn.subscribe([(wanted, 1)])

    def _converge(self, now: float) -> None:
        device, group = self.want_device, self.want_group
        if device is None or group is None or group.bundle.target != device.bundle.group:
            return
        group = self._pinned(device.bundle, group)
        same = (
            self.applied_device is not None
            and self.applied_group is not None
            and self.applied_device.digest == device.digest
            and self.applied_group.digest == group.digest
            and self.applied_device.bundle.version == device.bundle.version
            and self.applied_group.bundle.version == group.bundle.version
        )
        if same:
            return
        faults, fleet = self.fleet.faults, self.fleet
        if faults.fail and (device.new or group.new) and fleet.rng.random() < faults.fail:
            target = group.bundle if group.new else device.bundle
            self.failure = Failure(
                target.target, target.version, "apply failed (simulated: --fail-rate)", True,
                int(now),
            )  # fmt: skip
            fleet.counters.failed += 1
            self.want_device = self.want_group = None
            self.report()
            return
        self.trust = self.trust.record(device).record(group)
        self.applied_device, self.applied_group = device, group
        self.failure = None
        self.drifted = None
        self.statuses = self._statuses(bundles.effective(group.bundle, device.bundle))
        fleet.counters.applied += 1
        self.report()
        if fleet.on_applied is not None:
            fleet.on_applied(self)

    def _pinned(self, device: Bundle, newest: Verdict) -> Verdict:
        """The group bundle to run under the device bundle's pin (``group_version``,
        proto/SPEC.md 6.4), as the shim decides it: a device that already runs a bundle of
        its group keeps running it while the newest one is above the pin (the newest stays
        held in ``want_group`` and is applied when a device bundle moves the pin up to it); a
        device that runs nothing of its group takes the newest, whatever the pin. The pin is
        never a floor."""
        pin, running = device.group_version, self.applied_group
        if (
            pin is not None
            and newest.bundle.version > pin
            and running is not None
            and running.bundle.target == newest.bundle.target
        ):
            return running
        return newest

    @staticmethod
    def _statuses(resources: list[Resource]) -> tuple[ResourceReport, ...]:
        return tuple(
            ResourceReport(r.id, r.kind, "ok", bundles.resource_digest(r), "") for r in resources
        )

    def _refuse(self, kind: str, payload: bytes, exc: ProtocolError, now: float) -> None:
        target, version = self.id if kind in ("device", "command") else "?", 0
        try:  # name the refused bundle from its unverified payload (for the report only)
            peek = envelopes.decode(payload)
            raw = bundles.decode(peek.payload) if kind != "command" else None
            if raw is not None:
                target, version = raw.target, raw.version
        except ProtocolError:
            pass
        if kind == "group" and target == "?":
            target = self.trust.group or "?"
        self.refusals.append(
            Refusal(target, kind, version, refusal_reason(exc), str(exc)[:512], int(now))
        )
        del self.refusals[: -reports.MAX_REFUSALS]
        self.fleet.counters.refused += 1
        self.report()

    # --- Commands and faults ---------------------------------------------------------------

    def _command(self, payload: bytes, now: float) -> None:
        fleet = self.fleet
        assert fleet.verifier is not None
        try:
            command = fleet.verifier.command(payload)
            if command.device != self.id:
                raise WrongTargetError(f"command for {command.device!r}, not {self.id!r}")
            if now > command.expires_at + fleet.skew:
                raise ExpiredError(f"command seq {command.seq} expired at {command.expires_at}")
            if command.seq <= self.command_seq:
                raise RollbackError(f"command seq {command.seq} replayed")
        except ProtocolError as exc:
            self._refuse("command", payload, exc, now)
            return
        self.command_seq = command.seq
        fleet.counters.commands += 1
        if self.drifted is not None and self.mode == "enforce":
            self.heal()

    @property
    def mode(self) -> str:
        return self.applied_group.bundle.mode if self.applied_group is not None else "enforce"

    def drift(self) -> bool:
        """Change one resource by hand (simulated); False if nothing is applied."""
        if not self.statuses or self.drifted is not None:
            return False
        victim = self.fleet.rng.choice(self.statuses)
        self.drifted = victim.id
        self.statuses = tuple(
            ResourceReport(s.id, s.kind, "drifted", "0" * 64, "changed by hand (simulated)")
            if s.id == victim.id
            else s
            for s in self.statuses
        )
        self.fleet.counters.drifts += 1
        self.report()
        return True

    def heal(self) -> None:
        """Put the drifted resource back (enforce mode), reported ``healed``."""
        if self.drifted is None or self.applied_group is None or self.applied_device is None:
            return
        wanted = {
            r.id: r
            for r in bundles.effective(self.applied_group.bundle, self.applied_device.bundle)
        }
        resource = wanted.get(self.drifted)
        self.statuses = tuple(
            ResourceReport(s.id, s.kind, "healed", bundles.resource_digest(resource), "put back")
            if resource is not None and s.id == self.drifted
            else s
            for s in self.statuses
        )
        self.drifted = None
        self.fleet.counters.heals += 1
        self.report()

    # --- Reporting -------------------------------------------------------------------------

    def build_report(self) -> Report:
        def applied(verdict: Verdict | None) -> Applied | None:
            if verdict is None:
                return None
            b = verdict.bundle
            return Applied(b.target, b.version, b.commit, verdict.digest)

        return Report(
            device=self.id,
            time=int(self.fleet.clock()),
            seq=self.seq + 1,
            shim_version=SIM_VERSION,
            mode=self.mode,
            group=self.trust.group,
            applied_group=applied(self.applied_group),
            applied_device=applied(self.applied_device),
            resources=self.statuses,
            refusals=tuple(self.refusals),
            failure=self.failure,
        )

    def report(self) -> bool:
        """Publish the whole current truth (retained, QoS 1); False when offline."""
        report = self.build_report()
        self.seq = report.seq
        conn = self.conn
        if conn is None or not conn.connected:
            return False
        conn.publish(self.topic_reported, reports.encode(report), qos=1, retain=True)
        self.fleet.counters.reports += 1
        return True
