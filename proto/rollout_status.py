"""What the controller tells operators about rollouts: a group's rollout status and a
ring's gate status, as typed values with their JSON codecs (``proto/SPEC.md`` 7.5, 7.6).

Both are retained JSON objects (``groups/<group>/rollout``, ``rings/<ring>/gate``) with
sorted keys, plus ``type`` (``rollout-status`` / ``gate-status``) and ``time``. The
decoders are bounded (size cap, JSON depth, list lengths) and check every field's type;
they keep nothing they do not know. Texts come from the repository and from devices: a
tool MUST escape them wherever it shows them.

Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast, get_args

from . import codec
from .errors import SchemaError

MAX_ROLLOUT_STATUS_BYTES: Final = 256 * 1024
MAX_LIST: Final = 10_000  # devices in a batch, trees in a list, ...
MAX_TEXT: Final = 4096

RolloutState = Literal[
    "idle",
    "gated",
    "refused",
    "pending",
    "preparing",
    "rolling",
    "paused",
    "halted",
    "walking-back",
    "done",
]
ROLLOUT_STATES: Final[tuple[RolloutState, ...]] = get_args(RolloutState)
GateState = Literal["open", "waiting", "refused"]
GATE_STATES: Final[tuple[GateState, ...]] = get_args(GateState)
ROLLOUT_STATUS_TYPE: Final = "rollout-status"
GATE_STATUS_TYPE: Final = "gate-status"


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch of a batched rollout and where its devices are."""

    batch: int
    devices: tuple[str, ...]
    released_at: float | None = None
    completed_at: float | None = None
    in_sync: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    offline: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Run:
    """The rollout of one group version (``rollout`` of a rollout status)."""

    version: int
    commit: str
    digest: str
    halted: Mapping[str, Any] | None = None
    done_at: float | None = None
    closed: str | None = None


@dataclass(frozen=True, slots=True)
class RolloutStatus:
    """A group's rollout: what holds its new version back, and its batches."""

    group: str
    branch: str
    state: RolloutState
    reason: str = ""
    missing: tuple[str, ...] = ()
    version: int | None = None
    commit: str | None = None
    tree: str | None = None
    paused: bool = False
    window: str | None = None
    batches: tuple[Batch, ...] = ()
    rollout: Run | None = None
    revert: Mapping[str, Any] | None = None
    time: float = 0.0


@dataclass(frozen=True, slots=True)
class GateRule:
    """A ring's declared gate (``gate:`` of ``fleet.yaml``)."""

    source: str
    in_sync: float = 1.0
    healthy_for: int = 0
    max_unhealthy: int = 0
    approval: bool = False


@dataclass(frozen=True, slots=True)
class Evidence:
    """What one tree did on the gate's source ring."""

    ran_at: float | None = None
    healthy_since: float | None = None
    passed_at: float | None = None
    in_sync: int = 0  # devices of the source ring in sync on this tree
    devices: int = 0
    unhealthy: tuple[tuple[str, ...], ...] = ()  # (device, state, reason)


@dataclass(frozen=True, slots=True)
class GateStatus:
    """A gated ring: whether the content waiting for it may go out, and the evidence."""

    ring: str
    source: str
    commit: str
    tree: str
    state: GateState
    gate: GateRule
    reason: str = ""
    missing: tuple[str, ...] = ()
    evidence: Mapping[str, Evidence] | None = None
    passed: tuple[str, ...] = ()
    approved: tuple[str, ...] = ()
    time: float = 0.0


# --- Encoding -------------------------------------------------------------------------------


def _batch_dict(b: Batch) -> dict[str, Any]:
    return {
        "batch": b.batch,
        "devices": list(b.devices),
        "released_at": b.released_at,
        "completed_at": b.completed_at,
        "in_sync": list(b.in_sync),
        "failed": list(b.failed),
        "offline": list(b.offline),
    }


