"""The controller service: git commits in, signed retained bundles out.

:class:`Controller` is an async context manager that owns one ``asyncio.TaskGroup`` with
named tasks:

* ``mqtt-link``: the broker connection (:class:`~setpoint.controller.broker.Link`), which
  reconnects with backoff and delivers every message and connection change as a fact to
  :meth:`Controller._take` (one door in); a ``sync-<n>`` task per connection waits until
  its retained picture is whole;
* ``reconcile``: the one level-triggered loop. Anything (a watched ref, a webhook, a
  poll, a retained topic that changed under us, a refresh falling due, a reconnect, a
  device's report or presence, the drift tick) only wakes it; each pass re-reads every
  branch, renders, :func:`~planning.plan`\\ s against what was published and what the
  broker holds, and carries the plan out, until nothing is left (skipped when only
  device facts or the drift tick woke it); then the drift step decides the devices
  that need it and the group summaries that moved, and carries that out;
* ``watch`` / ``poll`` / ``webhook``: what notices new commits.

Exceptions propagate: a bug stops the controller loudly, while expected trouble (broker
gone, repository unreachable, a broken commit) is logged, reported as an event and retried.

Gating is part of the controller, not an option: every controller owns a
:class:`~setpoint.controller.rolling.Rollouts` and asks it, before every planning round,
what may go out (rings, gates, windows, batches), and carries out what it decided after
each round. With ``drift=DriftSettings(...)`` it also owns the drift part
(:class:`~setpoint.controller.drifting.DriftEngine`: facts and decisions, no task of its
own), which is told every batch of publications and decided in the same loop; the
statuses it decides or reads go to the rollouts. Everything that goes out goes through one
:class:`~setpoint.controller.executing.Executor` (sign, publish, clear, event, audit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from setpoint.kit.backoff import Retry
from setpoint.proto.bundles import Bundle
from setpoint.proto.errors import ProtocolError
from setpoint.proto.repository import RepositoryStatus
from setpoint.proto.status import DriftStatus
from setpoint.proto.topics import DEFAULT_PREFIX, Topics

from . import (
    broker,
    drifting,
    fleet,
    planning,
    protection,
    rendering,
    rereading,
    resending,
    watching,
    webhooks,
)
from .audit import AuditLog, Entry
from .broker import (
    Backoff,
    BrokerSettings,
    Connected,
    Disconnected,
    Fact,
    Link,
    Message,
    Session,
    Subscription,
)
from .detecting import ClearDrift, DriftAction, GroupAction, ShowDrift
from .drifting import DriftEngine, DriftSettings
from .errors import BrokerUnavailable, ConfigError, RepositoryUnavailable
from .executing import Executor
from .fleet import DEFAULT_BUNDLE_TTL
from .metrics import Metrics
from .planning import Action, Adopt, Clear, Current, Plan, Publish, Retained
from .rendering import BranchProblem, Render, Target, View
from .repository import Repository, is_remote, redact
from .retained import RetainedView
from .rolling import Rollouts, audit_entry
from .rollouts import Emit, Record, Show
from .signing import Signer, load_signer
from .state import FleetIdentity, Intent, StateStore

log = logging.getLogger(__name__)

DEFAULT_REMOTE_POLL: Final = 60.0
DEFAULT_PUBLISH_TIMEOUT: Final = 10.0  # seconds the controller waits for an acknowledgement
MAX_PLAN_ROUNDS: Final = 4
PUBLISH_CONCURRENCY: Final = 64
_FETCH_REASONS: Final = frozenset({"start", "poll", "webhook", "manual", "retry"})

Reason = Literal["change", "restore", "refresh", "adopted", "removed"]


def timer_due(
    now: float, deadline: float | None, rollout: float | None, woken_for: float | None
) -> tuple[bool, float | None]:
    """Whether a wake of the loop that the drift tick also asked for is a timer's too, and
    the rollout deadline a pass has now been woken for.

    ``deadline``: the loop's next deadline (a refresh, a retry, a rollout's timer not yet
    due); ``rollout``: the rollouts' deadline as it is (a gate's ``healthy_for``, a batch's
    pause, a window), which stops being a deadline of the loop once it fell due. One that
    fell due in the same wake as the tick still wakes a pass, once: without it the pass
    ran for the tick alone and the rollout waited for the next unrelated wake (the
    rollout demo's production gate, 28 s late in CI)."""
    if deadline is not None and now >= deadline:
        return True, woken_for
    if rollout is not None and rollout <= now and rollout != woken_for:
        return True, rollout
    return False, woken_for


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    repo: str
    broker: BrokerSettings
    key_path: Path
    state_dir: Path
    extra_key_paths: tuple[Path, ...] = ()  # also sign with these (key rotation overlap)
    prefix: str = DEFAULT_PREFIX
    branch: str | None = None
    config_branch: str | None = None  # rings, gates, operators (see controller.protection)
    bundle_ttl: int = DEFAULT_BUNDLE_TTL
    follow: bool = True
    watch: bool = True
    poll_interval: float | None = None
    webhook_listen: tuple[str, int] | None = None
    webhook_secret: bytes | None = field(default=None, repr=False)
    publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT
    backoff: Backoff | None = None
    # A bundle acknowledged slower than this makes the controller read its retained bundles
    # again once the broker answers promptly (controller/rereading.py); None: never.
    slow_ack: float | None = rereading.DEFAULT_SLOW_ACK


@dataclass(frozen=True, slots=True)
class Publication:
    """One acknowledged change to a retained bundle (``bundle`` is None when removed)."""

    time: float
    target: Target
    reason: Reason
    bundle: Bundle | None
    digest: str | None
    author: str
    branch: str | None
    version: int | None
    commit: str | None


class Controller:
    def __init__(
        self,
        config: ControllerConfig,
        *,
        drift: DriftSettings | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        """``metrics``: the drift part's, when someone else serves them (a replica's)."""
        self.config = config
        self.topics = Topics(config.prefix)
        self._clock = clock
        self._wake = asyncio.Event()
        self._reasons: set[str] = set()
        self._generation = 0
        self._settled_generation = -1
        self._settled = asyncio.Condition()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._syncs: set[asyncio.Task[None]] = set()  # one per connection, while it syncs
        self._tg: asyncio.TaskGroup | None = None
        self._state = StateStore(config.state_dir)
        self._audit = AuditLog(config.state_dir)
        self._current: dict[Target, Current] = {}
        self._resent: dict[Target, resending.Sent] = {}  # the last re-send per target
        self._rereads = rereading.Ledger()  # targets acknowledged slowly, not read since
        # When each published target is to be refreshed (a heap; an entry whose bundle is
        # no longer the target's is stale and dropped when it reaches the top).
        self._refreshes: list[tuple[int, int, Target, Bundle]] = []
        self._pushed = itertools.count()  # ties broken by order, never by target
        self._tick_at: float | None = None  # the drift tick (monotonic)
        self._woken_for_rollout: float | None = None  # the rollout deadline a pass was woken for
        self._floors: dict[Target, int] = {}
        self._attempted: dict[Target, Bundle] = {}
        self._changes = 0  # counts every change of what was published, floors, attempts
        self._settled_on: tuple[Any, ...] | None = None  # the inputs of the last empty plan
        self._intents: dict[Target, Intent] = {}  # publications under way (write-ahead)
        self._snapshots: OrderedDict[str, View] = OrderedDict()
        self._memo = fleet.Memo()  # device files read before, by content
        self._loaded: dict[str, View] = {}  # per branch, the view read last
        self._render_key: tuple[Any, ...] | None = None
        self._render: Render | None = None
        self._reported: dict[str, str] = {}
        self._refusal_reported: str | None = None
        self._warned: tuple[tuple[str, str], ...] = ()
        self._verdicts: RepositoryStatus | None = None
        self._verdicts_published: bytes | None = None
        self._default_branch = config.branch
        self._protection = protection.Memory(config.state_dir, config.config_branch)
        self._repo_backoff = Retry(Backoff(1.0, 30.0))
        self._retry_at: float | None = None
        self._warned_empty = False
        self.repository: Repository | None = None
        self.signer: Signer | None = None
        # The rollouts' decisions (gates, windows, batches) are part of every plan.
        self.rollouts = Rollouts(topics=self.topics, state_dir=config.state_dir, clock=clock)
        self.retained: RetainedView | None = None
        self.link = Link(
            config.broker,
            self.topics,
            self._subscriptions(drift),
            self._take,
            backoff=config.backoff,
            publish_timeout=config.publish_timeout,
        )
        # The one door out: signing, publishing, clearing, audit, events.
        self.executor = Executor(self.link, self.topics, self._audit, clock)
        self.drift: DriftEngine | None = None
        if drift is not None:
            self.drift = DriftEngine(drift, topics=self.topics, clock=clock, metrics=metrics)
        self.webhook_port: int | None = None
        self.last_render: Render | None = None
        self.last_error: str | None = None

    # --- What the parts built on it read ---------------------------------------------------

    def desired(self) -> dict[Target, Bundle]:
        """The bundles currently published (or kept), per target."""
        return {t: c.bundle for t, c in sorted(self._current.items())}

    def published(self) -> dict[Target, Current]:
        """Like :meth:`desired`, with who made each change and when it was published."""
        return dict(sorted(self._current.items()))

    def wake(self, reason: str = "manual") -> None:
        """Ask the reconcile loop for a pass (cheap; any number of calls coalesce)."""
        self._reasons.add(reason)
        self._generation += 1
        self._wake.set()

    async def settle(self, timeout: float | None = None) -> None:
        """Wake the loop and wait until a pass that began after this call left nothing to do."""
        self.wake("manual")
        wanted = self._generation
        async with asyncio.timeout(timeout), self._settled:
            await self._settled.wait_for(lambda: self._settled_generation >= wanted)

    # --- Lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Controller:
        config = self.config
        if config.follow and config.webhook_listen is not None and not config.webhook_secret:
            raise ConfigError("a webhook needs a secret: pass --webhook-secret-file")
        if config.slow_ack is not None and not 0 < config.slow_ack < config.publish_timeout:
            raise ConfigError(
                f"slow_ack {config.slow_ack:g}s is not between 0 and the publish timeout"
                f" ({config.publish_timeout:g}s): an acknowledgement that slow fails the"
                " publication instead; use a smaller slow_ack (default"
                f" {rereading.DEFAULT_SLOW_ACK:g}s), or None to turn rule 1 off"
            )
        self.signer = load_signer(config.key_path, *config.extra_key_paths)
        self.executor.signer = self.signer
        log.info("signing with key(s) %s", ", ".join(self.signer.key_ids))
        self._state.lock()
        try:
            self._state.claim(identity(config))
            self._current, self._floors = self._state.load()
            self._intents = self._state.intents()
            for target, entry in self._current.items():
                self._floors[target] = max(self._floors.get(target, 0), entry.version)
            self._refreshes = [
                (planning.refresh_at(c.bundle), next(self._pushed), t, c.bundle)
                for t, c in self._current.items()
            ]
            heapq.heapify(self._refreshes)
            self.repository = await asyncio.to_thread(Repository, config.repo, config.state_dir)
            if self._default_branch is None and not self.repository.remote:
                self._default_branch = self.repository.default_branch()
                if self._default_branch is None:
                    raise ConfigError(f"{config.repo}: HEAD does not name a branch; pass --branch")
            self.retained = RetainedView(self.topics, self.signer.trusted, self._retained_changed)
            self.rollouts.load()
            if self.drift is not None:
                self.drift.published(None, self._current)
            self._tg = asyncio.TaskGroup()
            await self._tg.__aenter__()
            await self._serve_metrics()
        except BaseException:
            self._close_metrics()
            self._close()
            raise
        self._spawn(self.link.run(), "mqtt-link")
        self._spawn(self._reconciling(), "reconcile")
        if config.follow:
            self._start_watchers()
        self.wake("start")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._stop.set()
        for task in (*self._tasks, *self._syncs):
            task.cancel()
        error = exc_info[1]
        try:
            assert self._tg is not None
            await self._tg.__aexit__(*exc_info)
        except BaseExceptionGroup as group:
            # An error in the body of ``async with`` comes back alone, not in a group.
            if error is not None and list(group.exceptions) == [error]:
                raise error from None
            raise
        finally:
            await asyncio.to_thread(self._close_metrics)
            self._close()

    def _close_metrics(self) -> None:
        """Stop serving the metrics, if this controller serves them; a replica's leader,
        whose metrics its shard owner serves on, takes its group gauges with it (a scrape of
        every replica then counts each group once, from the leader)."""
        if self.drift is None:
            return
        if self.drift.settings.metrics_listen is not None:
            self.drift.metrics.close()
        elif self.drift.settings.summaries:
            self.drift.metrics.forget_devices()

    async def _serve_metrics(self) -> None:
        listen = self.drift.settings.metrics_listen if self.drift is not None else None
        if self.drift is not None and listen is not None:
            port = await asyncio.to_thread(self.drift.metrics.serve, *listen)
            log.info("metrics on http://%s:%d/metrics", listen[0] or "0.0.0.0", port)

    def _close(self) -> None:
        if self.repository is not None:
            self.repository.close()
        self._state.unlock()

    def _spawn(self, coro: Any, name: str) -> None:
        assert self._tg is not None
        self._tasks.append(self._tg.create_task(coro, name=name))

    def _start_watchers(self) -> None:
        config, repo = self.config, self.repository
        assert repo is not None
        poll = config.poll_interval
        if repo.remote:
            poll = poll or DEFAULT_REMOTE_POLL
        elif config.watch:
            self._spawn(self._watch_local(), "watch")
        if poll:
            self._spawn(watching.poll(poll, self.wake), "poll")
        if config.webhook_listen is not None:
            assert config.webhook_secret
            host, port = config.webhook_listen
            self._spawn(
                webhooks.serve(
                    host, port, config.webhook_secret, self.wake, started=self._webhook_started
                ),
                "webhook",
            )

    def _webhook_started(self, port: int) -> None:
        self.webhook_port = port

    async def _watch_local(self) -> None:
        assert self.repository is not None
        refs_dir, git_dir = self.repository.watch_paths()
        try:
            await watching.watch_local(refs_dir, git_dir, self.wake, self._stop)
        except* (OSError, RuntimeError, ImportError) as group:
            log.warning(
                "cannot watch %s (%s); polling every second instead", git_dir, group.exceptions[0]
            )
            await watching.poll(1.0, self.wake)

    # --- Facts in: the broker's messages and connection changes -----------------------------

    def _subscriptions(self, drift: DriftSettings | None) -> list[Subscription]:
        topics = self.topics
        wanted = [
            Subscription(topics.all_group_desired()),
            Subscription(topics.all_device_desired()),
        ]
        if drift is not None:
            wanted += drifting.subscriptions(topics, drift)
        # Without a drift engine in this controller, the rollouts read the retained drift
        # statuses (another controller's engine); with one, it tells them every status it
        # publishes or reads (MQTT does not bring our own back: no_local).
        wanted += self.rollouts.subscriptions(drift_statuses=drift is None)
        return wanted

    def _take(self, fact: Fact) -> None:
        """Every fact the link delivers, in order (called in its pump: must not block)."""
        if isinstance(fact, Message):
            self._message(fact)
        elif isinstance(fact, Connected):
            self._connected(fact.session)
        elif isinstance(fact, Disconnected) and self.retained is not None:
            self.retained.reset()

    def _message(self, message: Message) -> None:
        if message.topic == self.topics.operator_commands():
            self.rollouts.take_command(message)
            self.wake("rollouts")
            return
        try:
            kind = self.topics.parse(message.topic).kind
        except ProtocolError:
            if self.drift is not None:
                self.drift.take_report(message)  # counted as a bad topic
            return
        drift = self.drift
        if kind in ("group-desired", "device-desired"):
            assert self.retained is not None
            self.retained.handle(message)
        elif drift is not None:
            if kind == "device-reported":
                if drift.take_report(message):
                    self.wake("drift")
            elif kind == "device-presence":
                if drift.take_presence(message):
                    self.wake("drift")
            elif kind == "device-drift":
                read = drift.take_drift(message)
                if read is not None:
                    self._tell_rollouts(*read)
                    if drift.settings.shards is not None:
                        self.wake("drift")  # the shard owners decide: the summaries follow
            elif kind == "group-status":
                drift.take_group_status(message)
        elif kind == "device-drift" and self.rollouts.take_drift(message):
            self.wake("rollouts")

    def _tell_rollouts(self, device: str, found: DriftStatus | None) -> None:
        """Every status the drift part decides or reads: the rollouts decide on them."""
        if self.rollouts.take_status(device, found):
            self.wake("rollouts")

    def _connected(self, session: Session) -> None:
        # Nothing this connection brings has been delivered yet: every view starts over.
        assert self.retained is not None
        self.retained.reset()
        self._verdicts_published = None  # a new broker session: publish the status again
        self.rollouts.connected()
        if self.drift is not None:
            self.drift.connected()
        assert self._tg is not None
        started = time.monotonic()  # the subscriptions were made just before this fact
        task = self._tg.create_task(self._sync(session, started), name=f"sync-{session.number}")
        self._syncs.add(task)
        task.add_done_callback(self._syncs.discard)

    async def _sync(self, session: Session, started: float) -> None:
        """Once per connection: every retained message has arrived (a barrier came back),
        then each view is whole. Broker trouble ends the session (the link reconnects).
        A read of every retained bundle through a fresh subscription: the targets
        acknowledged slowly before it are confirmed (``rereading.reread``)."""
        try:
            await self.link.barrier()
            reports: list[Message] = []
            if self.drift is not None and self.drift.settings.share:
                reports = await broker.read_retained(
                    self.config.broker,
                    self.topics,
                    self.link.client_id,
                    self.topics.all_reported(),
                    max(30.0, self.config.publish_timeout),
                )
        except BrokerUnavailable as exc:
            session.fail(exc)
            return
        if session.lost.is_set():
            return  # a later connection syncs again
        assert self.retained is not None
        log.info("retained bundles on the broker: %d", len(self.retained.entries))
        self._rereads = rereading.reread(self._rereads, started)
        self.retained.mark_synced()
        if self.drift is not None:
            self.drift.synced(reports)
        self.rollouts.synced = True
        self.wake("rollouts")

    def _retained_changed(self) -> None:
        self.wake("retained")

    # --- The loop ------------------------------------------------------------------------------

    def _next_refresh(self) -> int | None:
        """When the earliest refresh falls due (what ``planning.next_refresh`` gives over
        every target, from a heap: work proportional to what was published since)."""
        heap, current = self._refreshes, self._current
        while heap:
            when, _, target, bundle = heap[0]
            entry = current.get(target)
            if entry is not None and entry.bundle is bundle:
                return when
            heapq.heappop(heap)
        return None

    def _refreshing(self, target: Target, bundle: Bundle) -> None:
        """``target`` now has ``bundle``: its refresh time goes on the heap."""
        entry = (planning.refresh_at(bundle), next(self._pushed), target, bundle)
        heapq.heappush(self._refreshes, entry)
        if len(self._refreshes) > 2 * len(self._current) + 1024:  # drop the stale entries
            self._refreshes = [
                (planning.refresh_at(c.bundle), next(self._pushed), t, c.bundle)
                for t, c in self._current.items()
            ]
            heapq.heapify(self._refreshes)

    def _next_deadline(self) -> float | None:
        if self.retained is None or not self.retained.synced:
            return None  # nothing can be done before the broker is back; its sync wakes us
        rollout = self.rollouts.deadline
        if rollout is not None and rollout <= self._clock():
            rollout = None  # fell due: the pass it woke has decided again
        times = [t for t in (self._next_refresh(), self._retry_at, rollout) if t]
        return min(times) if times else None

    def _timeout(self) -> float | None:
        """How long the loop may sleep: until the next deadline or the drift tick."""
        deadline = self._next_deadline()
        timeout = None if deadline is None else max(0.05, deadline - self._clock())
        if self._tick_at is not None and self.drift is not None and self.drift.session_synced:
            tick = max(0.0, self._tick_at - time.monotonic())
            timeout = tick if timeout is None else min(timeout, tick)
        slow_ack = self.config.slow_ack
        synced = self.retained is not None and self.retained.synced
        if self._rereads and slow_ack is not None and synced:
            due = rereading.due(self._rereads, slow_ack=slow_ack)
            if due is not None:  # a probe, or a read, is due then (rule 1)
                left = max(0.0, due - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
        return timeout

    async def _reconciling(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._timeout()):
                    await self._wake.wait()
            except TimeoutError:
                if not self._tick_due() or self._deadline_fell_due():
                    self._reasons.add("timer")
            self._wake.clear()
            reasons, self._reasons = self._reasons, set()
            generation = self._generation
            if self._retry_at is not None and self._clock() >= self._retry_at:
                reasons.add("retry")
            try:
                settled = await self._pass(reasons)
            except BrokerUnavailable as exc:
                log.warning("publishing interrupted: %s (resuming after reconnect)", exc)
                if self.drift is not None:
                    self.drift.interrupted()
                continue
            if settled and not self._wake.is_set():
                async with self._settled:
                    self._settled_generation = generation
                    self._settled.notify_all()

    def _deadline_fell_due(self) -> bool:
        """A deadline of the loop is due now (:func:`timer_due`)."""
        due, self._woken_for_rollout = timer_due(
            self._clock(), self._next_deadline(), self.rollouts.deadline, self._woken_for_rollout
        )
        return due

    def _tick_due(self) -> bool:
        return self._tick_at is not None and time.monotonic() >= self._tick_at

    async def _pass(self, reasons: set[str]) -> bool:
        """One pass of the loop: reconcile (unless only device facts or the drift tick
        woke it), then the drift step; True if it left nothing to do."""
        assert self.retained is not None
        if not self.retained.synced:
            self._reasons |= reasons  # kept for the pass that follows the sync
            return False
        if reasons - {"drift"}:
            await self._reconcile(reasons)
        await self._drift_step()
        await self._confirm()
        return self._retry_at is None and not self._rereads

    async def _reconcile(self, reasons: set[str]) -> None:
        """Read every branch, render, plan and carry the plan out, round after round."""
        assert self.retained is not None and self.repository is not None
        fetch = self.repository.remote and bool(reasons & _FETCH_REASONS)
        render: Render | None
        try:
            render = await asyncio.to_thread(self._read, fetch)
            self._retry_at = None
            self._repo_backoff.reset()
            self.last_error = None
        except RepositoryUnavailable as exc:
            delay = self._repo_backoff.next()
            self._retry_at = self._clock() + delay
            self.last_error = str(exc)
            log.warning("repository unavailable: %s (retrying in %.0fs)", exc, delay)
            render = self._render  # the last good reading, if any
        self.last_render = render
        refusal: str | None = None
        only: set[Target] | None = None
        self.retained.take_changed()
        for _ in range(MAX_PLAN_ROUNDS):
            plan = self._plan(render, only)
            refusal = plan.refusal
            if plan.refusal is not None:
                await self._report_refusal(render, plan.refusal)
            if plan:
                await self._execute(plan, render)
            await self._flush_rollouts()  # what the rollouts decided in this round
            if not plan:
                break
            # Work proportional to what changed: without rollout policies, the next round
            # looks only at the targets this one acted on and those a message changed.
            changed = self.retained.take_changed()
            if self.rollouts.active or changed is None:
                only = None
            else:
                only = {a.target for a in plan.actions} | changed
        else:
            log.warning("plan did not converge in %d rounds", MAX_PLAN_ROUNDS)
        if render is not None:
            await self._report_problems(render)
            await self._publish_verdicts(render, refusal)
            self._log_warnings(render)

    # --- The drift step: the devices' facts decided, carried out ----------------------------

    async def _drift_step(self) -> None:
        """Decide what the devices' facts ask for (``DriftEngine.decide``), carry it out
        through the executor, then the group summaries that moved (``summaries``); each
        action done is recorded (``DriftEngine.done``) and a device's status told to the
        rollouts. With the tick (every ``DriftSettings.tick`` seconds) pending, silent and
        unreconciled devices are decided again too."""
        drift = self.drift
        if drift is None or not drift.session_synced:
            return
        tick = self._tick_at is None or self._tick_due()
        if tick:
            self._tick_at = time.monotonic() + max(0.05, drift.settings.tick)
        await self._carry_out_drift(drift.decide(tick=tick))
        await self._carry_out_drift(drift.summaries())
        if tick:
            await self._resend(drift)
        await drift.passed()

    async def _resend(self, drift: DriftEngine) -> None:
        """Rule 2 of the remedy for an engine that lost a retained bundle
        (``controller/resending.py``, docs/scale-out.md): the envelope a live device stays
        behind on, published again unchanged, at most once per target per backoff."""
        after = drift.settings.resend_after
        if after is None or self.retained is None:
            return
        actions, self._resent = resending.decide(
            drift.behind(),
            self._current,
            self.retained.entries,
            self._resent,
            self._clock(),
            resend_after=after,
        )
        for action in actions:
            took = await self.executor.resend(action)
            self._resent[action.target] = action.sent()
            self._acked(action.target, action.version, took)
            log.warning("%s", action.describe())
            drift.metrics.resent.labels("behind").inc()

    # --- Rule 1: a slow acknowledgement makes the controller read its retained bundles ----

    def _acked(self, target: Target, version: int | None, took: float) -> None:
        """A bundle publication to ``target`` (``version`` None: its topic cleared) was
        acknowledged in ``took`` seconds: a slow one marks it unconfirmed, logged and
        counted (``controller/rereading.py``, docs/scale-out.md)."""
        slow_ack = self.config.slow_ack
        if slow_ack is None:
            return
        fact = rereading.Ack(target, version, took, time.monotonic())
        self._rereads, slow = rereading.take(self._rereads, fact, slow_ack=slow_ack)
        if slow is not None:
            log.warning("%s", slow.describe())
            if self.drift is not None:
                self.drift.metrics.slow_acks.labels(target.kind).inc()

    async def _confirm(self) -> None:
        """Rule 1's step, while a target is unconfirmed: probe whether the broker answers
        promptly again (at most once per ``slow_ack`` seconds) and, once it does, read the
        retained bundles through a fresh subscription (:meth:`_reread`); the pass that
        read wakes plans against what the broker really holds."""
        slow_ack = self.config.slow_ack
        if slow_ack is None or not self._rereads:
            return
        self._rereads, action = rereading.decide(self._rereads, time.monotonic(), slow_ack=slow_ack)
        if isinstance(action, rereading.Probe):
            try:
                took = await self.executor.probe(action)
            except BrokerUnavailable as exc:
                log.info("probing the broker: %s (trying again in %gs)", exc, slow_ack)
                return
            fact = rereading.Ack(None, None, took, time.monotonic())
            self._rereads, _ = rereading.take(self._rereads, fact, slow_ack=slow_ack)
            now = time.monotonic()
            self._rereads, action = rereading.decide(self._rereads, now, slow_ack=slow_ack)
        if isinstance(action, rereading.Reread):
            await self._reread(action)

    async def _reread(self, action: rereading.Reread) -> None:
        """The retained view emptied and read again through a fresh subscription on the live
        connection (``Link.reread``), as after a reconnect but without one: once the
        barrier is back the view is whole again and wakes the loop, whose plan publishes
        again whatever the broker holds older than what was published. Broker trouble
        ends the session: the link reconnects and the new connection reads it all."""
        assert self.retained is not None
        session = self.link.session()
        log.warning("%s", action.describe())
        started = time.monotonic()
        self.retained.reset()
        try:
            await self.executor.reread(action, self.retained.filters())
        except BrokerUnavailable as exc:
            session.fail(exc)
            raise
        if session.lost.is_set():
            return  # a later connection syncs again
        self._rereads = rereading.reread(self._rereads, started)
        log.info("retained bundles on the broker, read again: %d", len(self.retained.entries))
        self.retained.mark_synced()
        if self.drift is not None:
            self.drift.metrics.rereads.inc()

    async def _carry_out_drift(self, actions: Sequence[DriftAction | GroupAction]) -> None:
        """Every action through the executor, pipelined (many publications in flight at
        once, each device's in order); each recorded once the broker acknowledged it."""
        if not actions:
            return
        drift = self.drift
        assert drift is not None

        def done(action: DriftAction | GroupAction) -> None:
            found = drift.done(action)
            if isinstance(action, (ShowDrift, ClearDrift)):
                self._tell_rollouts(action.device, found)

        await self.executor.carry_out_all(actions, done)  # pipelined, in order

    async def _flush_rollouts(self) -> None:
        """Carry out what the rollouts decided; what the broker did not take stays queued."""
        assert self.repository is not None
        repo = None if self.repository.remote else self.config.repo
        if await self.rollouts.write_reverts(repo):
            self.wake("revert")  # a revert commit: the next pass publishes it
        for action in self.rollouts.actions():
            if isinstance(action, Record):
                await self.executor.audit([audit_entry(action)])
            elif isinstance(action, Emit):
                await self.executor.event(action.type, **action.fields)
            elif isinstance(action, Show):
                await self.executor.publish(action.topic, action.payload(), retain=True)
            self.rollouts.done(action)

    def _log_warnings(self, render: Render) -> None:
        """Log what publishes anyway but needs an operator (once per set of commits)."""
        key = tuple(sorted(render.commits.items()))
        if render.warnings and self._warned != key:
            for w in render.warnings:
                log.warning("on %s@%s: %s", w.branch, w.commit[:12], w.problem)
        self._warned = key

    def _ttl(self, render: Render | None) -> int:
        return (render.bundle_ttl if render else None) or self.config.bundle_ttl

    def _plan(self, render: Render | None, only: set[Target] | None = None) -> Plan:
        """The plan for ``render`` (``only``: see planning.plan); work proportional to what
        changed: when nothing it depends on moved since a plan that left nothing to do (the
        same render, the same retained bundles and publications, no refresh due, no rollout
        policy at all), that is the answer again without looking at every target; when
        only the render moved (a commit), the plan looks at the targets whose content moved
        (``planning.changed_targets``)."""
        assert self.retained is not None
        if render is not None and render.head:
            render = self.rollouts.hold_back(render, self._current)
        inputs = (render, self.retained.version, self._changes)
        refresh = self._next_refresh()
        quiet = not self.rollouts.active and (refresh is None or self._clock() < refresh)
        if quiet and only is None and self._settled_on is not None:
            if self._settled_on == inputs:
                return Plan()
            only = self._changed_since_settled(render)
        plan = _stamped(self._full_plan(render, only), render)
        self._settled_on = inputs if quiet and not plan and plan.refusal is None else None
        return plan

    def _changed_since_settled(self, render: Render | None) -> set[Target] | None:
        """When only the render moved since the last plan that left nothing to do (the
        same retained bundles and publications, the same rules for removals and
        lifetimes), the targets whose content moved: the only ones the plan must look
        at. None (look at every target) otherwise."""
        assert self._settled_on is not None and self.retained is not None
        settled, version, changes = self._settled_on
        if (version, changes) != (self.retained.version, self._changes):
            return None
        if render is None or settled is None or not render.head or not settled.head:
            return None
        same_rules = (
            render.removals_allowed == settled.removals_allowed
            and render.allow_empty == settled.allow_empty
            and self._ttl(render) == self._ttl(settled)
        )
        if not same_rules:
            return None
        if render.since is settled.desired and render.broken == settled.broken:
            return set(render.changed)  # carried over from it: what was rendered again
        return planning.changed_targets(
            settled.desired, settled.broken, render.desired, render.broken
        )

    def _full_plan(self, render: Render | None, only: set[Target] | None) -> Plan:
        assert self.retained is not None
        return planning.plan(
            only=only,
            desired=render.desired if render and render.head else None,
            broken=render.broken if render else frozenset(),
            removals_allowed=bool(render and render.removals_allowed),
            allow_empty=bool(render and render.allow_empty),
            current=self._current,
            retained=self.retained.entries,
            floors=self._floors,
            attempted=self._attempted,
            now=int(self._clock()),
            ttl=self._ttl(render),
        )

    # --- Reading the repository (in a worker thread) ------------------------------------

    def _read(self, fetch: bool) -> Render:
        repo = self.repository
        assert repo is not None
        if fetch:
            repo.refresh()
        if self._default_branch is None and (fetch or not repo.remote):
            # A mirror's HEAD means something only once it has been fetched.
            self._default_branch = repo.default_branch()
            log.info("default branch: %s", self._default_branch)
        default = self._default_branch
        heads = repo.heads()
        if default is None or default not in heads:
            if not self._warned_empty:
                log.warning("branch %s has no commits yet: nothing to publish", default)
                self._warned_empty = True
            return Render(default)
        self._warned_empty = False
        default_view = self._view(default, heads[default])
        views: dict[str, View | None] = {}
        for branch in rendering.branches_needed(default_view.snapshot, default):
            views[branch] = self._view(branch, heads[branch]) if branch in heads else None
        rules = self._protection.branch(default_view.snapshot.settings, default)
        protected = self._view(rules, heads[rules]) if rules in heads else None
        if rules is not None and protected is None:
            log.error("the protected branch %r (rings, gates, operators) does not exist", rules)
        key = (
            *((b, v.commit.id if v else None) for b, v in views.items()),
            (rules, protected.commit.id if protected else None),
        )
        if key != self._render_key or self._render is None:
            rendered = rendering.render(default, views, self._render)
            self._render = protection.apply(rendered, protected)
            self._render_key = key
        return self._render

    def _view(self, branch: str, commit_id: str) -> View:
        cached = self._snapshots.get(commit_id)
        if cached is not None and cached.branch == branch:
            self._snapshots.move_to_end(commit_id)
            return cached
        assert self.repository is not None
        # Work proportional to what changed: from the branch's previous view and the tree
        # diff when only group or device files moved (fleet.update), else read whole.
        before = self._loaded.get(branch)
        since = (before.commit, before.snapshot) if before is not None else None
        info, snapshot = self.repository.load(commit_id, memo=self._memo, since=since)
        view = View(branch, info, snapshot)
        self._loaded[branch] = view
        self._snapshots[commit_id] = view
        while len(self._snapshots) > 16:
            self._snapshots.popitem(last=False)
        return view

    # --- Carrying out a plan -----------------------------------------------------------------

    async def _execute(self, plan: Plan, render: Render | None) -> None:
        done: list[Publication] = []
        try:
            for action in plan.actions:
                if isinstance(action, Adopt):
                    self._adopt(action, done)
            publishes = [a for a in plan.actions if isinstance(a, Publish)]
            changes = {
                a.target: Intent(a.bundle.version, a.bundle.content_digest(), a.author, a.branch)
                for a in publishes
                if a.reason == "change"
            }
            if changes:
                self._intents.update(changes)
                await asyncio.to_thread(self._state.intend, dict(self._intents))
            clears = [a for a in plan.actions if isinstance(a, Clear)]
            semaphore = asyncio.Semaphore(PUBLISH_CONCURRENCY)
            for batch in (
                [a for a in publishes if a.target.kind == "group"],
                [a for a in publishes if a.target.kind == "device"],
            ):
                await self._concurrently([self._publish(a, semaphore, done) for a in batch])
            for kind in ("device", "group"):
                await self._concurrently(
                    [
                        self._clear(a, render, semaphore, done)
                        for a in clears
                        if a.target.kind == kind
                    ]
                )
        finally:
            if done:
                await asyncio.to_thread(self._persist, done)
                self._intents.clear()  # saving recorded them (or they are moot)
                if self.drift is not None:
                    self.drift.published(done, self._current)
        await self._emit_events(done, render)

    async def _concurrently(self, coros: list[Any]) -> None:
        if not coros:
            return
        try:
            async with asyncio.TaskGroup() as tg:
                for coro in coros:
                    tg.create_task(coro)
        except* BrokerUnavailable as group:
            raise group.exceptions[0] from None

    def _adopt(self, action: Adopt, done: list[Publication]) -> None:
        bundle = action.bundle
        intent = self._intents.pop(action.target, None)
        # Our own publication, acknowledged by the broker but not recorded before this
        # controller stopped (killed between PUBACK and saving): announced as published now.
        ours = (
            intent is not None
            and intent.version == bundle.version
            and intent.content_digest == bundle.content_digest()
        )
        author, branch = (
            (intent.author, intent.branch)
            if intent and ours
            else (
                action.author,
                action.branch,
            )
        )
        self._changes += 1
        self._current[action.target] = Current(bundle, author, branch, self._clock())
        self._refreshing(action.target, bundle)
        self._floors[action.target] = max(self._floors.get(action.target, 0), bundle.version)
        if ours:
            log.info(
                "published %s v%d (change, recorded after a restart) from %s@%s",
                action.target,
                bundle.version,
                branch or "?",
                bundle.commit[:12],
            )
        else:
            log.info(
                "adopted %s v%d from the broker (no publication needed)",
                action.target,
                bundle.version,
            )
        done.append(
            self._publication(
                action.target,
                "change" if ours else "adopted",
                bundle,
                action.digest or None,
                author,
                branch,
            )
        )

    async def _publish(
        self, action: Publish, semaphore: asyncio.Semaphore, done: list[Publication]
    ) -> None:
        assert self.retained is not None
        target, bundle = action.target, action.bundle
        signed = self.executor.sign(bundle)
        self._changes += 1
        if action.reason == "change":
            self._attempted[target] = bundle
        mark = self.retained.mark(target)
        async with semaphore:
            took = await self.executor.publish(
                target.topic(self.topics), signed.envelope, retain=True
            )
        self._attempted.pop(target, None)
        before = self._current.get(target)
        # A restore or refresh re-signs the same version: it was published when it changed.
        since = (
            before.published_at
            if before is not None and before.version == bundle.version and before.published_at
            else self._clock()
        )
        self._current[target] = Current(bundle, action.author, action.branch, since)
        self._refreshing(target, bundle)
        self._floors[target] = max(self._floors.get(target, 0), bundle.version)
        self.retained.note(target, Retained(bundle, signed.digest, envelope=signed.envelope), mark)
        log.info(
            "published %s v%d (%s) from %s@%s%s",
            target,
            bundle.version,
            action.reason,
            action.branch or "?",
            bundle.commit[:12],
            f" by {action.author}" if action.author else "",
        )
        self._acked(target, bundle.version, took)
        done.append(
            self._publication(
                target, action.reason, bundle, signed.digest, action.author, action.branch
            )
        )

    async def _clear(
        self,
        action: Clear,
        render: Render | None,
        semaphore: asyncio.Semaphore,
        done: list[Publication],
    ) -> None:
        assert self.retained is not None
        target = action.target
        mark = self.retained.mark(target)
        async with semaphore:
            took = await self.executor.clear(target.topic(self.topics))
        self._changes += 1
        self._current.pop(target, None)
        self.retained.note(target, None, mark)
        self._acked(target, None, took)
        head = render.head if render else None
        last = action.last
        log.info(
            "removed %s (was v%s): cleared its retained bundle",
            target,
            last.version if last else "?",
        )
        done.append(
            Publication(
                time=self._clock(),
                target=target,
                reason="removed",
                bundle=None,
                digest=None,
                author=head.author if head else "",
                branch=render.default_branch if render else None,
                version=last.version if last else None,
                commit=head.id if head else None,
            )
        )

    def _publication(
        self,
        target: Target,
        reason: Reason,
        bundle: Bundle,
        digest: str | None,
        author: str,
        branch: str | None,
    ) -> Publication:
        return Publication(
            time=self._clock(),
            target=target,
            reason=reason,
            bundle=bundle,
            digest=digest,
            author=author,
            branch=branch,
            version=bundle.version,
            commit=bundle.commit,
        )

    def _persist(self, done: Sequence[Publication]) -> None:
        self._state.save(self._current, self._floors, {p.target for p in done})
        self.executor.audit_now(
            [
                Entry(
                    time=p.time,
                    target=str(p.target),
                    kind=p.target.kind,
                    id=p.target.id,
                    version=p.version,
                    commit=p.commit,
                    author=p.author,
                    digest=p.digest,
                    reason=p.reason,
                    branch=p.branch,
                    content_digest=p.bundle.content_digest() if p.bundle else None,
                )
                for p in done
            ]
        )

    # --- Events --------------------------------------------------------------------------------

    async def _event(self, event_type: str, **fields: Any) -> None:
        await self.executor.event(event_type, **fields)

    async def _emit_events(self, done: Sequence[Publication], render: Render | None) -> None:
        coros = []
        for p in done:
            if p.reason == "adopted":
                continue
            common = dict(
                target=p.target.id,
                kind=p.target.kind,
                version=p.version,
                commit=p.commit,
                author=p.author,
                branch=p.branch,
                topic=p.target.topic(self.topics),
            )
            if p.reason == "removed":
                coros.append(self._event("removed", **common))
            else:
                coros.append(self._event("published", reason=p.reason, digest=p.digest, **common))
        await self._concurrently(coros)

    async def _report_problems(self, render: Render) -> None:
        by_branch: dict[str, list[BranchProblem]] = {}
        for problem in render.problems:
            by_branch.setdefault(problem.branch, []).append(problem)
        for branch, commit in list(self._reported.items()):
            if render.commits.get(branch) != commit and branch not in by_branch:
                log.info("branch %s validates again", branch)
                del self._reported[branch]
        for branch, problems in by_branch.items():
            commit = problems[0].commit
            if self._reported.get(branch) == commit:
                continue
            for p in problems:
                log.error(
                    "repository error on %s@%s (%s): %s",
                    branch,
                    commit[:12],
                    p.author,
                    p.problem.located(),
                )
            await self._concurrently(
                [
                    self._event(
                        "repository-error",
                        commit=p.commit,
                        branch=p.branch,
                        author=p.author,
                        file=p.problem.file,
                        line=p.problem.line,
                        message=p.problem.message,
                    )
                    for p in problems
                ]
            )
            self._reported[branch] = commit

    def repository_status(self) -> RepositoryStatus | None:
        """Each branch's head and the controller's verdict on it, as last published."""
        return self._verdicts

    async def _publish_verdicts(self, render: Render, refusal: str | None) -> None:
        """Retain each branch's verdict on ``<prefix>/repository/status``, when it changed,
        so a refused commit is visible to anyone who looks, not only in this log."""
        verdicts = rendering.repository_status(render, refusal, self._clock(), self._verdicts)
        payload = verdicts.to_json()
        if payload == self._verdicts_published:
            return
        await self.executor.publish(self.topics.repository_status(), payload, retain=True)
        self._verdicts, self._verdicts_published = verdicts, payload

    async def _report_refusal(self, render: Render | None, message: str) -> None:
        head = render.head if render else None
        key = head.id if head else ""
        if self._refusal_reported == key:
            return
        log.error("refused %s: %s", key[:12], message)
        await self._event(
            "repository-error",
            commit=head.id if head else None,
            branch=render.default_branch if render else None,
            author=head.author if head else "",
            file="fleet.yaml",
            message=message,
        )
        self._refusal_reported = key


def identity(config: ControllerConfig) -> FleetIdentity:
    """The fleet this controller serves: its state directory belongs to it alone."""
    repo = config.repo
    if is_remote(repo):
        return FleetIdentity(redact(repo), config.broker.url(), config.prefix)
    path = Path(repo).expanduser().resolve()
    if path.name == ".git":
        path = path.parent  # a work tree and its .git are one repository
    return FleetIdentity(str(path), config.broker.url(), config.prefix)


def describe(config: ControllerConfig) -> str:
    broker = config.broker.described
    return f"repository {redact(config.repo)}, broker {broker}, prefix {config.prefix}"


def _stamped(plan: Plan, render: Render | None) -> Plan:
    """``plan`` with each new publication (and adoption) named after the head commit of its
    branch and that commit's author. A render keeps an unchanged target's bundle as it was
    rendered, from the commit that last changed it (the commit is not content: SPEC 4.2);
    what a commit does cause to be published (a rollout's pin moving a device's
    ``group_version``, a gate opening) names the commit it is published at."""
    if render is None or not render.heads or not plan.actions:
        return plan
    actions: list[Action] = []
    for action in plan.actions:
        branch = None if isinstance(action, Clear) else action.branch
        head = render.heads.get(branch) if branch is not None else None
        if isinstance(action, Publish) and action.reason == "change" and head is not None:
            if action.bundle.commit != head.id or action.author != head.author:
                bundle = action.bundle.with_commit(head.id)
                action = dataclasses.replace(action, bundle=bundle, author=head.author)
        elif (
            isinstance(action, Adopt)
            and head is not None
            and action.author not in ("", head.author)
        ):
            action = dataclasses.replace(action, author=head.author)
        actions.append(action)
    return dataclasses.replace(plan, actions=tuple(actions))
