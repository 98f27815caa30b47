"""The dashboard's picture of the fleet: every retained operator topic, kept in memory.

:class:`Fleet` takes each MQTT message the dashboard receives (:meth:`Fleet.take`) and keeps
the latest group status, drift status, rollout status, ring gate and repository status, the
last events, and each group's convergence over the last hour. The pages ask it questions:
:meth:`Fleet.devices` filters, sorts and pages the devices on the server (a page is a slice,
never the whole fleet), :meth:`Fleet.rings` orders the rings and their groups.

It decodes with ``setpoint.proto``'s codecs and nothing else; a message that does not decode
is counted and remembered (:attr:`Fleet.ignored`), never fatal.

Pure; no I/O: the caller passes the clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from setpoint.proto import repository, rollout_status, status
from setpoint.proto.errors import ProtocolError
from setpoint.proto.repository import RepositoryStatus
from setpoint.proto.status import DRIFT_STATES, DriftStatus, GroupStatus
from setpoint.proto.topics import Topics

EVENTS_KEPT: Final = 500
HISTORY_SECONDS: Final = 3600.0
PER_PAGE: Final = 50
MAX_PER_PAGE: Final = 500
MAX_TEXT: Final = 200
# Worst first: the order "sort by state" uses.
SEVERITY: Final = {
    s: n
    for n, s in enumerate(
        ("failed", "rejected", "drifted", "blocked", "pending", "offline", "unknown", "in_sync")
    )
}
SORTS: Final = ("device", "group", "state", "since", "last_seen")

ChangeKind = Literal["group", "drift", "rollout", "gate", "repository", "event"]


@dataclass(frozen=True, slots=True)
class Change:
    """What a message changed: its kind and the group, device, ring or event type."""

    kind: ChangeKind
    key: str
    device: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceQuery:
    """The devices page's question: filters, sort and page (all from the URL)."""

    state: str = ""
    group: str = ""
    text: str = ""
    sort: str = "state"
    descending: bool = False
    page: int = 1
    per_page: int = PER_PAGE

    @classmethod
    def from_params(cls, params: Any) -> DeviceQuery:
        """From query parameters; anything unknown falls back to the default (a URL from a
        bookmark must never fail)."""

        def number(name: str, default: int, top: int) -> int:
            try:
                value = int(params.get(name, default))
            except (TypeError, ValueError):
                return default
            return min(max(value, 1), top)

        state = str(params.get("state", ""))
        sort = str(params.get("sort", "state"))
        return cls(
            state=state if state in DRIFT_STATES else "",
            group=str(params.get("group", ""))[:MAX_TEXT],
            text=str(params.get("q", "")).strip()[:MAX_TEXT],
            sort=sort if sort in SORTS else "state",
            descending=params.get("order") == "desc",
            page=number("page", 1, 1_000_000),
            per_page=number("per_page", PER_PAGE, MAX_PER_PAGE),
        )

    def params(self, **changes: Any) -> dict[str, str]:
        """This query as URL parameters (with ``changes``), defaults left out."""
        values = {
            "state": self.state,
            "group": self.group,
            "q": self.text,
            "sort": self.sort if self.sort != "state" else "",
            "order": "desc" if self.descending else "",
            "page": str(self.page) if self.page != 1 else "",
            "per_page": str(self.per_page) if self.per_page != PER_PAGE else "",
        }
        values.update({k: str(v) for k, v in changes.items()})
        return {k: v for k, v in values.items() if v}


@dataclass(frozen=True, slots=True)
class Page:
    """One page of devices and how many matched."""

    rows: list[DriftStatus]
    total: int
    page: int
    pages: int
    query: DeviceQuery


