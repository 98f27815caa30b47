"""What the controller tells operators: drift status, group status and events, as JSON.

These are for people's tools (``mosquitto_sub``, Node-RED, Telegraf), so they are plain
JSON objects with sorted keys; every field is listed in ``proto/SPEC.md``.

Pure; no I/O.
"""

from __future__ import annotations

import time as _time
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from . import codec
from .errors import SchemaError

MAX_STATUS_BYTES: Final = 256 * 1024
# ``blocked``: the device's own policy refuses a resource; not drift, nobody changed anything.
DriftState = Literal[
    "in_sync", "pending", "drifted", "failed", "rejected", "blocked", "offline", "unknown"
]
DRIFT_STATES: Final[tuple[DriftState, ...]] = (
    "in_sync",
    "pending",
    "drifted",
    "failed",
    "rejected",
    "blocked",
    "offline",
    "unknown",
)


@dataclass(frozen=True, slots=True)
class ResourceDiff:
    """One resource that differs from what is desired, and why."""

    id: str
    why: str


@dataclass(frozen=True, slots=True)
class DriftStatus:
    """One device's state as the controller computed it (retained on ``.../drift``)."""

    device: str
    group: str | None
    state: DriftState
    desired_version: int | None
    applied_version: int | None
    commit: str | None
    since: float
    resources: tuple[ResourceDiff, ...] = ()
    reason: str = ""
    last_seen: float | None = None
    desired_device_version: int | None = None
    applied_device_version: int | None = None
    report_seq: int | None = None

    def same_condition(self, other: DriftStatus | None) -> bool:
        """True when nothing an operator cares about changed (time aside)."""
        return other is not None and (
            self.state,
            self.group,
            self.desired_version,
            self.applied_version,
            self.resources,
            self.reason,
        ) == (
            other.state,
            other.group,
            other.desired_version,
            other.applied_version,
            other.resources,
            other.reason,
        )

    def to_json(self) -> bytes:
        return codec.dumps_json(drift_to_dict(self))


def drift_to_dict(status: DriftStatus) -> dict[str, Any]:
    body = asdict(status)
    body["resources"] = [{"id": r.id, "why": r.why} for r in status.resources]
    return body


def drift_from_json(data: bytes) -> DriftStatus:
    raw = codec.loads_json(data, max_size=MAX_STATUS_BYTES)
    if not isinstance(raw, dict):
        raise SchemaError("drift status is not an object")
    try:
        state = raw["state"]
        if state not in DRIFT_STATES:
            raise SchemaError(f"drift state {state!r} is unknown")
        return DriftStatus(
            device=str(raw["device"]),
            group=raw.get("group"),
            state=state,
            desired_version=raw.get("desired_version"),
            applied_version=raw.get("applied_version"),
            commit=raw.get("commit"),
            since=float(raw["since"]),
            resources=tuple(ResourceDiff(str(r["id"]), str(r["why"])) for r in raw["resources"]),
            reason=str(raw.get("reason", "")),
            last_seen=raw.get("last_seen"),
            desired_device_version=raw.get("desired_device_version"),
            applied_device_version=raw.get("applied_device_version"),
            report_seq=raw.get("report_seq"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"drift status is malformed: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """A group's convergence summary (retained on ``.../groups/<group>/status``)."""

    group: str
    version: int | None
    commit: str | None
    mode: str
    devices: int
    counts: dict[str, int]
    converged_pct: float
    oldest_pending: float | None = None
    time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return codec.dumps_json(asdict(self))


def group_status_from_json(data: bytes) -> GroupStatus:
    raw = codec.loads_json(data, max_size=MAX_STATUS_BYTES)
    if not isinstance(raw, dict):
        raise SchemaError("group status is not an object")
    try:
        return GroupStatus(**raw)
    except TypeError as exc:
        raise SchemaError(f"group status is malformed: {exc}") from exc


def ago(then: float | None, now: float | None = None) -> str:
    """How long ago ``then`` was, for people (``12s ago``, ``5m ago``, ``1.5h ago``); ``-``
    for no time. What ``setpoint status`` and the dashboard show for ``since``."""
    if not then:
        return "-"
    seconds = max(0.0, (now if now is not None else _time.time()) - then)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


def event(event_type: str, time: float, **fields: Any) -> bytes:
    """One event as JSON: ``{"type": ..., "time": ..., <fields>}``."""
    return codec.dumps_json({"type": event_type, "time": time, **fields})


def event_from_json(data: bytes) -> dict[str, Any]:
    raw = codec.loads_json(data, max_size=MAX_STATUS_BYTES)
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise SchemaError("event is not an object with a type")
    return raw
