"""The agent: owns the shim's I/O and runs its level-triggered loop.

One thread (the caller's, in :meth:`Agent.run`) does all the work; the MQTT link runs in a
thread of its own and only queues messages and wakes the loop. Each pass of the loop:

1. recovers an apply left half-done (a journal on disk), if a previous rollback failed;
2. evaluates what arrived: every bundle goes through ``TrustState.evaluate`` (signature,
   pinned payloadType, target, version floor, expiry); accepted ones become *candidates*
   (the highest version per target), refused ones are reported and change nothing;
   reconcile commands are verified, bound to this device, unexpired and strictly newer;
3. decides the target: the newest acceptable device bundle, and the bundle of the group
   it names (subscribing to that group's topic, and leaving the old one, as needed);
4. if the target differs from what is applied and the retry gate allows, plans and applies
   it (all or nothing), then records it in trust state and saves state atomically;
5. observes the device: the resources the watcher saw change (inotify, debounced), or all
   of them when the observe interval is due (the safety net; the only way where inotify is
   unavailable) or a command asked: drift is reported, and in ``enforce`` mode put back;
6. publishes the report if anything changed, or the heartbeat is due.

Nothing in a pass depends on which message woke it: the loop re-reads what it has (the
retained bundles it received, the real files) and acts until nothing is left to do, so a
lost, repeated or reordered message changes nothing. Without a broker the loop still
observes and heals from the bundles saved in the state directory.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from setpoint.proto import bundles, codec, commands, envelopes, reports
from setpoint.proto.bundles import Bundle, BundleKind, Resource, SettingResource
from setpoint.proto.errors import (
    ExpiredError,
    InvalidId,
    PayloadTooLarge,
    ProtocolError,
    RollbackError,
    SealedError,
    WrongTargetError,
    refusal_reason,
)
from setpoint.proto.reports import Applied, Failure, Refusal, Report
from setpoint.proto.topics import Topics
from setpoint.proto.trust import TrustState, Verdict

from . import applying, planning
from .applying import ApplyContext, RootFS
from .backoff import Backoff, RetryGate
from .config import SETTINGS_FILE, ShimConfig
from .errors import ApplyError, PermanentApplyError, StateError
from .healing import Heals
from .link import Link
from .observing import Observer
from .planning import Blocked, Observed, Step, Wait
from .reporting import SHIM_VERSION, Reporter, resource_reports
from .restating import Restater
from .running import CommandRunner
from .state import ShimState, StateStore
from .unsealing import Unsealer
from .watching import Change, Debounce, Watcher, WatchUnavailable

log = logging.getLogger("setpoint.shim")

MAX_COMMAND_ENVELOPE: Final = 2 * commands.MAX_COMMAND_BYTES
MAX_REFUSALS: Final = reports.MAX_REFUSALS
_PER_TOPIC: Final = 4

EventHook = Callable[[str, Mapping[str, Any]], None]


def describe(step: Step) -> str:
    """A step for the log; never a setting's value."""
    kind = type(step).__name__
    where = getattr(step, "path", None) or getattr(step, "key", None) or ""
    rid = getattr(step, "resource_id", None)
    head = f"{kind} {rid}" if rid else kind
    return f"{head} {where} ({step.why})".replace("  ", " ")


@dataclass(frozen=True, slots=True)
class Held:
    """A verified bundle the agent holds: a candidate, or one it applied."""

    raw: bytes
    bundle: Bundle
    digest: str
    verdict: Verdict | None = None  # set while it is a candidate not yet applied


@dataclass(frozen=True, slots=True)
class Target:
    group: Held
    device: Held

    @property
    def key(self) -> str:
        return target_key(self.group, self.device)

    def label(self) -> str:
        g, d = self.group.bundle, self.device.bundle
        return f"group {g.target} v{g.version} + device {d.target} v{d.version}"


def target_key(group: Held | None, device: Held | None) -> str:
    def part(h: Held | None) -> str:
        return "-" if h is None else f"{h.bundle.target}:{h.bundle.version}:{h.digest}"

    return f"g={part(group)}|d={part(device)}"


def _peek(payload: bytes | None) -> dict[str, Any] | None:
    """The *unverified* payload map, for naming a refused message in the report only."""
    if payload is None:
        return None
    try:
        inner = codec.unpack(envelopes.decode(payload).payload, max_size=len(payload))
    except ProtocolError:
        return None
    return inner if isinstance(inner, dict) else None


def _load_held(raw: bytes | None, kind: BundleKind) -> Held | None:
    """A bundle from the state directory (verified before it was saved)."""
    if raw is None:
        return None
    try:
        bundle = bundles.decode(envelopes.decode(raw).payload)
    except ProtocolError as exc:
        raise StateError(f"the saved {kind} bundle is unreadable: {exc}") from exc
    if bundle.kind != kind:
        raise StateError(f"the saved {kind} bundle is a {bundle.kind} bundle")
    return Held(raw, bundle, bundle.content_digest())


