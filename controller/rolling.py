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
   ``git revert`` commit written once by :func:`reverting.revert`. The reverted content
   then walks back to every device at once.

The decisions are made by the pure :func:`rollouts.decide` (and
:func:`rollouts.decide_command` for an operator command); this class is its shell: it
gathers the facts, keeps the state the decision returns (saving the ledger when it
changed), and queues the typed actions, which the controller's reconcile loop carries out
after each planning round through its executor (:meth:`actions`, :meth:`done`): audit
lines, events, and the retained ``groups/<g>/rollout`` and ``rings/<ring>/gate``
statuses that changed. Reverts are written here (:meth:`write_reverts`, git I/O through
:mod:`reverting`). :attr:`deadline` (a timer, a window) is part of the loop's next
wake-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from setpoint.kit.files import write_atomic
from setpoint.proto import approvals, envelopes, status
from setpoint.proto.errors import ProtocolError
from setpoint.proto.status import DriftStatus
from setpoint.proto.topics import Topics

from . import reverting, rollouts
from .audit import Entry
from .broker import Subscription
from .planning import Current
from .rendering import Render, Target
from .rollouts import Action, Emit, Ledger, Log, Record, Show, State

if TYPE_CHECKING:
    from .broker import Message

log = logging.getLogger(__name__)

AUTHOR: Final = "setpoint-rollouts"
# An operator command is a few hundred bytes; its envelope adds signatures (a handful).
MAX_COMMAND_ENVELOPE: Final = approvals.MAX_OPERATOR_COMMAND_BYTES + 2048


def audit_entry(record: Record) -> Entry:
    """A rollout decision's audit line in the audit log's one schema."""
    return Entry(
        time=record.time,
        target=f"{record.kind}/{record.id}",
        kind=record.kind,
        id=record.id,
        version=record.version,
        commit=record.commit,
        author=AUTHOR,
        digest=record.digest,
        reason=record.reason,
        branch=record.branch,
        content_digest=record.tree,
        detail=dict(record.detail),
    )


