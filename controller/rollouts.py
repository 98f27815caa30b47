"""What the rollout machinery remembers, and the pure decision made from it each round.

:class:`Ledger` is what the rollouts remember (the shell, :mod:`rolling`, keeps it in
``<state dir>/rollouts.json``, written before what was decided is carried out, so a
restart neither repeats nor skips a batch): the tree of every commit seen on a ring, the
gate evidence per (ring, tree), approvals, the rollout of each group (its batches, when
each was released and completed, a halt), paused groups, the operator commands already
used, and the reverts asked for.

:func:`decide` is the decision: from the :class:`State` (the ledger, the events already
sent once) and the round's :class:`Facts` (the render, what is published, the devices'
drift statuses, the time) it returns the new state and a :class:`Decision`: what may be
published now (gates, windows, batches hold the rest back), the rollout and gate statuses
to show, when to decide again, and the closed set of typed actions (:data:`Action`) to
carry out. :func:`decide_command` does the same for one verified operator command.

Pure: no I/O, no clock (the time is a fact), and the inputs are never changed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from setpoint.proto import rollout_status
from setpoint.proto.approvals import OperatorCommand
from setpoint.proto.bundles import Bundle
from setpoint.proto.rollout_status import GateStatus, RolloutStatus
from setpoint.proto.status import DriftStatus
from setpoint.proto.topics import Topics

from . import gating
from .fleet import Group
from .gating import Evidence, GateDecision, Rings
from .planning import Current
from .rendering import Render, Rendered, Target

LEDGER_FILE: Final = "rollouts.json"
MAX_TREES: Final = 2048
MAX_NONCES: Final = 1024
MAX_EVIDENCE_SHOWN: Final = 8
CLOCK_SKEW: Final = 60  # seconds an operator command's times may be off


@dataclass
class Rollout:
    """A group's rollout of one published version, batch by batch."""

    group: str
    branch: str
    version: int
    digest: str
    commit: str
    base: dict[str, int]  # device -> the group version it was pinned to before
    batches: list[list[str]]
    base_digest: str = ""  # content of the version rolled out from (for a walk-back)
    base_tree: str = ""
    released: list[float] = field(default_factory=list)
    completed: list[float] = field(default_factory=list)
    halted: dict[str, Any] | None = None
    done_at: float | None = None
    closed: str | None = None  # "reverted", "superseded"

    @property
    def active(self) -> bool:
        return self.done_at is None and self.closed is None

    def released_devices(self) -> set[str]:
        return {d for batch in self.batches[: len(self.released)] for d in batch}