@dataclass(slots=True)
class Fleet:
    """Everything the pages show, updated message by message."""

    topics: Topics
    events_kept: int = EVENTS_KEPT
    groups: dict[str, GroupStatus] = field(default_factory=dict)
    drift: dict[str, DriftStatus] = field(default_factory=dict)
    # Lower-cased text each device is searched by, made once per status, not per request.
    search: dict[str, str] = field(default_factory=dict)
    # Device ids in order, remade only when a device comes or goes: a page then sorts by
    # one plain key, stably, instead of building a tuple per device per request.
    _order: list[str] | None = None
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    repository: RepositoryStatus | None = None
    events: deque[dict[str, Any]] = field(default_factory=deque)
    history: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    ignored: int = 0
    last_ignored: str = ""
    version: int = 0

    def take(self, topic: str, payload: bytes, now: float) -> Change | None:
        """Take one message; return what it changed (None: nothing, or not ours)."""
        try:
            change = self._take(topic, payload, now)
        except (ProtocolError, ValueError, TypeError, KeyError) as exc:
            self.ignored += 1
            self.last_ignored = f"{topic}: {exc}"[: MAX_TEXT * 2]
            return None
        if change is not None:
            self.version += 1
        return change

    def _take(self, topic: str, payload: bytes, now: float) -> Change | None:
        t = self.topics
        if topic == t.repository_status():
            self.repository = repository.from_json(payload) if payload else None
            return Change("repository", "")
        ref = t.parse(topic)
        if ref.kind == "group-rollout":
            if not payload:
                self.rollouts.pop(ref.name, None)
            else:
                rollout = rollout_status.rollout_from_json(payload)
                if rollout.group != ref.name:
                    raise ValueError(f"not a rollout status for {ref.name!r}")
                self.rollouts[ref.name] = rollout_status.rollout_to_dict(rollout)
            return Change("rollout", ref.name)
        if ref.kind == "ring-gate":
            if not payload:
                self.gates.pop(ref.name, None)
            else:
                gate = rollout_status.gate_from_json(payload)
                if gate.ring != ref.name:
                    raise ValueError(f"not a gate status for {ref.name!r}")
                self.gates[ref.name] = rollout_status.gate_to_dict(gate)
            return Change("gate", ref.name)
        if ref.kind == "group-status":
            if not payload:
                self.groups.pop(ref.name, None)
                self.history.pop(ref.name, None)
                return Change("group", ref.name)
            group = status.group_status_from_json(payload)
            self.groups[ref.name] = group
            self._record(ref.name, group.converged_pct, group.time or now, now)
            return Change("group", ref.name)
        if ref.kind == "device-drift":
            if ref.name not in self.drift or not payload:
                self._order = None
            if not payload:
                self.drift.pop(ref.name, None)
                self.search.pop(ref.name, None)
            else:
                drift = status.drift_from_json(payload)
                if drift.device != ref.name:
                    raise ValueError(f"the status names device {drift.device!r}")
                self.drift[ref.name] = drift
                self.search[ref.name] = _haystack(drift)
            return Change("drift", ref.name, device=ref.name)
        if ref.kind == "event" and payload:
            event = status.event_from_json(payload)
            self.events.append(event)
            while len(self.events) > self.events_kept:
                self.events.popleft()
            device = event.get("device")
            return Change("event", ref.name, device=device if isinstance(device, str) else None)
        return None

    def _record(self, group: str, pct: float, when: float, now: float) -> None:
        points = self.history.setdefault(group, deque())
        if not points or points[-1][1] != pct:
            points.append((when, pct))
        # Keep one point older than the window: it says where the line starts.
        while len(points) > 1 and points[1][0] < now - HISTORY_SECONDS:
            points.popleft()

    # Questions the pages ask -------------------------------------------------------------

    def devices(self, query: DeviceQuery) -> Page:
        """The devices matching ``query``, sorted, one page of them."""
        text = query.text.lower()
        if self._order is None:
            self._order = sorted(self.drift)
        drift = self.drift
        rows: Iterable[DriftStatus] = (drift[name] for name in self._order)
        if query.state:
            rows = (d for d in rows if d.state == query.state)
        if query.group:
            rows = (d for d in rows if d.group == query.group)
        if text:
            search = self.search
            rows = (d for d in rows if text in search.get(d.device, ""))
        key = _SORT_KEYS[query.sort]
        if key is None:
            matched = list(rows)
            if query.descending:
                matched.reverse()
        else:  # stable: devices with the same key stay in id order
            matched = sorted(rows, key=key, reverse=query.descending)
        pages = max(1, math.ceil(len(matched) / query.per_page))
        page = min(query.page, pages)
        start = (page - 1) * query.per_page
        return Page(matched[start : start + query.per_page], len(matched), page, pages, query)

    def counts(self) -> dict[str, int]:
        """Devices per state across the fleet (from the drift statuses)."""
        out = dict.fromkeys(DRIFT_STATES, 0)
        for d in self.drift.values():
            out[d.state] = out.get(d.state, 0) + 1
        return out

    def device_events(self, device: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("device") == device]

    def rings(self) -> list[tuple[str, dict[str, Any] | None, list[dict[str, Any]]]]:
        """Rings in promotion order (each after the ring its gate comes from), each with its
        gate (None for a ring without one) and the rollout statuses of its groups."""
        branches = {str(r.get("branch")) for r in self.rollouts.values()} | set(self.gates)
        sources = {ring: str(gate.get("from", "")) for ring, gate in self.gates.items()}
        branches |= {s for s in sources.values() if s}

        def depth(ring: str) -> int:
            seen = set()
            while ring in sources and ring not in seen:
                seen.add(ring)
                ring = sources[ring]
            return len(seen)

        ordered = sorted(branches, key=lambda b: (depth(b), b))
        return [
            (
                ring,
                self.gates.get(ring),
                sorted(
                    (r for r in self.rollouts.values() if r.get("branch") == ring),
                    key=lambda r: str(r.get("group")),
                ),
            )
            for ring in ordered
        ]

    def chart(self, now: float, width: int = 600, height: int = 120) -> list[tuple[str, str]]:
        """Each group's converged % over the last hour as SVG polyline points (a step line
        from the hour's start, or the first sample, to now)."""
        start = now - HISTORY_SECONDS
        out = []
        for group, points in sorted(self.history.items()):
            coords: list[tuple[float, float]] = []
            previous: float | None = None
            for when, pct in points:
                x = max(when, start)
                if previous is not None:
                    coords.append((x, previous))
                coords.append((x, pct))
                previous = pct
            if previous is not None:
                coords.append((now, previous))
            text = " ".join(
                f"{(x - start) / HISTORY_SECONDS * width:.1f},{height - pct / 100 * height:.1f}"
                for x, pct in coords
            )
            out.append((group, text))
        return out


