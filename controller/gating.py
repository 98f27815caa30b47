"""Rings, gates, batches and maintenance windows: the pure decisions of a rollout.

A fleet declares *rings* in ``fleet.yaml``: ordered branches (``main`` -> ``canary`` ->
``production``). Every ring after the first has a :class:`Gate`: the ring it promotes
from, the share of that ring's devices that must be ``in_sync`` on the same content, how
long that must hold without failures, and whether a person must approve. Content is the
git *tree* of a ring's head commit: a merge makes a new commit but, when it promotes
unmodified, the same tree, so "the same content" survives promotion.

This module answers, from facts gathered elsewhere:

* :func:`ring_health`: how the devices of a ring are doing on the tree it runs;
* :func:`track`: the evidence a gate keeps per tree (ran, healthy since, passed);
* :func:`decide_gate`: ``open``, ``waiting`` (with what is missing) or ``refused``;
* :func:`plan_batches` / :func:`assess_batch`: which devices form each batch of a group's
  rollout, and whether a released batch completed or must halt;
* :class:`Window`: whether a maintenance window is open, and when it opens next.

Rule for offline devices in a batch: an offline device is neither a success nor a
failure. It counts as *not in sync*, so a batch with ``success: 100%`` waits for it (the
status names it), while ``success: 80%`` lets the rollout go on without it; it never
counts towards ``max_failures``.

Pure; no I/O.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from setpoint.proto.rollout_status import GateRule
from setpoint.proto.status import DriftStatus

DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOURS: Final = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")
UNHEALTHY: Final = frozenset({"failed", "rejected", "drifted"})
FAILED: Final = frozenset({"failed", "rejected"})

GateState = Literal["open", "waiting", "refused"]


# --- Parsing helpers (used by the fleet schema) --------------------------------------


def parse_share(value: Any) -> float:
    """A share from ``"80%"``, ``0.8`` or ``1``: a float in [0, 1]."""
    if isinstance(value, bool):
        raise ValueError("must be a share like '80%' or 0.8")
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            raise ValueError(f"{value!r} is not a share: write e.g. '80%' or 0.8")
        try:
            share = float(text[:-1]) / 100.0
        except ValueError:
            raise ValueError(f"{value!r} is not a share: write e.g. '80%' or 0.8") from None
    elif isinstance(value, int | float):
        share = float(value)
    else:
        raise ValueError(f"{value!r} is not a share: write e.g. '80%' or 0.8")
    if not 0.0 <= share <= 1.0 or math.isnan(share):
        raise ValueError(f"{value!r} is out of range (0%-100%)")
    return share


# --- Rings and gates ------------------------------------------------------------------


# What content must have done on ring ``source`` before it may run on this ring: the
# declared gate, as the gate status shows it (one type for both).
Gate = GateRule


@dataclass(frozen=True, slots=True)
class Ring:
    branch: str
    gate: Gate | None = None


@dataclass(frozen=True, slots=True)
class Rings:
    rings: tuple[Ring, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.rings)

    def get(self, branch: str) -> Ring | None:
        return next((r for r in self.rings if r.branch == branch), None)

    def gated(self) -> tuple[Ring, ...]:
        return tuple(r for r in self.rings if r.gate is not None)

    def downstream(self, branch: str) -> tuple[Ring, ...]:
        return tuple(r for r in self.rings if r.gate is not None and r.gate.source == branch)


def check_rings(rings: Sequence[Ring]) -> list[str]:
    """Problems with a ring declaration: duplicates, unknown branches, cycles."""
    problems: list[str] = []
    names = [r.branch for r in rings]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            problems.append(f"ring {name!r} is declared twice; keep one")
        seen.add(name)
    known = ", ".join(names) or "none"
    for ring in rings:
        if ring.gate is None:
            continue
        if ring.gate.source not in seen:
            problems.append(
                f"ring {ring.branch!r}: gate 'from: {ring.gate.source}' names a branch that is"
                f" not a ring (rings: {known}); declare it as a ring or fix the name"
            )
        elif ring.gate.source == ring.branch:
            problems.append(f"ring {ring.branch!r}: a gate cannot promote from its own ring")
    sources = {r.branch: r.gate.source for r in rings if r.gate is not None}
    reported: set[frozenset[str]] = set()
    for start in sources:
        path = [start]
        node = start
        while node in sources:
            node = sources[node]
            if node in path:
                cycle = [*path[path.index(node) :], node]
                key = frozenset(cycle)
                if key not in reported and len(cycle) > 2:
                    reported.add(key)
                    problems.append(
                        "gates make a cycle: "
                        + " <- ".join(cycle)
                        + "; every promotion must start from a ring without a gate"
                    )
                break
            path.append(node)
    return problems


# --- Evidence -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RingHealth:
    """How a ring's devices do on the one tree its groups run."""

    branch: str
    tree: str
    devices: int
    in_sync: int
    unhealthy: tuple[tuple[str, str, str], ...] = ()  # (device, state, reason)

    @property
    def share(self) -> float:
        return self.in_sync / self.devices if self.devices else 0.0