@dataclass
class Ledger:
    trees: dict[str, str] = field(default_factory=dict)  # commit -> tree
    evidence: dict[str, Evidence] = field(default_factory=dict)  # "ring|tree"
    approvals: dict[str, dict[str, Any]] = field(default_factory=dict)  # "ring|tree"
    rollouts: dict[str, Rollout] = field(default_factory=dict)  # group -> rollout
    staged: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> next rollout
    paused: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> who, when
    nonces: list[str] = field(default_factory=list)
    reverts: dict[str, dict[str, Any]] = field(default_factory=dict)  # halt id -> revert

    @staticmethod
    def key(ring: str, tree: str) -> str:
        return f"{ring}|{tree}"

    def learn_tree(self, commit: str, tree: str) -> None:
        if self.trees.get(commit) != tree:
            self.trees[commit] = tree
            while len(self.trees) > MAX_TREES:
                self.trees.pop(next(iter(self.trees)))

    def to_json(self) -> bytes:
        document = {
            "schema": 1,
            "trees": self.trees,
            "evidence": {k: v.to_json() for k, v in self.evidence.items()},
            "approvals": self.approvals,
            "rollouts": {k: asdict(v) for k, v in self.rollouts.items()},
            "staged": self.staged,
            "paused": self.paused,
            "nonces": self.nonces[-MAX_NONCES:],
            "reverts": self.reverts,
        }
        return json.dumps(document, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Ledger:
        """The ledger in ``data`` (read from ``where``); ValueError naming it if malformed."""
        try:
            raw = json.loads(data)
            return cls(
                trees=dict(raw.get("trees", {})),
                evidence={k: Evidence.from_json(v) for k, v in raw.get("evidence", {}).items()},
                approvals=dict(raw.get("approvals", {})),
                rollouts={k: Rollout(**v) for k, v in raw.get("rollouts", {}).items()},
                staged=dict(raw.get("staged", {})),
                paused=dict(raw.get("paused", {})),
                nonces=list(raw.get("nonces", [])),
                reverts=dict(raw.get("reverts", {})),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            # Refusing to start is safer than forgetting which batches went out.
            raise ValueError(f"{where} is malformed ({exc}); fix or remove it") from None


def _unpinned(bundle: Bundle) -> str:
    return dataclasses.replace(bundle, group_version=None).content_digest()


def _differs(rendered: Rendered | None, current: Current | None) -> bool:
    if rendered is None or current is None:
        return (rendered is None) != (current is None)
    return _unpinned(rendered.bundle) != _unpinned(current.bundle)


@dataclass(frozen=True, slots=True)
class Emit:
    type: str
    fields: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Record:
    """Write a line of the audit log about a group or ring (the shell makes it the audit
    log's one schema, :class:`~setpoint.controller.audit.Entry`)."""

    time: float
    kind: str  # "group" or "ring"
    id: str
    reason: str  # what was decided: "batch-released", "gate-passed", ...
    version: int | None = None
    commit: str | None = None
    digest: str | None = None
    branch: str | None = None
    tree: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Log:
    """Say something in the controller's log."""

    level: int
    message: str


@dataclass(frozen=True, slots=True)
class Show:
    """Retain a rollout or gate status on ``topic``."""

    topic: str
    status: RolloutStatus | GateStatus
    view: Mapping[str, Any] = field(compare=False, repr=False)

    def payload(self) -> bytes:
        if isinstance(self.status, GateStatus):
            return rollout_status.gate_to_json(self.status)
        return rollout_status.rollout_to_json(self.status)


# What the rollouts decide, carried out by the controller's executor: a closed set.
Action = Emit | Record | Show | Log


@dataclass(frozen=True, slots=True)
class State:
    """What the decision remembers between rounds."""

    ledger: Ledger = field(default_factory=Ledger)
    noted: Mapping[str, Any] = field(default_factory=dict)  # events sent once per value


@dataclass(frozen=True, slots=True)
class Facts:
    """What one round decides on."""

    render: Render
    published: Mapping[Target, Current]
    statuses: Mapping[str, DriftStatus]  # device -> its drift status
    synced: bool  # the statuses were read since the connection
    now: float
    topics: Topics = field(default_factory=Topics)


@dataclass(frozen=True, slots=True)
class Decision:
    """What one round decided."""

    render: Render  # what may be published now
    actions: tuple[Action, ...] = ()
    views: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # topic -> status
    deadline: float | None = None  # when to decide again (a timer, a window)
    active: bool = True  # False: no rings, rollouts or windows, statuses decide nothing


def decide(state: State, facts: Facts) -> tuple[State, Decision]:
    """What may go out this round, and what to do about it; see the module docstring."""
    render = facts.render
    rings = render.settings.ring_list() if render.settings is not None else Rings()
    policies = rings or any(g.rollout or g.window for g in render.groups.values())
    if not policies and not state.ledger.rollouts and not state.ledger.staged:
        # Nothing to gate, pace or unpin: a drift status decides nothing either.
        return state, Decision(render=render, active=False)
    ledger = copy.deepcopy(state.ledger)
    round_ = _Round(ledger, dict(state.noted), facts)
    decision = round_.run(render, facts.published)
    if ledger == state.ledger and round_.noted == state.noted:
        return state, decision
    return State(ledger, round_.noted), decision


def decide_command(
    state: State, command: OperatorCommand, who: str, keyid: str, now: float
) -> tuple[State, tuple[Action, ...]]:
    """A verified operator command (approve, pause, resume) signed by ``who`` (key
    ``keyid``): recorded in the ledger, or refused when expired or replayed."""
    if command.expires_at + CLOCK_SKEW < now or command.issued_at - CLOCK_SKEW > now:
        return state, (
            Emit("rollout", dict(action="refused", nonce=command.nonce, reason="expired")),
        )
    if command.nonce in state.ledger.nonces:
        return state, (
            Emit("rollout", dict(action="refused", nonce=command.nonce, reason="replayed")),
        )
    ledger = copy.deepcopy(state.ledger)
    round_ = _Round(ledger, dict(state.noted), None, now)
    ledger.nonces.append(command.nonce)
    fields: dict[str, Any] = dict(nonce=command.nonce, by=who, keyid=keyid)
    if command.action == "approve":
        ledger.approvals[Ledger.key(command.ring, command.tree)] = {
            "by": who,
            "at": now,
            "via": "signed",
        }
        round_._event("rollout", action="approved", ring=command.ring, tree=command.tree, **fields)
        round_._audit_line("approved", command.ring, tree=command.tree, by=who)
    elif command.action == "pause":
        ledger.paused[command.group] = {"by": who, "at": now}
        round_._event("rollout", action="paused", group=command.group, **fields)
        round_._audit_line("paused", command.group, by=who)
    else:
        ledger.paused.pop(command.group, None)
        round_._event("rollout", action="resumed", group=command.group, **fields)
        round_._audit_line("resumed", command.group, by=who)
    return State(ledger, state.noted), tuple(round_.actions)


def typed_view(kind: str, view: Mapping[str, Any], now: float) -> RolloutStatus | GateStatus:
    """A view as its typed retained status (proto/SPEC.md 7.5, 7.6): what the codecs
    cannot read back is a bug here, and stops the controller loudly."""
    if kind == "ring-gate":
        return rollout_status.gate_from_dict({**view, "time": now})
    return rollout_status.rollout_from_dict({**view, "time": now})


class _Round:
    """One decision's working copy (the ledger is a copy: :func:`decide` compares)."""

    def __init__(
        self, ledger: Ledger, noted: dict[str, Any], facts: Facts | None, now: float = 0.0
    ) -> None:
        self.ledger = ledger
        self.noted = noted
        self.actions: list[Action] = []
        if facts is not None:
            self.facts = facts
            self.now = facts.now
            self.statuses = facts.statuses
            self.synced = facts.synced
        else:
            self.now = now

    def _event(self, event_type: str, **fields: Any) -> None:
        self.actions.append(Emit(event_type, fields))

    def _audit_line(self, what: str, target: str, **fields: Any) -> None:
        kind = "group" if not target.startswith("ring:") else "ring"
        ident = target.removeprefix("ring:")
        self.actions.append(
            Record(
                time=self.now,
                kind=kind,
                id=ident,
                reason=what,
                version=fields.pop("version", None),
                commit=fields.pop("commit", None),
                digest=fields.pop("digest", None),
                branch=fields.pop("branch", None),
                tree=fields.pop("tree", None),
                detail=fields,
            )
        )

    def _log(self, level: int, message: str, *args: Any) -> None:
        self.actions.append(Log(level, message % args))

    def _note_once(self, key: str, value: Any) -> bool:
        """True the first time ``value`` is noted under ``key`` (events only on change)."""
        if self.noted.get(key) == value:
            return False
        self.noted[key] = value
        return True

    def run(self, render: Render, published: Mapping[Target, Current]) -> Decision:
        now = self.now
        settings = render.settings
        rings = settings.ring_list() if settings is not None else Rings()
        for info in render.heads.values():
            self.ledger.learn_tree(info.id, info.tree.decode("ascii"))
        desired: dict[Target, Rendered] = dict(render.desired)
        broken = set(render.broken)
        deadlines: list[float] = []
        views: dict[str, dict[str, Any]] = {}

        if self.synced:
            self._track_evidence(rings, published, now)
        held_rings, held_targets = self._gates(
            rings, render, desired, broken, published, views, deadlines, now
        )
        self._groups(
            render, desired, broken, published, held_rings, held_targets, views, deadlines, now
        )
        future = [d for d in deadlines if d > now]
        if desired != render.desired or broken != render.broken:
            render = dataclasses.replace(render, desired=desired, broken=frozenset(broken))
        return Decision(
            render=render,
            actions=tuple(self.actions),
            views=views,
            deadline=min(future) if future else None,
            active=True,
        )

    def _ring_groups(self, published: Mapping[Target, Current]) -> dict[str, dict[str, Current]]:
        out: dict[str, dict[str, Current]] = {}
        for target, cur in published.items():
            if target.kind == "group" and cur.branch:
                out.setdefault(cur.branch, {})[target.id] = cur
        return out

    def _track_evidence(
        self, rings: Rings, published: Mapping[Target, Current], now: float
    ) -> None:
        by_ring = self._ring_groups(published)
        members = {
            t.id: c.bundle.group or ""
            for t, c in published.items()
            if t.kind == "device" and c.bundle.group
        }
        for ring in rings.rings:
            downstream = rings.downstream(ring.branch)
            if not downstream:
                continue
            groups = {
                gid: (cur.version, self.ledger.trees.get(cur.bundle.commit))
                for gid, cur in by_ring.get(ring.branch, {}).items()
            }
            health = gating.ring_health(ring.branch, groups, members, self.statuses)
            if health is None:
                continue
            for down in downstream:
                assert down.gate is not None
                key = Ledger.key(down.branch, health.tree)
                old = self.ledger.evidence.get(key)
                new = gating.track(old, down.gate, health, now)
                if new == old:
                    continue
                self.ledger.evidence[key] = new
                if new.passed_at is not None and (old is None or old.passed_at is None):
                    self._log(
                        logging.INFO,
                        "content %s passed on %s for %s",
                        health.tree[:12],
                        ring.branch,
                        down.branch,
                    )
                    self._event(
                        "rollout",
                        action="gate-passed",
                        ring=down.branch,
                        source=ring.branch,
                        tree=health.tree,
                        in_sync=new.in_sync,
                        devices=new.devices,
                    )
                    self._audit_line(
                        "gate-passed", f"ring:{down.branch}", tree=health.tree, source=ring.branch
                    )

    def _walk_back_tree(self, branch: str) -> set[str]:
        return {
            ro.base_tree
            for ro in self.ledger.rollouts.values()
            if ro.branch == branch and ro.halted is not None and ro.closed is None
        }

    def _gates(
        self,
        rings: Rings,
        render: Render,
        desired: dict[Target, Rendered],
        broken: set[Target],
        published: Mapping[Target, Current],
        views: dict[str, dict[str, Any]],
        deadlines: list[float],
        now: float,
    ) -> tuple[dict[str, GateDecision], dict[Target, GateDecision]]:
        """Gate by *target*: a target that is (or was last published) on gated ring B
        changes only with content that passed B's gate, whichever branch that content now
        comes from. Otherwise a writer of the default branch, which decides what each group
        tracks and which group each device is in, could point a production group at
        ``main`` and skip every gate (the content's tree is what is judged, so a group
        moved to ``main`` waits until main's tree passed production's gate)."""
        held: dict[str, GateDecision] = {}
        held_targets: dict[Target, GateDecision] = {}
        for ring in rings.gated():
            gate = ring.gate
            assert gate is not None
            branch = ring.branch
            targets = {t for t, r in desired.items() if r.branch == branch}
            targets |= {t for t, c in published.items() if c.branch == branch}
            waiting = [
                t
                for t in targets
                if t not in held_targets and _differs(desired.get(t), published.get(t))
            ]
            # The content each waiting target would get, by the branch it comes from (a
            # removal is the default branch's doing).
            by_source: dict[str, list[Target]] = {}
            for t in waiting:
                r = desired.get(t)
                source = r.branch if r is not None else (render.default_branch or branch)
                by_source.setdefault(source, []).append(t)
            head = render.heads.get(branch)
            if head is None and not by_source:
                continue
            decisions: dict[str, tuple[Any, GateDecision]] = {}
            for source in sorted({branch, *by_source} if head is not None else by_source):
                info = render.heads.get(source)
                if info is None:
                    continue
                tree = info.tree.decode("ascii")
                decision = self._decide(branch, gate, tree, now)
                if source != branch and not decision.open:
                    decision = dataclasses.replace(
                        decision,
                        reason=f"{', '.join(sorted(str(t) for t in by_source[source]))} ran on"
                        f" {branch} and would now take content from {source}: " + decision.reason,
                    )
                decisions[source] = (info, decision)
            shown_source = branch if branch in decisions else next(iter(decisions), None)
            for source, (_info, decision) in decisions.items():
                if not decision.open and source in by_source:
                    shown_source = source
            if shown_source is None:
                continue
            shown_head, shown_decision = decisions[shown_source]
            shown = shown_decision if waiting else GateDecision("open", "nothing waiting")
            views[self.facts.topics.ring_gate(branch)] = self._gate_view(
                branch, gate, shown_head.id, shown_head.tree.decode("ascii"), shown, now
            )
            for source, targets_from in sorted(by_source.items()):
                if source not in decisions:
                    continue  # its head is unknown: render marked the targets broken
                info, decision = decisions[source]
                tree = info.tree.decode("ascii")
                if decision.until is not None:
                    deadlines.append(decision.until)
                if decision.open:
                    if self._note_once(f"gate:{branch}:{source}", (tree, "open")):
                        self._event(
                            "rollout", action="gate-opened", ring=branch, tree=tree,
                            commit=info.id, reason=decision.reason,
                        )  # fmt: skip
                        self._audit_line(
                            "gate-opened", f"ring:{branch}", tree=tree, commit=info.id,
                            reason=decision.reason,
                        )  # fmt: skip
                    continue
                if source == branch:
                    held[branch] = decision
                for target in targets_from:
                    desired.pop(target, None)
                    broken.add(target)
                    held_targets[target] = decision
                if self._note_once(f"gate:{branch}:{source}", (tree, decision.state)):
                    self._log(
                        logging.INFO,
                        "ring %s gated at %s: %s",
                        branch,
                        info.id[:12],
                        decision.reason,
                    )
                    self._event(
                        "gated", ring=branch, state=decision.state, reason=decision.reason,
                        missing=list(decision.missing), commit=info.id, tree=tree,
                        source=source,
                        groups=sorted(t.id for t in targets_from if t.kind == "group"),
                        devices=sorted(t.id for t in targets_from if t.kind == "device"),
                    )  # fmt: skip
                    self._audit_line(
                        f"gate-{decision.state}", f"ring:{branch}", tree=tree, commit=info.id,
                        reason=decision.reason, source=source,
                    )  # fmt: skip
        return held, held_targets

    def _decide(self, branch: str, gate: gating.Gate, tree: str, now: float) -> GateDecision:
        key = Ledger.key(branch, tree)
        evidence = self.ledger.evidence.get(key)
        # Only a verified, signed approval counts: "[approved]" in a commit subject is
        # whatever its author typed, and a fast-forward carries it into any ring.
        approved = key in self.ledger.approvals
        decision = gating.decide_gate(branch, gate, tree, evidence, approved=approved, now=now)
        if decision.state != "open" and tree in self._walk_back_tree(branch):
            decision = GateDecision("open", f"walking back to {tree[:12]} after a halt")
        return decision

    def _gate_view(
        self, branch: str, gate: gating.Gate, commit: str, tree: str, d: GateDecision, now: float
    ) -> dict[str, Any]:
        evidence = {
            k.split("|", 1)[1]: v.to_json()
            for k, v in self.ledger.evidence.items()
            if k.startswith(branch + "|")
        }
        recent = dict(list(evidence.items())[-MAX_EVIDENCE_SHOWN:])
        if tree in evidence:
            recent[tree] = evidence[tree]
        return {
            "ring": branch,
            "from": gate.source,
            "commit": commit,
            "tree": tree,
            "state": d.state,
            "reason": d.reason,
            "missing": list(d.missing),
            "gate": dataclasses.asdict(gate),
            "evidence": recent,
            "passed": sorted(t for t, e in evidence.items() if e.get("passed_at") is not None),
            "approved": sorted(
                k.split("|", 1)[1] for k in self.ledger.approvals if k.startswith(branch + "|")
            ),
        }

    # --- Groups: windows and batches ---------------------------------------------------------

    def _groups(
        self,
        render: Render,
        desired: dict[Target, Rendered],
        broken: set[Target],
        published: Mapping[Target, Current],
        held_rings: Mapping[str, GateDecision],
        held_targets: Mapping[Target, GateDecision],
        views: dict[str, dict[str, Any]],
        deadlines: list[float],
        now: float,
    ) -> None:
        members: dict[str, list[Target]] = {}
        for target, rendered in desired.items():
            if target.kind == "device" and rendered.bundle.group:
                members.setdefault(rendered.bundle.group, []).append(target)
        for gid, group in sorted(render.groups.items()):
            target = Target("group", gid)
            branch = group.branch or render.default_branch or ""
            cur = published.get(target)
            view: dict[str, Any] = {
                "group": gid,
                "branch": branch,
                "version": cur.version if cur else None,
                "commit": cur.bundle.commit if cur else None,
                "tree": self.ledger.trees.get(cur.bundle.commit) if cur else None,
                "paused": gid in self.ledger.paused,
                "window": group.window.describe() if group.window else None,
                "state": "idle",
                "reason": "",
                "missing": [],
                "batches": [],
            }
            views[self.facts.topics.group_rollout(gid)] = view
            if branch in held_rings or target in held_targets:
                decision = held_targets.get(target) or held_rings[branch]
                view.update(
                    state="gated" if decision.state == "waiting" else "refused",
                    reason=decision.reason,
                    missing=list(decision.missing),
                )
                self._show_rollout(view, gid, cur)
                continue
            rendered = desired.get(target)
            if rendered is None:
                continue
            devices = sorted(members.get(gid, []))
            self._group(
                gid, group, branch, rendered, cur, devices, render, desired, broken, published,
                view, deadlines, now,
            )  # fmt: skip

    def _group(
        self,
        gid: str,
        group: Group,
        branch: str,
        rendered: Rendered,
        cur: Current | None,
        devices: list[Target],
        render: Render,
        desired: dict[Target, Rendered],
        broken: set[Target],
        published: Mapping[Target, Current],
        view: dict[str, Any],
        deadlines: list[float],
        now: float,
    ) -> None:
        target = Target("group", gid)
        digest = rendered.bundle.content_digest()
        ro = self.ledger.rollouts.get(gid)
        head = render.heads.get(rendered.branch)
        # "[urgent]" says what the author wants; a signed approval of this content for this
        # branch (setpoint approve BRANCH --tree T) is the authority that lets it skip windows.
        urgent = (
            head is not None
            and gating.is_urgent(head.summary)
            and Ledger.key(rendered.branch, head.tree.decode("ascii")) in self.ledger.approvals
        )

        def hold(reason_state: str, reason: str) -> None:
            for t in (target, *devices):
                if _differs(desired.get(t), published.get(t)):
                    desired.pop(t, None)
                    broken.add(t)
            view.update(state=reason_state, reason=reason)

        def pin(device: Target, version: int | None) -> None:
            r = desired.get(device)
            if r is not None and r.bundle.group_version != version:
                bundle = dataclasses.replace(r.bundle, group_version=version)
                desired[device] = Rendered(bundle, r.branch, r.author)

        if cur is not None and cur.content_digest != digest:
            walk_back = (
                ro is not None and ro.halted is not None and ro.closed is None
                and digest == ro.base_digest
            )  # fmt: skip
            if walk_back:
                assert ro is not None
                ro.closed = "reverted"
                view.update(
                    state="walking-back", reason=f"back to the content before v{ro.version}"
                )
                self._event("rollout", action="walk-back", group=gid, version=ro.version)
                return
            window = group.window
            if window is not None and not urgent and not window.contains(now):
                opens = window.next_open(now)
                deadlines.append(opens)
                hold("pending", f"outside the maintenance window {window.describe()}; opens"
                     f" {time.strftime('%Y-%m-%d %H:%M', time.gmtime(opens))} UTC")  # fmt: skip
                if self._note_once(f"window:{gid}", digest):
                    self._event("rollout", action="window-wait", group=gid, reason=view["reason"])
                return
            policy = group.rollout
            if policy is None or not devices:
                return  # published as a whole
            if gid in self.ledger.paused:
                hold("paused", f"paused by {self.ledger.paused[gid].get('by', '?')}")
                return
            pins: dict[str, int] = {}
            for device in devices:
                pub = published.get(device)
                pinned = pub.bundle.group_version if pub is not None else None
                pins[device.id] = pinned if pinned is not None else cur.version
                pin(device, pins[device.id])
            ready = all(
                (p := published.get(d)) is not None and p.bundle.group_version == pins[d.id]
                for d in devices
            )
            if not ready:
                desired.pop(target, None)  # the group waits; the pinned device bundles go out
                broken.add(target)
                view.update(state="preparing", reason="pinning devices to the running version")
                return
            staged = {
                "digest": digest,
                "base": pins,
                "base_digest": cur.content_digest,
                "base_tree": self.ledger.trees.get(cur.bundle.commit, ""),
                "commit": rendered.commit,
            }
            if self.ledger.staged.get(gid) != staged:
                self.ledger.staged[gid] = staged
            view.update(state="rolling", reason="publishing the new version, devices pinned")
            return

        if cur is None:
            return
        staged_entry = self.ledger.staged.get(gid)
        if staged_entry is not None and staged_entry["digest"] == cur.content_digest:
            if ro is not None and ro.active:
                ro.closed = "superseded"
            policy = group.rollout or gating.BatchPolicy()
            vars_of = {d.id: dict(desired[d].bundle.vars) for d in devices}
            ro = Rollout(
                group=gid,
                branch=branch,
                version=cur.version,
                digest=cur.content_digest,
                commit=cur.bundle.commit,
                base=dict(staged_entry["base"]),
                batches=[list(b) for b in gating.plan_batches(vars_of, policy)],
                base_digest=staged_entry["base_digest"],
                base_tree=staged_entry.get("base_tree", ""),
            )
            self.ledger.rollouts[gid] = ro
            del self.ledger.staged[gid]
            self._event(
                "rollout", action="started", group=gid, version=ro.version, commit=ro.commit,
                digest=ro.digest, batches=ro.batches,
            )  # fmt: skip
            self._audit_line(
                "rollout-started", gid, version=ro.version, commit=ro.commit, digest=ro.digest,
                branch=branch, batches=ro.batches,
            )  # fmt: skip
        if ro is None or ro.version != cur.version or ro.digest != cur.content_digest:
            return  # no rollout of the running version: devices follow the group
        if ro.active:
            self._advance(ro, group, urgent, view, deadlines, now)
            released = ro.released_devices()
            for device in devices:
                if device.id in released:
                    pin(device, ro.version)
                else:
                    pin(device, ro.base.get(device.id, ro.version))
        self._show_rollout(view, gid, cur)

    def _advance(
        self,
        ro: Rollout,
        group: Group,
        urgent: bool,
        view: dict[str, Any],
        deadlines: list[float],
        now: float,
    ) -> None:
        policy = group.rollout or gating.BatchPolicy()
        if ro.halted is not None:
            view.update(state="halted", reason=ro.halted.get("reason", "halted"))
            return
        if not self.synced:
            view.update(state="rolling", reason="reading the devices' statuses")
            return
        for index in range(len(ro.released)):
            batch = ro.batches[index]
            outcome = gating.assess_batch(batch, ro.version, self.statuses)
            if outcome.halts(policy.max_failures):
                self._halt(ro, index, outcome, policy, now)
                view.update(state="halted", reason=ro.halted["reason"] if ro.halted else "")
                return
            if len(ro.completed) == index and outcome.complete(len(batch), policy.success):
                ro.completed.append(now)
                self._event(
                    "rollout", action="batch-completed", group=ro.group, batch=index + 1,
                    of=len(ro.batches), version=ro.version, in_sync=list(outcome.in_sync),
                    offline=list(outcome.offline),
                )  # fmt: skip
        done = len(ro.completed)
        total = len(ro.batches)
        if done == total and len(ro.released) == total:
            ro.done_at = now
            view.update(state="done", reason=f"v{ro.version} on every batch")
            self._event("rollout", action="completed", group=ro.group, version=ro.version,
                        commit=ro.commit, digest=ro.digest)  # fmt: skip
            self._audit_line("rollout-completed", ro.group, version=ro.version, commit=ro.commit,
                             digest=ro.digest, branch=ro.branch)  # fmt: skip
            return
        index = len(ro.released)
        if index > done:
            batch = ro.batches[index - 1]
            outcome = gating.assess_batch(batch, ro.version, self.statuses)
            need = math.ceil(policy.success * len(batch))
            parts = [f"batch {index}/{total}: {len(outcome.in_sync)}/{len(batch)} in sync"
                     f" (need {need})"]  # fmt: skip
            if outcome.offline:
                parts.append("offline: " + ", ".join(outcome.offline))
            view.update(state="rolling", reason="; ".join(parts))
            return
        if ro.group in self.ledger.paused:
            view.update(state="paused", reason=f"paused after batch {index}/{total}")
            return
        window = group.window
        if window is not None and not urgent and not window.contains(now):
            opens = window.next_open(now)
            deadlines.append(opens)
            view.update(state="pending", reason=f"batch {index + 1} waits for the window")
            return
        if index > 0 and now < ro.completed[index - 1] + policy.pause:
            at = ro.completed[index - 1] + policy.pause
            deadlines.append(at)
            view.update(state="rolling", reason=f"pause before batch {index + 1}: {at - now:.0f}s")
            return
        ro.released.append(now)
        self._log(logging.INFO, "rollout of %s v%d: releasing batch %d/%d %s", ro.group, ro.version,
                 index + 1, total, ro.batches[index])  # fmt: skip
        self._event(
            "rollout", action="batch-released", group=ro.group, batch=index + 1, of=total,
            devices=ro.batches[index], version=ro.version, commit=ro.commit, digest=ro.digest,
        )  # fmt: skip
        self._audit_line(
            "batch-released", ro.group, version=ro.version, commit=ro.commit, digest=ro.digest,
            branch=ro.branch, batch=index + 1, devices=ro.batches[index],
        )  # fmt: skip
        view.update(state="rolling", reason=f"batch {index + 1}/{total} released")

    def _halt(
        self,
        ro: Rollout,
        index: int,
        outcome: gating.BatchOutcome,
        policy: gating.BatchPolicy,
        now: float,
    ) -> None:
        halt_id = f"{ro.group}-v{ro.version}"
        failed = [{"device": d, "state": s, "reason": r} for d, s, r in outcome.failed]
        reason = (
            f"batch {index + 1}/{len(ro.batches)} of v{ro.version}: {len(failed)} failed"
            f" (at most {policy.max_failures}): "
            + ", ".join(f"{f['device']} {f['state']}" for f in failed)
        )
        ro.halted = {"id": halt_id, "at": now, "batch": index + 1, "failed": failed,
                     "reason": reason}  # fmt: skip
        self._log(logging.WARNING, "rollout of %s halted: %s", ro.group, reason)
        self._event(
            "rollout-halted", group=ro.group, branch=ro.branch, version=ro.version,
            commit=ro.commit, digest=ro.digest, batch=index + 1, devices=failed,
            on_failure=policy.on_failure, halt=halt_id, reason=reason,
        )  # fmt: skip
        self._audit_line(
            "rollout-halted", ro.group, version=ro.version, commit=ro.commit, digest=ro.digest,
            branch=ro.branch, batch=index + 1, devices=failed, halt=halt_id,
        )  # fmt: skip
        if policy.on_failure == "revert" and halt_id not in self.ledger.reverts:
            self.ledger.reverts[halt_id] = {
                "branch": ro.branch, "commit": ro.commit, "group": ro.group,
                "reason": reason, "revert": None, "error": None,
            }  # fmt: skip

    def _show_rollout(self, view: dict[str, Any], gid: str, cur: Current | None) -> None:
        ro = self.ledger.rollouts.get(gid)
        if ro is None or cur is None:
            return
        batches = []
        for index, batch in enumerate(ro.batches):
            outcome = gating.assess_batch(batch, ro.version, self.statuses)
            batches.append(
                {
                    "batch": index + 1,
                    "devices": batch,
                    "released_at": ro.released[index] if index < len(ro.released) else None,
                    "completed_at": ro.completed[index] if index < len(ro.completed) else None,
                    "in_sync": list(outcome.in_sync),
                    "failed": [d for d, _s, _r in outcome.failed],
                    "offline": list(outcome.offline),
                }
            )
        view["rollout"] = {
            "version": ro.version,
            "commit": ro.commit,
            "digest": ro.digest,
            "halted": ro.halted,
            "done_at": ro.done_at,
            "closed": ro.closed,
        }
        view["batches"] = batches
        if view["state"] == "idle" and ro.done_at is not None:
            view["state"] = "done"
        elif view["state"] == "idle" and ro.halted is not None and ro.closed is None:
            view.update(state="halted", reason=ro.halted.get("reason", ""))
        revert = self.ledger.reverts.get((ro.halted or {}).get("id", ""))
        if revert is not None:
            view["revert"] = revert
