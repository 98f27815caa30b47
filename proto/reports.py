"""What a device says about itself: reported state (msgpack) and presence (plain text).

A report is the device's whole current truth, not a delta: the controller recomputes
drift from the latest report alone, so a lost or repeated report changes nothing.

Pure; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

from . import codec, text
from .errors import DecodeError, SchemaError
from .topics import validate_id

SCHEMA: Final = 1
MAX_REPORT_BYTES: Final = 256 * 1024
MAX_REFUSALS: Final = 8
MAX_DETAIL: Final = 512
MAX_OBSERVE: Final = 16
PRESENCE_ONLINE: Final = b"online"
PRESENCE_OFFLINE: Final = b"offline"

# ``blocked``: the device's own policy refuses the resource (for example a command where
# commands are not allowed). Nobody changed anything, so it is not drift.
ResourceState = Literal["ok", "drifted", "healed", "failed", "skipped", "pending", "blocked"]
RESOURCE_STATES: Final = ("ok", "drifted", "healed", "failed", "skipped", "pending", "blocked")
Presence = Literal["online", "offline"]


@dataclass(frozen=True, slots=True)
class Applied:
    """The bundle a device has applied for one target."""

    target: str
    version: int
    commit: str
    digest: str


@dataclass(frozen=True, slots=True)
class ResourceReport:
    """One resource as the device observed it."""

    id: str
    kind: str
    status: ResourceState
    digest: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A bundle the device refused, and why."""

    target: str
    kind: str
    version: int
    reason: str
    error: str
    at: int


@dataclass(frozen=True, slots=True)
class Failure:
    """The last apply that failed (cleared by the next successful apply)."""

    target: str
    version: int
    error: str
    permanent: bool
    at: int


@dataclass(frozen=True, slots=True)
class Report:
    device: str
    time: int
    seq: int
    shim_version: str
    mode: str = "enforce"
    group: str | None = None
    applied_group: Applied | None = None
    applied_device: Applied | None = None
    resources: tuple[ResourceReport, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    failure: Failure | None = None
    observe: str = ""  # how the device notices changes: "inotify" or "poll" ("": not said)
    schema: int = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)


def _applied_map(a: Applied | None) -> dict[str, Any] | None:
    if a is None:
        return None
    return {"target": a.target, "version": a.version, "commit": a.commit, "digest": a.digest}


def encode(report: Report) -> bytes:
    optional: dict[str, Any] = {"observe": report.observe[:MAX_OBSERVE]} if report.observe else {}
    return codec.pack(
        optional | {
            "schema": report.schema,
            "device": report.device,
            "time": report.time,
            "seq": report.seq,
            "shim_version": report.shim_version,
            "mode": report.mode,
            "group": report.group,
            "applied": {
                "group": _applied_map(report.applied_group),
                "device": _applied_map(report.applied_device),
            },
            "resources": [
                {"id": r.id, "kind": r.kind, "status": r.status, "digest": r.digest,
                 "detail": r.detail[:MAX_DETAIL]}
                for r in report.resources
            ],
            "refusals": [
                {"target": r.target, "kind": r.kind, "version": r.version, "reason": r.reason,
                 "error": r.error[:MAX_DETAIL], "at": r.at}
                for r in report.refusals[-MAX_REFUSALS:]
            ],
            "failure": None
            if report.failure is None
            else {
                "target": report.failure.target,
                "version": report.failure.version,
                "error": report.failure.error[:MAX_DETAIL],
                "permanent": report.failure.permanent,
                "at": report.failure.at,
            },
        }
    )  # fmt: skip


def _get(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = raw.get(key)
    if key not in raw or not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise SchemaError(f"{where}: field {key!r} missing or of the wrong type")
    return value


def _text(raw: dict[str, Any], key: str, where: str, limit: int | None = None) -> str:
    """A string the device wrote, cut to ``limit`` and without control characters: it ends
    up in drift statuses that operators' terminals show (proto.text)."""
    return text.clean(_get(raw, key, str, where)[:limit])


def _applied(raw: object, where: str) -> Applied | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SchemaError(f"{where} is not a map")
    return Applied(
        validate_id(_get(raw, "target", str, where), where),
        _get(raw, "version", int, where),
        _get(raw, "commit", str, where),
        _get(raw, "digest", str, where),
    )


def decode(data: bytes, *, max_size: int = MAX_REPORT_BYTES) -> Report:
    """Decode a report; its ``device`` must still be checked against the topic."""
    raw = codec.unpack(data, max_size=max_size)
    if not isinstance(raw, dict):
        raise SchemaError("report is not a map")
    schema = _get(raw, "schema", int, "report")
    if schema != SCHEMA:
        raise SchemaError(f"report schema {schema} is not supported")
    device = validate_id(_get(raw, "device", str, "report"), "report device")
    group = raw.get("group")
    if group is not None:
        validate_id(group, "report group")
    applied = _get(raw, "applied", dict, "report")
    resources = []
    for item in _get(raw, "resources", list, "report"):
        if not isinstance(item, dict):
            raise SchemaError("report resource is not a map")
        status = _get(item, "status", str, "report resource")
        if status not in RESOURCE_STATES:
            raise SchemaError(f"report resource status {status!r} is unknown")
        resources.append(
            ResourceReport(
                _text(item, "id", "report resource"),
                _text(item, "kind", "report resource"),
                status,
                _text(item, "digest", "report resource"),
                _text(item, "detail", "report resource", MAX_DETAIL),
            )
        )
    refusals = []
    for item in _get(raw, "refusals", list, "report")[-MAX_REFUSALS:]:
        if not isinstance(item, dict):
            raise SchemaError("report refusal is not a map")
        refusals.append(
            Refusal(
                _text(item, "target", "refusal"),
                _text(item, "kind", "refusal"),
                _get(item, "version", int, "refusal"),
                _text(item, "reason", "refusal"),
                _text(item, "error", "refusal", MAX_DETAIL),
                _get(item, "at", int, "refusal"),
            )
        )
    failure_raw = raw.get("failure")
    failure = None
    if failure_raw is not None:
        if not isinstance(failure_raw, dict):
            raise SchemaError("report failure is not a map")
        failure = Failure(
            _text(failure_raw, "target", "failure"),
            _get(failure_raw, "version", int, "failure"),
            _text(failure_raw, "error", "failure", MAX_DETAIL),
            _get(failure_raw, "permanent", bool, "failure"),
            _get(failure_raw, "at", int, "failure"),
        )
    mode = _text(raw, "mode", "report")
    observe = raw.get("observe", "")
    if not isinstance(observe, str):
        raise SchemaError("report: field 'observe' is not a string")
    observe = text.clean(observe)
    return Report(
        device=device,
        time=_get(raw, "time", int, "report"),
        seq=_get(raw, "seq", int, "report"),
        shim_version=_text(raw, "shim_version", "report", 64),
        mode=mode,
        group=group,
        applied_group=_applied(applied.get("group"), "report applied.group"),
        applied_device=_applied(applied.get("device"), "report applied.device"),
        resources=tuple(resources),
        refusals=tuple(refusals),
        failure=failure,
        observe=observe[:MAX_OBSERVE],
        schema=schema,
    )


def decode_presence(data: bytes) -> Presence:
    """``online`` or ``offline``; anything else is refused."""
    if data == PRESENCE_ONLINE:
        return "online"
    if data == PRESENCE_OFFLINE:
        return "offline"
    raise DecodeError(f"presence payload must be 'online' or 'offline', got {data[:32]!r}")