def ring_health(
    branch: str,
    groups: Mapping[str, tuple[int, str | None]],
    members: Mapping[str, str],
    statuses: Mapping[str, DriftStatus],
) -> RingHealth | None:
    """``groups``: group id -> (published version, tree it was rendered from);
    ``members``: device id -> group id. None when the ring's groups run different trees
    (a change is still being published) or the tree is unknown."""
    trees = {tree for _v, tree in groups.values()}
    if len(trees) != 1 or None in trees:
        return None
    tree = next(iter(trees))
    assert tree is not None
    in_sync = 0
    unhealthy: list[tuple[str, str, str]] = []
    devices = [d for d, g in members.items() if g in groups]
    for device in sorted(devices):
        version = groups[members[device]][0]
        status = statuses.get(device)
        if status is None:
            continue
        if status.state == "in_sync" and status.applied_version == version:
            in_sync += 1
        elif status.state in UNHEALTHY and status.desired_version == version:
            unhealthy.append((device, status.state, status.reason))
    return RingHealth(branch, tree, len(devices), in_sync, tuple(unhealthy))


@dataclass(frozen=True, slots=True)
class Evidence:
    """What one tree did on a gate's source ring (times are Unix seconds)."""

    ran_at: float | None = None
    healthy_since: float | None = None
    passed_at: float | None = None
    in_sync: int = 0
    devices: int = 0
    unhealthy: tuple[tuple[str, str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "ran_at": self.ran_at,
            "healthy_since": self.healthy_since,
            "passed_at": self.passed_at,
            "in_sync": self.in_sync,
            "devices": self.devices,
            "unhealthy": [list(u) for u in self.unhealthy],
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Evidence:
        return cls(
            ran_at=raw.get("ran_at"),
            healthy_since=raw.get("healthy_since"),
            passed_at=raw.get("passed_at"),
            in_sync=int(raw.get("in_sync", 0)),
            devices=int(raw.get("devices", 0)),
            unhealthy=tuple(tuple(u) for u in raw.get("unhealthy", ())),  # type: ignore[misc]
        )


def healthy(gate: Gate, health: RingHealth) -> bool:
    return (
        health.devices > 0
        and health.share >= gate.in_sync
        and len(health.unhealthy) <= gate.max_unhealthy
    )


def track(evidence: Evidence | None, gate: Gate, health: RingHealth, now: float) -> Evidence:
    """Fold the source ring's current health into a tree's evidence. Once passed, a tree
    stays passed (it proved itself; a later problem on the source ring is that ring's
    business, and a rollback to a passed tree must not wait)."""
    ev = evidence or Evidence(ran_at=now)
    if ev.ran_at is None:
        ev = replace(ev, ran_at=now)
    counts = dict(in_sync=health.in_sync, devices=health.devices, unhealthy=health.unhealthy)
    if ev.passed_at is not None:
        return replace(ev, **counts)  # type: ignore[arg-type]
    if not healthy(gate, health):
        return replace(ev, healthy_since=None, **counts)  # type: ignore[arg-type]
    since = ev.healthy_since if ev.healthy_since is not None else now
    passed = now if now - since >= gate.healthy_for else None
    return replace(ev, healthy_since=since, passed_at=passed, **counts)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class GateDecision:
    state: GateState
    reason: str
    missing: tuple[str, ...] = ()
    until: float | None = None  # when a timer may open it

    @property
    def open(self) -> bool:
        return self.state == "open"


def decide_gate(
    ring: str,
    gate: Gate,
    tree: str,
    evidence: Evidence | None,
    *,
    approved: bool,
    now: float,
) -> GateDecision:
    """May content ``tree`` run on ``ring``?"""
    src = gate.source
    if evidence is None or evidence.ran_at is None:
        return GateDecision(
            "refused",
            f"content {tree[:12]} never ran on {src}: promote it to {src} first"
            f" (merge {src} into {ring}, do not commit to {ring} directly)",
            (f"run on {src}",),
        )
    missing: list[str] = []
    until = None
    if evidence.passed_at is None:
        need = math.ceil(gate.in_sync * evidence.devices) if evidence.devices else 1
        if evidence.devices == 0:
            missing.append(f"{src} has no devices to prove it on")
        elif evidence.in_sync < need:
            missing.append(
                f"{evidence.in_sync}/{evidence.devices} devices in sync on {src}"
                f" (need {need}, {gate.in_sync:.0%})"
            )
        if len(evidence.unhealthy) > gate.max_unhealthy:
            names = ", ".join(f"{d} {s}" for d, s, _ in evidence.unhealthy[:5])
            missing.append(
                f"{len(evidence.unhealthy)} unhealthy on {src} (at most"
                f" {gate.max_unhealthy}): {names}"
            )
        if evidence.healthy_since is not None:
            until = evidence.healthy_since + gate.healthy_for
            left = max(0.0, until - now)
            missing.append(f"healthy on {src} for {gate.healthy_for}s ({left:.0f}s to go)")
        elif not missing:
            missing.append(f"healthy on {src} for {gate.healthy_for}s")
    if gate.approval and not approved:
        missing.append(f"an approval of {tree[:12]} for {ring} (setpoint approve {ring})")
    if missing:
        return GateDecision("waiting", "waiting for " + "; ".join(missing), tuple(missing), until)
    return GateDecision("open", f"content {tree[:12]} passed on {src}")


# --- Batches --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How a group rolls a new version out: ``size`` devices (or ``share`` of them) per
    batch, ``pause`` seconds after a batch completed, devices in ``order`` first (then by
    the var ``by``, then by id)."""

    size: int | None = None
    share: float | None = None
    pause: int = 0
    order: tuple[str, ...] = ()
    by: str | None = None
    success: float = 1.0
    max_failures: int = 0
    on_failure: Literal["halt", "revert"] = "halt"


def plan_batches(
    devices: Mapping[str, Mapping[str, Any]], policy: BatchPolicy
) -> list[tuple[str, ...]]:
    """Split ``devices`` (id -> vars) into batches, in release order."""
    rank = {d: i for i, d in enumerate(policy.order)}

    def key(device: str) -> tuple[Any, ...]:
        value = devices[device].get(policy.by) if policy.by else None
        return (rank.get(device, len(rank)), value is None, str(value), device)

    ordered = sorted(devices, key=key)
    if not ordered:
        return []
    if policy.size is not None:
        size = policy.size
    elif policy.share is not None:
        size = math.ceil(policy.share * len(ordered))
    else:
        size = len(ordered)
    size = max(1, size)
    return [tuple(ordered[i : i + size]) for i in range(0, len(ordered), size)]


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    in_sync: tuple[str, ...] = ()
    failed: tuple[tuple[str, str, str], ...] = ()  # (device, state, reason)
    offline: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()

    def complete(self, size: int, success: float) -> bool:
        return len(self.in_sync) >= math.ceil(success * size)

    def halts(self, max_failures: int) -> bool:
        return len(self.failed) > max_failures


def assess_batch(
    devices: Iterable[str], version: int, statuses: Mapping[str, DriftStatus]
) -> BatchOutcome:
    """How the devices of a released batch do on group ``version``."""
    in_sync: list[str] = []
    failed: list[tuple[str, str, str]] = []
    offline: list[str] = []
    waiting: list[str] = []
    for device in devices:
        s = statuses.get(device)
        if s is None:
            waiting.append(device)
        elif s.state == "in_sync" and s.applied_version == version:
            in_sync.append(device)
        elif s.state in FAILED and s.desired_version == version:
            failed.append((device, s.state, s.reason))
        elif s.state == "offline":
            offline.append(device)
        else:
            waiting.append(device)
    return BatchOutcome(tuple(in_sync), tuple(failed), tuple(offline), tuple(waiting))


# --- Maintenance windows --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """Days of the week and a daily time range (``end`` may be past midnight), in ``tz``."""

    days: frozenset[int] = field(default_factory=lambda: frozenset(range(7)))
    start: int = 0  # minutes after midnight
    end: int = 24 * 60
    tz: str = "UTC"

    def _zone(self) -> dt.tzinfo:
        return zoneinfo.ZoneInfo(self.tz)

    def contains(self, now: float) -> bool:
        local = dt.datetime.fromtimestamp(now, self._zone())
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Over midnight: the part before midnight belongs to the day it started on.
        if minute >= self.start:
            return day in self.days
        return minute < self.end and (day - 1) % 7 in self.days

    def next_open(self, now: float) -> float:
        """The next moment (>= now) the window is open (a minute's resolution)."""
        if self.contains(now):
            return now
        zone = self._zone()
        local = dt.datetime.fromtimestamp(now, zone)
        for offset in range(0, 8):
            day = (local + dt.timedelta(days=offset)).date()
            if day.weekday() not in self.days:
                continue
            opening = dt.datetime.combine(
                day, dt.time(self.start // 60, self.start % 60), tzinfo=zone
            ).timestamp()
            if opening > now:
                return opening
        return now + 7 * 86400  # pragma: no cover - a window with no day is refused

    def describe(self) -> str:
        days = ",".join(DAYS[d] for d in sorted(self.days))
        return (
            f"{days} {self.start // 60:02d}:{self.start % 60:02d}-"
            f"{self.end // 60:02d}:{self.end % 60:02d} {self.tz}"
        )


def parse_window(days: Sequence[str], hours: str, tz: str) -> Window:
    """A :class:`Window` from ``days: [mon, tue]``, ``hours: "22:00-04:00"``, ``tz``."""
    picked: set[int] = set()
    for day in days:
        name = str(day).strip().lower()[:3]
        if name not in DAYS:
            raise ValueError(f"day {day!r} is unknown (use {', '.join(DAYS)})")
        picked.add(DAYS.index(name))
    if not picked:
        raise ValueError("a window needs at least one day")
    match = _HOURS.fullmatch(hours.strip())
    if match is None:
        raise ValueError(f"hours {hours!r}: write them like '22:00-04:00'")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
        raise ValueError(f"hours {hours!r}: not a time of day")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise ValueError(f"hours {hours!r}: the window is empty")
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"time zone {tz!r} is unknown (use e.g. 'Europe/Berlin', 'UTC')") from None
    return Window(frozenset(picked), start, end, tz)


def is_urgent(summary: str) -> bool:
    """A change is urgent when its commit subject says ``[urgent]``."""
    return "[urgent]" in summary.lower()