def rollout_to_dict(s: RolloutStatus) -> dict[str, Any]:
    run = s.rollout
    return {
        "type": ROLLOUT_STATUS_TYPE,
        "time": s.time,
        "group": s.group,
        "branch": s.branch,
        "state": s.state,
        "reason": s.reason,
        "missing": list(s.missing),
        "version": s.version,
        "commit": s.commit,
        "tree": s.tree,
        "paused": s.paused,
        "window": s.window,
        "batches": [_batch_dict(b) for b in s.batches],
        "rollout": None
        if run is None
        else {
            "version": run.version,
            "commit": run.commit,
            "digest": run.digest,
            "halted": dict(run.halted) if run.halted is not None else None,
            "done_at": run.done_at,
            "closed": run.closed,
        },
        "revert": dict(s.revert) if s.revert is not None else None,
    }


def rollout_to_json(s: RolloutStatus) -> bytes:
    return codec.dumps_json(rollout_to_dict(s))


def gate_to_dict(s: GateStatus) -> dict[str, Any]:
    g = s.gate
    return {
        "type": GATE_STATUS_TYPE,
        "time": s.time,
        "ring": s.ring,
        "from": s.source,
        "commit": s.commit,
        "tree": s.tree,
        "state": s.state,
        "reason": s.reason,
        "missing": list(s.missing),
        "gate": {
            "source": g.source,
            "in_sync": g.in_sync,
            "healthy_for": g.healthy_for,
            "max_unhealthy": g.max_unhealthy,
            "approval": g.approval,
        },
        "evidence": {
            tree: {
                "ran_at": e.ran_at,
                "healthy_since": e.healthy_since,
                "passed_at": e.passed_at,
                "in_sync": e.in_sync,
                "devices": e.devices,
                "unhealthy": [list(u) for u in e.unhealthy],
            }
            for tree, e in (s.evidence or {}).items()
        },
        "passed": list(s.passed),
        "approved": list(s.approved),
    }


def gate_to_json(s: GateStatus) -> bytes:
    return codec.dumps_json(gate_to_dict(s))


# --- Decoding -------------------------------------------------------------------------------


