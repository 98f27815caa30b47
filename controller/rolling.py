"""Rollouts inside the controller: gates between rings, batches, windows, halts, reverts.

:class:`Rollouts` is part of every controller. It reads the devices' drift statuses from
the drift engine of the same controller when it runs one (the controller hands them to
:meth:`take_status`), otherwise from their retained ``.../devices/<id>/drift`` topics
(:meth:`take_drift`; the drift engine's public output, a normal QoS 0 subscription, so
the retained ones arrive on every connect), verified operator commands from
``.../operators/commands`` (:meth:`take_command`), and the repository's render; before
every planning round the controller asks :meth:`Rollouts.hold_back` what may go out:

1. **Gates.** A gated ring's targets whose content (the git tree of the ring's head)
   has not passed the gate are held: their last bundles stay, the ring's groups report
   ``gated`` (or ``refused`` when the content never ran on the source ring). Evidence is
   kept per (ring, tree) in the ledger; the moment it passes (a drift status arrives, a
   ``healthy_for`` timer runs out, an approval is verified), the controller is woken and
   the held content goes out by itself.
2. **Windows.** Outside a group's maintenance window a new version waits (``pending``)
   unless its commit subject says ``[urgent]`` *and* an operator approved that content for
   its branch with a signed approval.
3. **Batches.** A group with ``rollout:`` first pins every device bundle to the group
   version it runs (``group_version``), then publishes the new group bundle, then moves
   the pin of one batch at a time to the new version, after the previous batch completed
   and the pause passed. A batch whose failures pass ``max_failures`` halts the rollout:
   a ``rollout-halted`` event with the evidence and, with ``on_failure: revert``, a
   ``git revert`` commit written once by :func:`rollouts.revert`. The reverted content
   then walks back to every device at once.

Decisions are made in :meth:`hold_back` (synchronous, no I/O but the ledger file); they
are queued here, and the controller's reconcile loop carries them out after each planning
round through its executor (:meth:`flush`): events, retained ``groups/<g>/rollout`` and
``rings/<ring>/gate`` statuses, audit lines, and reverts. :attr:`deadline` (a timer, a
window) is part of the loop's next wake-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from setpoint.proto import approvals, envelopes, rollout_status, status
from setpoint.proto.bundles import Bundle
from setpoint.proto.errors import ProtocolError
from setpoint.proto.rollout_status import GateStatus, RolloutStatus
from setpoint.proto.status import DriftStatus
from setpoint.proto.topics import Topics

from . import gating, rollouts
from .audit import Entry
from .broker import Subscription
from .fleet import Group
from .gating import GateDecision, Rings
from .planning import Current
from .rendering import Render, Rendered, Target
from .rollouts import Ledger, Rollout

if TYPE_CHECKING:
    from .broker import Message

log = logging.getLogger(__name__)

AUTHOR: Final = "setpoint-rollouts"
CLOCK_SKEW: Final = 60
MAX_EVIDENCE_SHOWN: Final = 8
# An operator command is a few hundred bytes; its envelope adds signatures (a handful).
MAX_COMMAND_ENVELOPE: Final = approvals.MAX_OPERATOR_COMMAND_BYTES + 2048


def _unpinned(bundle: Bundle) -> str:
    return dataclasses.replace(bundle, group_version=None).content_digest()


def _differs(rendered: Rendered | None, current: Current | None) -> bool:
    if rendered is None or current is None:
        return (rendered is None) != (current is None)
    return _unpinned(rendered.bundle) != _unpinned(current.bundle)


@dataclass(frozen=True, slots=True)
class Emit:
    """Send an event (``events/<type>``)."""

    type: str
    fields: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Record:
    """Write a line of the audit log (its one schema)."""

    entry: Entry


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
Action = Emit | Record | Show


class Rollouts:
    """The rollouts of one controller; see the module docstring."""

    name = "rollouts"

    def __init__(
        self,
        *,
        topics: Topics | None = None,
        state_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self.topics = topics or Topics()
        self.statuses: dict[str, DriftStatus] = {}
        self.synced = False
        self.ledger = Ledger()
        self.views: dict[str, dict[str, Any]] = {}  # topic -> retained JSON body
        self._published_views: dict[str, dict[str, Any]] = {}
        self._events: list[Emit] = []
        self._audit: list[Record] = []
        self._noted: dict[str, Any] = {}
        self.deadline: float | None = None  # when a decision falls due (a timer, a window)
        self._operators: dict[str, tuple[str, Any]] = {}
        self._operator_source: Any = None
        self._state_dir = state_dir or Path(".")
        # False once a planning round found no rings, rollouts, windows or ledger entries:
        # a drift status then decides nothing, and waking the controller for each one
        # would plan the whole fleet per status change (see docs/decisions/0005).
        self._statuses_matter = True

    # --- Wiring ------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """False while the last planning round found no rings, rollouts, windows or ledger
        entries: then nothing the rollouts see changes a plan."""
        return self._statuses_matter

    def load(self) -> None:
        """Read the ledger (gate evidence, approvals, batches, reverts) from the state dir."""
        self.ledger = Ledger.load(self._state_dir)

    def subscriptions(self, *, drift_statuses: bool) -> list[Subscription]:
        """What the rollouts take in: verified operator commands, and the retained drift
        statuses when no drift engine in this controller tells them (``drift_statuses``)."""
        wanted = [Subscription(self.topics.operator_commands(), qos=1)]
        if drift_statuses:
            wanted.append(Subscription(self.topics.all_drift()))
        return wanted

    def connected(self) -> None:
        """A new connection: statuses are read again, views published again."""
        self.synced = False
        self._published_views.clear()  # a wiped broker gets the statuses again

    def _save(self) -> None:
        self.ledger.save(self._state_dir)

    # --- Inputs --------------------------------------------------------------------------

    def take_drift(self, message: Message) -> bool:
        """A retained drift status (from another controller's engine); True if it matters."""
        try:
            ref = self.topics.parse(message.topic)
        except ProtocolError:
            return False
        if ref.kind != "device-drift":
            return False
        if not message.payload:
            return self.take_status(ref.name, None)
        try:
            drift = status.drift_from_json(message.payload)
        except ProtocolError as exc:
            log.warning("ignoring a malformed drift status of %s: %s", ref.name, exc)
            return False
        if drift.device != ref.name:
            return False  # a status must be about the device its topic names
        return self.take_status(ref.name, drift)

    def take_status(self, device: str, drift: DriftStatus | None) -> bool:
        """A device's drift status; True if the next plan may decide otherwise for it."""
        if drift is None:
            return self.statuses.pop(device, None) is not None and self._statuses_matter
        if self.statuses.get(device) != drift:
            self.statuses[device] = drift
            return self._statuses_matter
        return False

    def take_command(self, message: Message) -> None:
        """An operator command (approve, pause, resume): verified, recorded, evented."""
        now = self._clock()
        try:
            verified = envelopes.verify_signed(
                message.payload,
                self._trusted_operators(),
                payload_type=envelopes.APPROVAL_TYPE,
                max_size=MAX_COMMAND_ENVELOPE,  # refused by its size before it is decoded
            )
            command = approvals.decode(verified.payload)
        except ProtocolError as exc:
            self._event("rollout", action="refused", reason=f"operator command refused: {exc}")
            return
        # Named after the key whose signature verified, never after an entry merely present.
        keyid = verified.keyids[0]
        who = self._operators[keyid][0]
        if command.expires_at + CLOCK_SKEW < now or command.issued_at - CLOCK_SKEW > now:
            self._event("rollout", action="refused", nonce=command.nonce, reason="expired")
            return
        if command.nonce in self.ledger.nonces:
            self._event("rollout", action="refused", nonce=command.nonce, reason="replayed")
            return
        self.ledger.nonces.append(command.nonce)
        fields: dict[str, Any] = dict(nonce=command.nonce, by=who, keyid=keyid)
        if command.action == "approve":
            key = Ledger.key(command.ring, command.tree)
            self.ledger.approvals[key] = {"by": who, "at": now, "via": "signed"}
            self._event(
                "rollout", action="approved", ring=command.ring, tree=command.tree, **fields
            )
            self._audit_line("approved", command.ring, tree=command.tree, by=who)
        elif command.action == "pause":
            self.ledger.paused[command.group] = {"by": who, "at": now}
            self._event("rollout", action="paused", group=command.group, **fields)
            self._audit_line("paused", command.group, by=who)
        else:
            self.ledger.paused.pop(command.group, None)
            self._event("rollout", action="resumed", group=command.group, **fields)
            self._audit_line("resumed", command.group, by=who)
        self._save()

    def _trusted_operators(self) -> dict[str, Any]:
        return {k: key for k, (_name, key) in self._operators.items()}

    def _learn_operators(self, render: Render) -> None:
        settings = render.settings
        source = tuple((o.name, o.key) for o in settings.operators) if settings else ()
        if source == self._operator_source:
            return
        self._operator_source = source
        operators: dict[str, tuple[str, Any]] = {}
        for name, pem in source:
            try:
                key = envelopes.load_public_key(pem.encode("utf-8"))
            except (ProtocolError, ValueError) as exc:
                log.warning("operator %s: unusable public key (%s)", name, exc)
                continue
            operators[envelopes.key_id(key)] = (name, key)
        self._operators = operators

    # --- Outputs (queued here, carried out by the executor: see flush) ---------------------

    def _event(self, event_type: str, **fields: Any) -> None:
        self._events.append(Emit(event_type, fields))

    def _audit_line(self, what: str, target: str, **fields: Any) -> None:
        kind = "group" if not target.startswith("ring:") else "ring"
        ident = target.removeprefix("ring:")
        self._audit.append(
            Record(Entry(
                time=self._clock(),
                target=f"{kind}/{ident}",
                kind=kind,
                id=ident,
                version=fields.pop("version", None),
                commit=fields.pop("commit", None),
                author=AUTHOR,
                digest=fields.pop("digest", None),
                reason=what,
                branch=fields.pop("branch", None),
                content_digest=fields.pop("tree", None),
                detail=fields,
            ))
        )  # fmt: skip

    def _note_once(self, key: str, value: Any) -> bool:
        """True the first time ``value`` is noted under ``key`` (events only on change)."""
        if self._noted.get(key) == value:
            return False
        self._noted[key] = value
        return True

    # --- The decisions -----------------------------------------------------------------

    def hold_back(self, render: Render, published: Mapping[Target, Current]) -> Render:
        """What may be published now, given what is (``published``); see the module
        docstring."""
        now = self._clock()
        self._learn_operators(render)
        settings = render.settings
        rings = settings.ring_list() if settings is not None else Rings()
        if not rings and not any(g.rollout or g.window for g in render.groups.values()):
            if self.ledger.rollouts or self.ledger.staged:
                pass  # policies removed: unpinning below still applies
            else:
                self._statuses_matter = False
                return render
        self._statuses_matter = True
        for info in render.heads.values():
            self.ledger.learn_tree(info.id, info.tree.decode("ascii"))
        before = self.ledger.to_json()
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

        if self.ledger.to_json() != before:
            self._save()
        self.views = views
        future = [d for d in deadlines if d > now]
        self.deadline = min(future) if future else None
        if desired == render.desired and broken == render.broken:
            return render
        return dataclasses.replace(render, desired=desired, broken=frozenset(broken))

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
                    log.info(
                        "content %s passed on %s for %s", health.tree[:12], ring.branch, down.branch
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
            views[self.topics.ring_gate(branch)] = self._gate_view(
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
                    log.info("ring %s gated at %s: %s", branch, info.id[:12], decision.reason)
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
            views[self.topics.group_rollout(gid)] = view
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
        log.info("rollout of %s v%d: releasing batch %d/%d %s", ro.group, ro.version,
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
        log.warning("rollout of %s halted: %s", ro.group, reason)
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

    # --- Carrying out what was decided (through the controller's executor) ----------------

    def actions(self) -> list[Action]:
        """What was decided and is not carried out yet, in the order to carry it out:
        audit lines, events, then the rollout and gate statuses that changed (typed,
        through the proto codecs). Each is queued until :meth:`done` says it was."""
        now = self._clock()
        shows: list[Action] = [
            Show(topic, _typed_view(self.topics.parse(topic).kind, view, now), view)
            for topic, view in self.views.items()
            if self._published_views.get(topic) != view
        ]
        return [*self._audit, *self._events, *shows]

    def done(self, action: Action) -> None:
        """``action`` (from :meth:`actions`) was carried out."""
        if isinstance(action, Record):
            self._audit.remove(action)
        elif isinstance(action, Emit):
            self._events.remove(action)
        else:
            self._published_views[action.topic] = dict(action.view)

    async def write_reverts(self, repo: str | None) -> bool:
        """Write the reverts halted rollouts asked for (``repo``: the local repository,
        None if remote); True if one was written (the repository moved)."""
        return await self._reverts(repo)

    async def _reverts(self, repo: str | None) -> bool:
        reverted = False
        for halt_id, job in list(self.ledger.reverts.items()):
            if job.get("revert") or job.get("error"):
                continue
            if repo is None:
                job["error"] = "the repository is remote: the controller cannot push a revert"
            else:
                try:
                    sha = await asyncio.to_thread(
                        rollouts.revert,
                        repo,
                        job["branch"],
                        job["commit"],
                        halt_id,
                        job["reason"],
                    )
                    job["revert"] = sha
                except rollouts.RevertError as exc:
                    job["error"] = str(exc)
            self._save()
            if job.get("revert"):
                self._event("rollout", action="reverted", group=job["group"], branch=job["branch"],
                            commit=job["commit"], revert=job["revert"], halt=halt_id)  # fmt: skip
                self._audit_line(
                    "reverted", job["group"], commit=job["revert"], branch=job["branch"],
                    reverted=job["commit"], halt=halt_id,
                )  # fmt: skip
                reverted = True
            else:
                log.error("revert for %s failed: %s", halt_id, job["error"])
                self._event("rollout", action="revert-failed", group=job["group"],
                            halt=halt_id, reason=job["error"])  # fmt: skip
        return reverted


def _typed_view(kind: str, view: Mapping[str, Any], now: float) -> RolloutStatus | GateStatus:
    """A view as its typed retained status (proto/SPEC.md 7.5, 7.6): what the codecs
    cannot read back is a bug here, and stops the controller loudly."""
    if kind == "ring-gate":
        return rollout_status.gate_from_dict({**view, "time": now})
    return rollout_status.rollout_from_dict({**view, "time": now})