def _haystack(d: DriftStatus) -> str:
    parts = [d.device, d.group or "", d.state, d.reason, d.commit or ""]
    parts.extend(f"{r.id} {r.why}" for r in d.resources)
    return " ".join(parts).lower()


_SORT_KEYS: Final[dict[str, Callable[[DriftStatus], Any] | None]] = {
    "device": None,  # the id order itself
    "group": lambda d: d.group or "",
    "state": lambda d: SEVERITY.get(d.state, 99),
    "since": lambda d: d.since,
    "last_seen": lambda d: d.last_seen or 0.0,
}


def summary(event: dict[str, Any]) -> tuple[str, str]:
    """An event's subject (device, group, ring or target) and a line saying what happened."""
    kind = event.get("type")
    subject = next(
        (str(event[k]) for k in ("device", "group", "ring", "target", "branch") if event.get(k)),
        "",
    )
    if kind == "drift":
        line = f"{event.get('previous') or '(new)'} → {event.get('state')}"
        resources = event.get("resources") or []
        if isinstance(resources, list) and resources:
            line += ": " + ", ".join(
                f"{r.get('id')} ({r.get('why')})" for r in resources if isinstance(r, dict)
            )
        elif event.get("reason"):
            line += f": {event['reason']}"
        return subject, line
    if kind in ("published", "removed"):
        return subject, (
            f"{event.get('kind')} v{event.get('version')} @ {str(event.get('commit'))[:12]}"
            f" ({event.get('reason') or kind})"
        )
    if kind == "rollout":
        return subject, f"{event.get('action')}: {event.get('reason') or ''}".rstrip(": ")
    if kind == "repository-error":
        where = event.get("file") or ""
        return subject, f"{str(event.get('commit'))[:12]} {where}: {event.get('message')}"
    return subject, str(event.get("reason") or event.get("message") or event.get("state") or "")