class Agent:
    """The device shim. ``run()`` blocks until ``stop()``; see the module docstring."""

    def __init__(
        self,
        config: ShimConfig,
        *,
        clock: Callable[[], float] = time.time,
        on_event: EventHook | None = None,
    ) -> None:
        self.config = config
        self._trusted: dict[str, Ed25519PublicKey] = config.check()
        self._clock = clock
        self._on_event = on_event
        self.topics = Topics(config.prefix)
        self.device = config.device
        self._root = os.path.realpath(config.root)
        self.store = StateStore(config.state_path)
        self._runner = CommandRunner(
            config.root,
            {
                "SETPOINT_DEVICE": config.device,
                "SETPOINT_ROOT": self._root,
                "SETPOINT_SETTINGS": os.path.join(self._root, SETTINGS_FILE),
            },
        )
        self._unsealer = Unsealer(config.state_path)
        self.observer = Observer(
            config.root,
            config.state_path,
            policy=config.policy,
            runner=self._runner,
            clock=clock,
            unsealer=self._unsealer,
        )
        self._fs = RootFS(self._root)
        self._retry = Backoff(config.retry_base, config.retry_cap)
        self._cond = threading.Condition()
        self._inbox: dict[str, collections.deque[bytes | None]] = {}
        self._wake = False
        self._stopping = threading.Event()
        self._connection_changed = False
        self._candidates: dict[tuple[str, str], Held] = {}
        self._refusals: list[Refusal] = []
        self._refusal_keys: list[tuple[Any, ...]] = []
        self._heals = Heals()
        self._heal_failed: dict[str, str] = {}
        self._heal_gate: RetryGate | None = None
        self._statuses: tuple[reports.ResourceReport, ...] = ()
        self._force_observe = True
        self._force_check = True
        self.passes = 0
        self._last_observe = float("-inf")
        self._last_check = float("-inf")
        self._report_retry: float | None = None
        self._restater = Restater()
        self._waiting: str | None = None
        self._wanted_group: str | None = None
        self._subscriptions: frozenset[str] = frozenset()
        self._desired_cache: tuple[str, list[Resource]] | None = None
        self._observed: tuple[str, Observed] | None = None  # the last look, for its target
        self._debounce = Debounce()  # guarded by self._cond (the watcher thread adds to it)
        self._watch_failed: str | None = None  # set by the watcher thread
        self._watcher: Watcher | None = None
        self._watching: str | None = None  # the applied target the watches are for
        self.observe_method = "poll"  # "inotify" once the watcher runs
        self.state: ShimState = ShimState(TrustState(config.device))
        self.applied_group: Held | None = None
        self.applied_device: Held | None = None
        self.reporter: Reporter | None = None
        self.link: Link | None = None
        if config.broker is not None:
            self.link = Link(
                config.broker,
                client_id=config.mqtt_client_id,
                presence_topic=self.topics.device_presence(config.device),
                watch=(
                    self.topics.device_presence(config.device),
                    self.topics.device_reported(config.device),
                ),
                on_message=self._on_message,
                on_connection=self._on_connection,
                keepalive=config.keepalive,
                backoff=Backoff(config.reconnect_min, config.reconnect_max),
                max_queued=config.max_queued,
                mqtt311=config.mqtt_version == "3.1.1",
                connect_timeout=config.connect_timeout,
            )

    # Life cycle.

    def run(self) -> None:
        """Start, loop until :meth:`stop`, then shut down cleanly (``offline`` presence)."""
        self.start()
        try:
            while not self._stopping.is_set():
                self.run_once()
                self._sleep()
        finally:
            self.close()

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler or another thread)."""
        self._stopping.set()
        self._runner.stop()
        with self._cond:
            self._wake = True
            self._cond.notify_all()

    def start(self) -> None:
        self.store.open()
        try:
            state = self.store.load(self.device)
            keyids = frozenset(self._trusted)
            if self.config.reset_floors or (
                state.trusted_keyids and not state.trusted_keyids & keyids
            ):
                # Every key that signed the old floors is gone: the floors can only protect
                # against bundles no trusted key will ever sign again (TUF resets them the
                # same way when the root keys rotate).
                log.warning("trust anchors replaced: version floors reset")
                # The reconcile-command floor too: a stolen key may have pushed it to 2^63-1.
                state = replace(state, trust=state.trust.reset_floors(), command_seq=0)
            state = replace(state, trusted_keyids=keyids)
            self.applied_group = _load_held(state.applied_group, "group")
            self.applied_device = _load_held(state.applied_device, "device")
            self._check_floors(state)
            self.state = state
            note = applying.recover(self.store, self._fs, self._journal_committed)
            if note:
                log.warning("%s", note)
                self._event("recovered", {"note": note})
            self.state, first = self.store.reserve_report_seq(
                self.state, floor=int(self._clock() * 1000)
            )
        except BaseException:
            self.store.close()
            raise
        self.reporter = Reporter(
            heartbeat=self.config.heartbeat,
            first_seq=first,
            seq_limit=self.state.report_seq,
            reserve=self._reserve_seq,
        )
        if self.applied_device is not None and self.applied_device.bundle.group:
            self._wanted_group = self.applied_device.bundle.group
        self._follow()
        log.info(
            "shim %s for device %s: root %s, state %s, %s",
            SHIM_VERSION,
            self.device,
            self._root,
            self.store.dir,
            self.config.broker.described if self.config.broker else "no broker",
        )
        self._start_watching()
        if self.link is not None:
            self.link.start()

    def close(self) -> None:
        if self.link is not None:
            self.link.stop()
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self.store.close()
        log.info("shim stopped")

    def _check_floors(self, state: ShimState) -> None:
        for held in (self.applied_group, self.applied_device):
            if held is None:
                continue
            floor = state.trust.floor(held.bundle.kind, held.bundle.target)
            if floor is not None and (
                floor.version != held.bundle.version or floor.digest != held.digest
            ):
                raise StateError(
                    f"{self.store.state_path}: the saved {held.bundle.kind} bundle does not"
                    " match the trust state; move the file aside to start afresh"
                )

    def _reserve_seq(self) -> int:
        self.state, _first = self.store.reserve_report_seq(self.state)
        return self.state.report_seq

    def _journal_committed(self, journal: Mapping[str, Any]) -> bool:
        return journal.get("kind") == "apply" and journal.get("target") == self.applied_key

    @property
    def applied_key(self) -> str:
        return target_key(self.applied_group, self.applied_device)

    @property
    def mode(self) -> str:
        return self.applied_group.bundle.mode if self.applied_group is not None else "enforce"

    def _event(self, name: str, data: Mapping[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(name, data)

    # Wake-ups (link thread -> agent thread).

    def _on_message(self, topic: str, payload: bytes) -> None:
        item = payload if len(payload) <= envelopes.MAX_ENVELOPE_BYTES else None
        with self._cond:
            queue = self._inbox.get(topic)
            if queue is None:
                queue = self._inbox[topic] = collections.deque(maxlen=_PER_TOPIC)
            queue.append(item)
            self._wake = True
            self._cond.notify_all()

    def _on_connection(self, up: bool) -> None:
        with self._cond:
            self._connection_changed = True
            self._wake = True
            self._cond.notify_all()

    def _on_watch(self, change: Change) -> None:
        with self._cond:
            settling = self._debounce.due() is not None  # the loop already waits for it
            if change.failed is not None:
                self._watch_failed = change.failed
            self._debounce.add(change, time.monotonic())
            if not settling or change.failed is not None:
                self._wake = True
                self._cond.notify_all()

    def _sleep(self) -> None:
        now = time.monotonic()
        deadlines = [self._last_observe + self.config.observe_interval]
        with self._cond:
            if (settled := self._debounce.due()) is not None:
                deadlines.append(settled)
        if self.reporter is not None and (due := self.reporter.next_due()) is not None:
            deadlines.append(due)
        if self._report_retry is not None:
            deadlines.append(self._report_retry)
        if (restate := self._restater.next_at()) is not None:
            deadlines.append(restate)
        gate = self.state.gate
        wall = self._clock()
        if gate is not None and (at := gate.due()) is not None and at > wall:
            # Only a retry still ahead: one already due was acted on (or is moot) this pass.
            # Heals wait for the next observe pass instead, so nothing here can spin.
            deadlines.append(now + (at - wall) + 0.01)
        timeout = max(0.0, min(deadlines) - now)
        with self._cond:
            if not self._wake and not self._stopping.is_set():
                self._cond.wait(min(timeout, 3600.0))
            self._wake = False

    # One pass.

    def run_once(self) -> None:
        """One level-triggered pass (see the module docstring)."""
        self.passes += 1
        now = self._clock()
        if self.store.journal_path.exists():
            try:
                note = applying.recover(self.store, self._fs, self._journal_committed)
            except StateError as exc:
                log.error("%s; retrying later", exc)
                return
            if note:
                log.warning("%s", note)
        with self._cond:
            arrived = self._inbox
            self._inbox = {}
            if self._connection_changed:
                self._connection_changed = False
                if self.reporter is not None:
                    self.reporter.forget()  # a new connection: say where we are again
                self._restater.forget()
        for topic, items in arrived.items():
            for payload in items:
                self._receive(topic, payload, now)
        target = self._target(now)
        self._follow()
        if isinstance(target, Target) and target.key != self.applied_key:
            gate = self.state.gate
            if gate is None or gate.allows(target.key, now, self.config.retry_cap):
                self._set_waiting(None)
                self._apply(target, now)
            elif gate.permanent:
                self._set_waiting(f"{target.label()} failed permanently; waiting for a new version")
            else:
                self._set_waiting(f"{target.label()} failed; retrying in {gate.next_at - now:.0f}s")
        elif isinstance(target, Wait):
            self._set_waiting(target.why)
        else:
            self._set_waiting(None)
        self._update_watches()
        mono = time.monotonic()
        if self._force_observe or mono - self._last_observe >= self.config.observe_interval:
            check = self._force_check or (
                mono - self._last_check >= self.config.policy.command_check_interval
            )
            self._force_observe = self._force_check = False
            self._last_observe = mono
            if check:
                self._last_check = mono
            with self._cond:
                self._debounce.clear()  # this full look covers every change seen so far
            self._observe(now, check_commands=check)
        else:
            with self._cond:
                change = self._debounce.take(mono)
            if change is not None:
                self._observe(now, check_commands=False, change=change)
        self._restate()
        self._report(now)

    # Watching (inotify), with polling as the safety net.

    def _start_watching(self) -> None:
        if not self.config.watch:
            self._poll_instead("--no-watch was given")
            return
        watcher = Watcher(self._root, self._on_watch, max_watches=self.config.max_watches)
        try:
            watcher.start()
        except WatchUnavailable as exc:
            self._poll_instead(str(exc))
            return
        self._watcher = watcher
        self.observe_method = "inotify"
        log.info(
            "observing with inotify; a full look every %gs as a safety net",
            self.config.observe_interval,
        )

    def _poll_instead(self, why: str) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self.observe_method = "poll"
        self._force_observe = True
        log.warning(
            "observing by polling every %gs (--observe-interval): %s",
            self.config.observe_interval,
            why,
        )
        self._event("observe-method", {"method": "poll", "why": why})

    def _update_watches(self) -> None:
        """Watch what the applied bundles manage: their files and the settings file."""
        with self._cond:
            failed, self._watch_failed = self._watch_failed, None
        if failed is not None and self._watcher is not None:
            self._poll_instead(failed)
        if self._watcher is None:
            return
        key = self.applied_key
        if self._watching == key:
            return
        desired = self._desired()
        paths = {r.path for r in desired if isinstance(r, bundles.FileResource)}
        if self.state.managed_settings or any(isinstance(r, SettingResource) for r in desired):
            paths.add(SETTINGS_FILE)
        try:
            self._watcher.watch(paths)
        except WatchUnavailable as exc:
            self._poll_instead(str(exc))
            return
        self._watching = key

    def _set_waiting(self, why: str | None) -> None:
        if why != self._waiting:
            self._waiting = why
            if why:
                log.info("waiting: %s", why)
                self._event("waiting", {"why": why})

    # Receiving.

    def _trust_for(self, kind: BundleKind, name: str) -> TrustState:
        trust = self.state.trust
        return replace(trust, group=name) if kind == "group" else trust

    def _receive(self, topic: str, payload: bytes | None, now: float) -> None:
        try:
            ref = self.topics.parse(topic)
        except InvalidId:
            log.debug("ignoring message on %s", topic)
            return
        if ref.kind in ("device-presence", "device-reported"):
            if ref.name == self.device and payload:
                self._saw_own(ref.kind, payload)
            return
        if payload is not None and len(payload) == 0:
            log.info("retained message on %s cleared; keeping what is applied", topic)
            return
        if ref.kind == "device-desired" and ref.name == self.device:
            self._receive_bundle("device", ref.name, payload, now)
        elif ref.kind == "group-desired":
            if ref.name == self._wanted_group:
                self._receive_bundle("group", ref.name, payload, now)
            else:
                log.debug("ignoring a bundle of group %s (not this device's group)", ref.name)
        elif ref.kind == "device-command" and ref.name == self.device:
            self._receive_command(payload, now)

    def _evaluate(self, kind: BundleKind, name: str, payload: bytes | None, now: float) -> Verdict:
        if payload is None:
            raise PayloadTooLarge(
                f"over the {envelopes.MAX_ENVELOPE_BYTES}-byte limit; dropped unread"
            )
        return self._trust_for(kind, name).evaluate(
            kind,
            payload,
            trusted=self._trusted,
            now=now,
            threshold=self.config.threshold,
            skew=self.config.skew,
        )

    def _receive_bundle(
        self, kind: BundleKind, name: str, payload: bytes | None, now: float
    ) -> None:
        try:
            verdict = self._evaluate(kind, name, payload, now)
        except ProtocolError as exc:
            self._refuse(kind, name, payload, exc, now)
            return
        assert payload is not None
        key = (kind, name)
        held = self._candidates.get(key)
        bundle = verdict.bundle
        if (
            held is not None
            and held.bundle.version == bundle.version
            and held.digest != verdict.digest
        ):
            self._refuse(
                kind,
                name,
                payload,
                RollbackError(
                    f"{kind} bundle {name!r} v{bundle.version} has other content than the"
                    " bundle of the same version received before"
                ),
                now,
            )
            return
        if held is None or bundle.version >= held.bundle.version:
            self._candidates[key] = Held(payload, bundle, verdict.digest, verdict)

    def _receive_command(self, payload: bytes | None, now: float) -> None:
        try:
            if payload is None or len(payload) > MAX_COMMAND_ENVELOPE:
                raise PayloadTooLarge(f"command over the {MAX_COMMAND_ENVELOPE}-byte limit")
            data = envelopes.verify(
                payload,
                self._trusted,
                payload_type=envelopes.COMMAND_TYPE,
                threshold=self.config.threshold,
                max_size=MAX_COMMAND_ENVELOPE,
            )
            command = commands.decode(data)
            if command.device != self.device:
                raise WrongTargetError(f"command for {command.device!r}, not {self.device!r}")
            if now > command.expires_at + self.config.skew:
                raise ExpiredError(f"command seq {command.seq} expired at {command.expires_at}")
            if command.seq <= self.state.command_seq:
                raise RollbackError(
                    f"command seq {command.seq} replayed (last seen {self.state.command_seq})"
                )
        except ProtocolError as exc:
            self._refuse("command", self.device, payload, exc, now)
            return
        self.state = replace(self.state, command_seq=command.seq)
        self.store.save(self.state)
        self._force_observe = self._force_check = True
        self._heal_gate = None  # an operator asked: try now
        log.info("reconcile command seq %d accepted (%s)", command.seq, command.reason or "-")
        self._event("command", {"seq": command.seq})

    def _refuse(
        self, kind: str, name: str, payload: bytes | None, exc: Exception, now: float
    ) -> None:
        peek = _peek(payload) or {}
        if kind == "command":
            target, version = peek.get("device", name), peek.get("seq", 0)
        else:
            target, version = peek.get("target", name), peek.get("version", 0)
        if not isinstance(target, str) or len(target) > 64:
            target = name
        if not isinstance(version, int) or isinstance(version, bool):
            version = 0
        reason = refusal_reason(exc)
        fingerprint = (
            kind,
            target,
            version,
            reason,
            hashlib.sha256(payload or b"").hexdigest()[:16],
        )
        if fingerprint in self._refusal_keys:
            return
        refusal = Refusal(target, kind, version, reason, str(exc)[: reports.MAX_DETAIL], int(now))
        self._refusals = [*self._refusals, refusal][-MAX_REFUSALS:]
        self._refusal_keys = [*self._refusal_keys, fingerprint][-MAX_REFUSALS:]
        log.warning("refused %s %s v%s (%s): %s", kind, target, version, reason, exc)
        self._event("refused", {"refusal": refusal})

    # Deciding.

    def _fresh(self, kind: BundleKind, name: str, applied: Held | None, now: float) -> Held | None:
        """The candidate for ``kind/name`` if it is still acceptable and not applied yet."""
        held = self._candidates.get((kind, name))
        if held is None:
            return None
        if applied is not None and (
            applied.bundle.target,
            applied.bundle.version,
            applied.digest,
        ) == (
            held.bundle.target,
            held.bundle.version,
            held.digest,
        ):
            del self._candidates[(kind, name)]
            return None
        try:
            verdict = self._evaluate(kind, name, held.raw, now)  # expiry and floors, again
        except ProtocolError as exc:
            del self._candidates[(kind, name)]
            self._refuse(kind, name, held.raw, exc, now)
            return None
        return Held(held.raw, verdict.bundle, verdict.digest, verdict)

    def _target(self, now: float) -> Target | Wait:
        device = self._fresh("device", self.device, self.applied_device, now) or self.applied_device
        if device is None:
            return Wait("no device bundle yet")
        group_name = device.bundle.group
        if group_name is None:  # pragma: no cover - device bundles always name a group
            return Wait("the device bundle names no group")
        self._wanted_group = group_name
        for key in [k for k in self._candidates if k[0] == "group" and k[1] != group_name]:
            del self._candidates[key]
        applied = self.applied_group
        if applied is not None and applied.bundle.target != group_name:
            applied = None
        group = self._fresh("group", group_name, applied, now)
        pin = device.bundle.group_version
        if (
            group is not None
            and applied is not None
            and pin is not None
            and group.bundle.version > pin
        ):
            # A batched rollout has not released this device yet: keep running the pinned
            # version; the newer bundle stays a candidate until the pin moves.
            group = None
        group = group or applied
        if group is None:
            return Wait(f"waiting for the bundle of group {group_name}")
        return Target(group, device)

    def _follow(self) -> None:
        topics = {self.topics.device_desired(self.device), self.topics.device_command(self.device)}
        if self._wanted_group is not None:
            topics.add(self.topics.group_desired(self._wanted_group))
        wanted = frozenset(topics)
        if wanted != self._subscriptions:
            self._subscriptions = wanted
            if self.link is not None:
                self.link.subscribe_to(wanted)
            if self._wanted_group is not None:
                log.info("following group %s", self._wanted_group)

    # Applying a new version.

    def _context(self, desired: list[Resource]) -> ApplyContext:
        secret = any(isinstance(r, SettingResource) and r.secret for r in desired)
        return ApplyContext(
            fs=self._fs,
            resolver=self.observer.resolver,
            policy=self.config.policy,
            runner=self._runner,
            settings_mode=0o600 if secret else 0o644,
            unsealer=self._unsealer,
        )

    def _refresh(
        self, previous: Observed, desired: list[Resource], changed: set[str] | frozenset[str]
    ) -> Observed:
        return self.observer.refresh(
            previous,
            desired,
            changed,
            managed_files=self.state.managed_files,
            managed_settings=self.state.managed_settings,
        )

    def _observe_for(self, desired: list[Resource], *, check_commands: bool) -> Observed:
        return self.observer.observe(
            desired,
            managed_files=self.state.managed_files,
            managed_settings=self.state.managed_settings,
            check_commands=check_commands,
        )

    def _apply(self, target: Target, now: float) -> None:
        label = target.label()
        desired = bundles.effective(target.group.bundle, target.device.bundle)
        observed = self._observe_for(desired, check_commands=True)
        steps = planning.plan(desired, observed, self.config.policy)
        log.info("applying %s: %d step(s)", label, len(planning.changes(steps)))
        for step in steps:
            log.debug("step: %s", describe(step))
        ctx = self._context(desired)
        meta = {"label": label, "target": target.key, "kind": "apply"}
        try:
            result = applying.apply(steps, ctx, self.store, meta)
        except SealedError as exc:
            self._sealed_refused(target, exc, desired, now)
            return
        except ApplyError as exc:
            self._failed(target, exc, desired, now)
            return
        except StateError as exc:
            log.error("%s", exc)
            return
        trust = self.state.trust
        if target.device.verdict is not None:
            trust = trust.record(target.device.verdict)
        if target.group.verdict is not None:
            trust = trust.record(target.group.verdict)
        new_state = replace(
            self.state,
            trust=trust,
            applied_group=target.group.raw,
            applied_device=target.device.raw,
            managed_files=planning.managed_files_after(result.done, self.state.managed_files),
            managed_dirs=self.state.managed_dirs | frozenset(result.created_dirs),
            managed_settings=frozenset(r.key for r in desired if isinstance(r, SettingResource)),
            gate=None,
        )
        try:
            self.store.save(new_state)
        except StateError as exc:
            # Applied but not recorded: undo, so disk and state agree; retried later.
            log.error("%s; undoing the apply", exc)
            try:
                applying.recover(self.store, self._fs, lambda _j: False)
            except StateError as again:
                log.error("%s", again)
            self._failed(target, ApplyError(str(exc)), desired, now)
            return
        self.store.clear_journal()
        self._record_sealed(desired, result.macs)
        self.state = new_state
        self.applied_group = dataclasses.replace(target.group, verdict=None)
        self.applied_device = dataclasses.replace(target.device, verdict=None)
        self._desired_cache = None
        self._heals.applied({r.id for r in desired})
        self._heal_failed.clear()
        self._heal_gate = None
        for resource in desired:
            fact = result.checked.get(resource.id)
            if fact is not None and isinstance(resource, bundles.CommandResource):
                self.observer.record_check(resource, fact)
        self._tidy_dirs(result.done)
        self._force_observe = True
        log.info("applied %s (commit %s)", label, target.group.bundle.commit[:12])
        self._event("applied", {"key": target.key, "label": label, "steps": result.done})

    def _sealed_refused(
        self, target: Target, exc: SealedError, desired: list[Resource], now: float
    ) -> None:
        """A sealed value this device cannot open: refuse the bundle that carries it.

        Nothing was touched (values are opened before anything changes). A new bundle is
        dropped and reported as refused (``not-a-recipient`` or ``sealed-invalid``), so the
        device keeps what it runs; an applied one (an identity lost since) fails for good.
        """
        owner = target.group
        if any(r.id == exc.resource_id for r in target.device.bundle.resources):
            owner = target.device
        if owner.verdict is None:
            error = PermanentApplyError(str(exc), resource_id=exc.resource_id)
            self._failed(target, error, desired, now)
            return
        self._candidates.pop((owner.bundle.kind, owner.bundle.target), None)
        self._refuse(owner.bundle.kind, owner.bundle.target, owner.raw, exc, now)

    def _record_sealed(self, desired: list[Resource], macs: Mapping[str, str]) -> None:
        """Keep the keyed MACs of what was unsealed, for the sealed values still desired."""
        keep = {v.digest() for r in desired if (v := getattr(r, "sealed", None)) is not None}
        if not macs and not keep:
            return
        try:
            self._unsealer.record(macs, keep)
        except OSError as exc:
            log.error("cannot save %s: %s (the next pass unseals again)", "sealed.json", exc)

    def _failed(self, target: Target, exc: ApplyError, desired: list[Resource], now: float) -> None:
        if self._stopping.is_set():
            log.info("apply of %s interrupted by shutdown; rolled back", target.label())
            return
        owner = target.group
        if exc.resource_id is not None and any(
            r.id == exc.resource_id for r in target.device.bundle.resources
        ):
            owner = target.device
        if owner.verdict is None:  # the owner did not change: blame the bundle that did
            owner = target.device if target.device.verdict is not None else target.group
        gate = RetryGate.after_failure(
            self.state.gate,
            key=target.key,
            permanent=exc.permanent,
            now=now,
            backoff=self._retry,
            target=owner.bundle.target,
            kind=owner.bundle.kind,
            version=owner.bundle.version,
            error=(f"{exc.resource_id}: {exc}" if exc.resource_id else str(exc)),
            resource=exc.resource_id,
        )
        self.state = replace(self.state, gate=gate)
        try:
            self.store.save(self.state)
        except StateError as err:
            log.error("%s", err)
        kind = "permanently" if exc.permanent else f"(attempt {gate.attempts})"
        log.error(
            "apply of %s failed %s: %s; everything it changed was put back",
            target.label(),
            kind,
            gate.error,
        )
        self._event("apply-failed", {"key": target.key, "gate": gate})

    def _tidy_dirs(self, done: tuple[Step, ...]) -> None:
        """Remove directories the shim created that deletions left empty."""
        removed: set[str] = set()
        for step in done:
            if not isinstance(step, planning.DeleteManaged):
                continue
            parent = os.path.dirname(step.path)
            while parent and parent in self.state.managed_dirs and self._fs.rmdir(parent):
                removed.add(parent)
                parent = os.path.dirname(parent)
        if removed:
            self.state = replace(self.state, managed_dirs=self.state.managed_dirs - removed)
            try:
                self.store.save(self.state)
            except StateError as exc:
                log.error("%s", exc)

    # Observing, and healing in enforce mode.

    def _desired(self) -> list[Resource]:
        key = self.applied_key
        if self._desired_cache is None or self._desired_cache[0] != key:
            group = self.applied_group.bundle if self.applied_group else None
            device = self.applied_device.bundle if self.applied_device else None
            resources = bundles.effective(group, device) if device and group else []
            self._desired_cache = (key, resources)
        return self._desired_cache[1]

    def _observe(self, now: float, *, check_commands: bool, change: Change | None = None) -> None:
        desired = self._desired()
        if not desired and not self.state.managed_files:
            self._statuses = ()
            return
        previous = self._observed
        if (
            change is not None
            and not change.everything
            and previous is not None
            and previous[0] == self.applied_key
        ):
            observed = self._refresh(previous[1], desired, change.paths)
            looked_at: list[str] | None = sorted(change.paths)
        else:
            observed = self._observe_for(desired, check_commands=check_commands)
            looked_at = None  # everything
        self._observed = (self.applied_key, observed)
        steps = planning.plan(desired, observed, self.config.policy)
        drift = planning.changes(steps)
        drifted = {rid for s in drift if (rid := getattr(s, "resource_id", None))}
        for rid in drifted:
            self._heals.drifted(rid)  # drifted again: no longer "healed"
        self._statuses = self._assess(desired, observed, steps)
        self._event("observed", {"drift": len(drift), "paths": looked_at})
        if drift:
            log.info(
                "drift (%s mode): %s",
                self.mode,
                "; ".join(describe(s) for s in drift),
            )
            self._event("drift", {"steps": drift, "mode": self.mode})
        if drift and self.mode == "enforce":
            self._report(now)  # the drift is seen before it is healed
            if self._heal(desired, steps, drift, now):
                touched = {
                    r.path
                    for r in desired
                    if isinstance(r, bundles.FileResource) and r.id in drifted
                }
                if any(isinstance(s, planning.SetSetting | planning.RemoveSetting) for s in drift):
                    touched.add(SETTINGS_FILE)
                observed = self._refresh(observed, desired, touched)
                self._observed = (self.applied_key, observed)
                steps = planning.plan(desired, observed, self.config.policy)
                self._statuses = self._assess(desired, observed, steps)

    def _assess(
        self, desired: list[Resource], observed: Observed, steps: list[Step]
    ) -> tuple[reports.ResourceReport, ...]:
        live = {getattr(s, "resource_id", None) for s in steps}
        failed = {rid: d for rid, d in self._heal_failed.items() if rid in live}
        return resource_reports(desired, observed, steps, healed=self._heals.details, failed=failed)

    def _heal(
        self, desired: list[Resource], steps: list[Step], drift: list[Step], now: float
    ) -> bool:
        heal_key = codec.digest([describe(s) for s in drift])
        gate = self._heal_gate
        if gate is not None and not gate.allows(heal_key, now, self.config.retry_cap):
            return False
        heal_steps = [s for s in steps if not isinstance(s, Blocked)]
        ctx = self._context(desired)
        meta = {"label": "heal", "target": self.applied_key, "kind": "heal"}
        try:
            result = applying.apply(heal_steps, ctx, self.store, meta)
        except (ApplyError, SealedError) as exc:
            if self._stopping.is_set():
                return False
            self._heal_gate = RetryGate.after_failure(
                gate,
                key=heal_key,
                permanent=False,
                now=now,
                backoff=self._retry,
                target=self.device,
                kind="heal",
                version=0,
                error=str(exc),
                resource=exc.resource_id,
            )
            if exc.resource_id:
                self._heal_failed[exc.resource_id] = f"heal failed: {exc}"
            log.error("healing failed: %s; retrying with backoff", exc)
            return True
        except StateError as exc:
            log.error("%s", exc)
            return False
        self.store.clear_journal()
        self._record_sealed(desired, result.macs)
        self._heal_gate = None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        for step in drift:
            rid = getattr(step, "resource_id", None)
            if rid is not None:
                self._heals.healed(rid, f"healed at {stamp}: was {getattr(step, 'why', '')}")
                self._heal_failed.pop(rid, None)
        for resource in desired:
            fact = result.checked.get(resource.id)
            if fact is not None and isinstance(resource, bundles.CommandResource):
                self.observer.record_check(resource, fact)
        managed = planning.managed_files_after(result.done, self.state.managed_files)
        if managed != self.state.managed_files or result.created_dirs:
            self.state = replace(
                self.state,
                managed_files=managed,
                managed_dirs=self.state.managed_dirs | frozenset(result.created_dirs),
            )
            self.store.save(self.state)
        log.info("healed: %s", "; ".join(describe(s) for s in drift))
        self._event("healed", {"steps": drift})
        return True

    # The device's own presence and report, as the broker holds them (restating.py).

    def _saw_own(self, kind: str, payload: bytes) -> None:
        if kind == "device-presence":
            self._restater.saw_presence(payload)
            return
        try:
            report = reports.decode(payload)
        except ProtocolError as exc:
            log.debug("ignoring an unreadable report on this device's topic: %s", exc)
            return
        if report.device == self.device and (told := self._heals.echoed(report)):
            log.debug("the broker carried the heal of %s", ", ".join(sorted(told)))
            self._event("heal-told", {"resources": sorted(told)})
        if self._restater.saw_report(report.seq):
            log.info("the broker delivered a report of this device from an older connection"
                     " (seq %d): publishing the current one again", report.seq)  # fmt: skip

    def _restate(self) -> None:
        """Publish ``online`` or the report again when the broker was seen holding a stale
        one (rate-limited by the restater)."""
        if self.link is None or not self.link.connected:
            return
        for what in self._restater.due(time.monotonic()):
            if what == "presence":
                log.info("the broker delivered this device's presence as offline while it is"
                         " connected (a late will): publishing online again")  # fmt: skip
                topic = self.topics.device_presence(self.device)
                if not self.link.publish(topic, reports.PRESENCE_ONLINE):
                    self._restater.want("presence")
                    continue
            elif self.reporter is not None:
                self.reporter.forget()  # _report publishes the current report, numbered anew
            self._event("restated", {"what": what})

    # Reporting.

    def build_report(self) -> Report:
        def applied(held: Held | None) -> Applied | None:
            if held is None:
                return None
            b = held.bundle
            return Applied(b.target, b.version, b.commit, held.digest)

        gate = self.state.gate
        failure = (
            None
            if gate is None
            else Failure(gate.target, gate.version, gate.error, gate.permanent, int(gate.at))
        )
        return Report(
            device=self.device,
            time=0,
            seq=0,
            shim_version=SHIM_VERSION,
            mode=self.mode,
            group=self.state.trust.group,
            applied_group=applied(self.applied_group),
            applied_device=applied(self.applied_device),
            resources=self._statuses,
            refusals=tuple(self._refusals),
            failure=failure,
            observe=self.observe_method,
        )

    def _report(self, now: float) -> None:
        if self.link is None or self.reporter is None:
            return
        mono = time.monotonic()
        report = self.build_report()
        if not self.reporter.due(report, mono):
            return
        stamped = self.reporter.stamp(report, now)
        topic = self.topics.device_reported(self.device)
        if self.link.publish(topic, reports.encode(stamped)):
            self.reporter.sent(stamped, mono)
            self._restater.published(stamped.seq)
            self._report_retry = None
            self._event("reported", {"report": stamped})
        elif self.link.connected:
            self._report_retry = mono + 1.0  # too many outstanding: try again soon
        else:
            self._report_retry = None  # the next connection wakes the loop