class _Fields:
    """Typed access to one JSON object's fields; errors name the object and the field."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, dict):
            raise SchemaError(f"{where} is not an object")
        self.raw: dict[str, Any] = raw
        self.where = where

    def _get(self, name: str, required: bool) -> Any:
        if name not in self.raw:
            if required:
                raise SchemaError(f"{self.where}: field {name!r} is missing")
            return None
        return self.raw[name]

    def text(self, name: str, *, required: bool = True) -> str:
        value = self._get(name, required)
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise SchemaError(f"{self.where}: {name!r} is not a string")
        return value[:MAX_TEXT]

    def opt_text(self, name: str) -> str | None:
        value = self._get(name, False)
        if value is None:
            return None
        if not isinstance(value, str):
            raise SchemaError(f"{self.where}: {name!r} is not a string or null")
        return value[:MAX_TEXT]

    def opt_int(self, name: str) -> int | None:
        value = self._get(name, False)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"{self.where}: {name!r} is not an integer or null")
        return value

    def number(self, name: str, default: float | None = None) -> float | None:
        value = self._get(name, False)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise SchemaError(f"{self.where}: {name!r} is not a number or null")
        return float(value)

    def flag(self, name: str) -> bool:
        value = self._get(name, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise SchemaError(f"{self.where}: {name!r} is not true or false")
        return value

    def texts(self, name: str) -> tuple[str, ...]:
        value = self._get(name, False)
        if value is None:
            return ()
        return _texts(value, f"{self.where}: {name!r}")

    def items(self, name: str) -> list[Any]:
        value = self._get(name, False)
        if value is None:
            return []
        if not isinstance(value, list) or len(value) > MAX_LIST:
            raise SchemaError(f"{self.where}: {name!r} is not a list of at most {MAX_LIST}")
        return value

    def mapping(self, name: str) -> dict[str, Any] | None:
        value = self._get(name, False)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise SchemaError(f"{self.where}: {name!r} is not an object or null")
        return value


def _texts(value: Any, where: str) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_LIST
        or not all(isinstance(v, str) for v in value)
    ):
        raise SchemaError(f"{where} is not a list of at most {MAX_LIST} strings")
    return tuple(v[:MAX_TEXT] for v in value)


def _state(value: str, known: Sequence[str], what: str) -> str:
    if value not in known:
        raise SchemaError(f"{what} {value[:40]!r} is unknown (known: {', '.join(known)})")
    return value


def rollout_from_dict(raw: Any) -> RolloutStatus:
    f = _Fields(raw, "rollout status")
    batches = []
    for item in f.items("batches"):
        b = _Fields(item, "rollout status batch")
        number = b.opt_int("batch")
        if number is None:
            raise SchemaError("rollout status batch: field 'batch' is missing")
        batches.append(
            Batch(
                batch=number,
                devices=b.texts("devices"),
                released_at=b.number("released_at"),
                completed_at=b.number("completed_at"),
                in_sync=b.texts("in_sync"),
                failed=b.texts("failed"),
                offline=b.texts("offline"),
            )
        )
    run = None
    run_raw = f.mapping("rollout")
    if run_raw is not None:
        r = _Fields(run_raw, "rollout status rollout")
        version = r.opt_int("version")
        if version is None:
            raise SchemaError("rollout status rollout: field 'version' is missing")
        run = Run(
            version=version,
            commit=r.text("commit"),
            digest=r.text("digest"),
            halted=r.mapping("halted"),
            done_at=r.number("done_at"),
            closed=r.opt_text("closed"),
        )
    return RolloutStatus(
        group=f.text("group"),
        branch=f.text("branch"),
        state=cast(RolloutState, _state(f.text("state"), ROLLOUT_STATES, "rollout state")),
        reason=f.text("reason", required=False),
        missing=f.texts("missing"),
        version=f.opt_int("version"),
        commit=f.opt_text("commit"),
        tree=f.opt_text("tree"),
        paused=f.flag("paused"),
        window=f.opt_text("window"),
        batches=tuple(batches),
        rollout=run,
        revert=f.mapping("revert"),
        time=f.number("time", 0.0) or 0.0,
    )


def rollout_from_json(data: bytes) -> RolloutStatus:
    """Decode a retained ``groups/<group>/rollout`` status (bounded; typed)."""
    return rollout_from_dict(codec.loads_json(data, max_size=MAX_ROLLOUT_STATUS_BYTES))


def gate_from_dict(raw: Any) -> GateStatus:
    f = _Fields(raw, "gate status")
    g = _Fields(f.mapping("gate") or {}, "gate status gate")
    rule = GateRule(
        source=g.text("source"),
        in_sync=g.number("in_sync", 1.0) or 0.0,
        healthy_for=g.opt_int("healthy_for") or 0,
        max_unhealthy=g.opt_int("max_unhealthy") or 0,
        approval=g.flag("approval"),
    )
    evidence: dict[str, Evidence] = {}
    evidence_raw = f.mapping("evidence") or {}
    if len(evidence_raw) > MAX_LIST:
        raise SchemaError(f"gate status: over {MAX_LIST} evidence entries")
    for tree, item in evidence_raw.items():
        e = _Fields(item, f"gate status evidence {tree[:40]!r}")
        unhealthy = tuple(_texts(u, "gate status unhealthy entry") for u in e.items("unhealthy"))
        evidence[tree[:MAX_TEXT]] = Evidence(
            ran_at=e.number("ran_at"),
            healthy_since=e.number("healthy_since"),
            passed_at=e.number("passed_at"),
            in_sync=e.opt_int("in_sync") or 0,
            devices=e.opt_int("devices") or 0,
            unhealthy=unhealthy,
        )
    return GateStatus(
        ring=f.text("ring"),
        source=f.text("from"),
        commit=f.text("commit"),
        tree=f.text("tree"),
        state=cast(GateState, _state(f.text("state"), GATE_STATES, "gate state")),
        gate=rule,
        reason=f.text("reason", required=False),
        missing=f.texts("missing"),
        evidence=evidence,
        passed=f.texts("passed"),
        approved=f.texts("approved"),
        time=f.number("time", 0.0) or 0.0,
    )


def gate_from_json(data: bytes) -> GateStatus:
    """Decode a retained ``rings/<ring>/gate`` status (bounded; typed)."""
    return gate_from_dict(codec.loads_json(data, max_size=MAX_ROLLOUT_STATUS_BYTES))