def load_ledger(state_dir: Path) -> Ledger:
    path = state_dir / rollouts.LEDGER_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Ledger()
    return Ledger.from_json(data, str(path))


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
        self.state = State()
        self.views: Mapping[str, dict[str, Any]] = {}  # topic -> retained JSON body
        self._published_views: dict[str, dict[str, Any]] = {}
        self._queued: list[Emit | Record] = []
        self.deadline: float | None = None  # when a decision falls due (a timer, a window)
        self._operators: dict[str, tuple[str, Any]] = {}
        self._operator_source: Any = None
        self._state_dir = state_dir or Path(".")
        # False once a planning round found no rings, rollouts, windows or ledger entries:
        # a drift status then decides nothing, and waking the controller for each one
        # would plan the whole fleet per status change (see docs/decisions/0005).
        self._statuses_matter = True

    @property
    def ledger(self) -> Ledger:
        return self.state.ledger

    # --- Wiring ------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """False while the last planning round found no rings, rollouts, windows or ledger
        entries: then nothing the rollouts see changes a plan."""
        return self._statuses_matter

    def load(self) -> None:
        """Read the ledger (gate evidence, approvals, batches, reverts) from the state dir."""
        self.state = State(load_ledger(self._state_dir))

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

    def _apply(self, state: State, actions: tuple[Action, ...]) -> None:
        """Keep what the decision returned: the state (the ledger saved first when it
        changed, before anything it decided goes out), the actions queued."""
        if state.ledger is not self.state.ledger:
            write_atomic(self._state_dir / rollouts.LEDGER_FILE, state.ledger.to_json())
        self.state = state
        for action in actions:
            if isinstance(action, Log):
                log.log(action.level, "%s", action.message)
            elif isinstance(action, Emit | Record):
                self._queued.append(action)

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
        """An operator command (approve, pause, resume): verified here, decided by
        :func:`rollouts.decide_command`."""
        try:
            verified = envelopes.verify_signed(
                message.payload,
                self._trusted_operators(),
                payload_type=envelopes.APPROVAL_TYPE,
                max_size=MAX_COMMAND_ENVELOPE,  # refused by its size before it is decoded
            )
            command = approvals.decode(verified.payload)
        except ProtocolError as exc:
            reason = f"operator command refused: {exc}"
            self._queued.append(Emit("rollout", dict(action="refused", reason=reason)))
            return
        # Named after the key whose signature verified, never after an entry merely present.
        keyid = verified.keyids[0]
        who = self._operators[keyid][0]
        self._apply(*rollouts.decide_command(self.state, command, who, keyid, self._clock()))

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

    # --- The decision ------------------------------------------------------------------

    def hold_back(self, render: Render, published: Mapping[Target, Current]) -> Render:
        """What may be published now, given what is (``published``): the render with what
        gates, windows and batches hold back taken out (:func:`rollouts.decide`)."""
        self._learn_operators(render)
        facts = rollouts.Facts(
            render=render,
            published=published,
            statuses=self.statuses,
            synced=self.synced,
            now=self._clock(),
            topics=self.topics,
        )
        state, decision = rollouts.decide(self.state, facts)
        self._statuses_matter = decision.active
        if not decision.active:
            return render
        self._apply(state, decision.actions)
        self.views = decision.views
        self.deadline = decision.deadline
        return decision.render

    # --- Carrying out what was decided (through the controller's executor) ----------------

    def actions(self) -> list[Action]:
        """What was decided and is not carried out yet, in the order to carry it out:
        audit lines, events, then the rollout and gate statuses that changed (typed,
        through the proto codecs). Each is queued until :meth:`done` says it was."""
        now = self._clock()
        shows: list[Action] = [
            Show(topic, rollouts.typed_view(self.topics.parse(topic).kind, view, now), view)
            for topic, view in self.views.items()
            if self._published_views.get(topic) != view
        ]
        records = [a for a in self._queued if isinstance(a, Record)]
        return [*records, *(a for a in self._queued if isinstance(a, Emit)), *shows]

    def done(self, action: Action) -> None:
        """``action`` (from :meth:`actions`) was carried out."""
        if isinstance(action, Show):
            self._published_views[action.topic] = dict(action.view)
        elif isinstance(action, Emit | Record):
            self._queued.remove(action)

    async def write_reverts(self, repo: str | None) -> bool:
        """Write the reverts halted rollouts asked for (``repo``: the local repository,
        None if remote); True if one was written (the repository moved)."""
        reverted = False
        for halt_id, job in list(self.ledger.reverts.items()):
            if job.get("revert") or job.get("error"):
                continue
            if repo is None:
                job["error"] = "the repository is remote: the controller cannot push a revert"
            else:
                try:
                    sha = await asyncio.to_thread(
                        reverting.revert,
                        repo,
                        job["branch"],
                        job["commit"],
                        halt_id,
                        job["reason"],
                    )
                    job["revert"] = sha
                except reverting.RevertError as exc:
                    job["error"] = str(exc)
            write_atomic(self._state_dir / rollouts.LEDGER_FILE, self.ledger.to_json())
            now = self._clock()
            if job.get("revert"):
                self._queued.append(Emit("rollout", dict(
                    action="reverted", group=job["group"], branch=job["branch"],
                    commit=job["commit"], revert=job["revert"], halt=halt_id,
                )))  # fmt: skip
                self._queued.append(Record(
                    time=now, kind="group", id=job["group"], reason="reverted",
                    commit=job["revert"], branch=job["branch"],
                    detail={"reverted": job["commit"], "halt": halt_id},
                ))  # fmt: skip
                reverted = True
            else:
                log.error("revert for %s failed: %s", halt_id, job["error"])
                self._queued.append(Emit("rollout", dict(
                    action="revert-failed", group=job["group"], halt=halt_id, reason=job["error"]
                )))  # fmt: skip
        return reverted
