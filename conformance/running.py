"""The kit's run: play the controller's side against one running device agent, over MQTT only.

The steps, in order (each prints its lines as it goes):

1. presence and a first report (§6.7, §6.6);
2. a device bundle, then its group's bundle: the agent converges (§8, §6.6, §6.3, §4.2);
3. bundles it must refuse, one at a time, each reported with its word (§5, §8, §6.6), and
   a repeated refusal that must not be reported twice;
4. reconcile commands: a valid one (seq above 2^32), a replay, an expired one, one for
   another device, a forged one, a wrong payload type (§6.5);
5. a hand edit through ``--edit-cmd``, then a reconcile command: put back (§6.8); the
   group in observe mode and another edit: left alone, reported drifted; enforce again;
6. a pinned group version: a newer group bundle is held until the pin moves (§6.4);
7. a move to another group and back again (§8 steps 9 and 10);
8. cleared retained bundles: neither a refusal nor an undo (§3);
9. a stale will (``offline``) and an older report on the device's own topics, as a
   clustered engine's node back from a split sends them: the device publishes ``online``
   and its report again (§6.7, §6.6; SHOULD: a device that does not watch its own
   topics cannot);
10. what every report and presence message of the run must be (§6.6, §6.7, §4.2).

The kit never reads the device's files: what it knows comes from the device's reports and
presence, and from the hooks it is given.

This module does the I/O (MQTT, the edit hook); the messages are built by :mod:`messages`
and the lines formatted by :mod:`outcomes`.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from setpoint.proto import bundles, codec, envelopes, reports
from setpoint.proto.bundles import Bundle
from setpoint.proto.errors import ProtocolError
from setpoint.proto.reports import Applied, Refusal, Report
from setpoint.proto.topics import DEFAULT_PREFIX, Topics

from .messages import EDIT_ID, EDIT_PATH, GROUP_A, GROUP_B, OTHER_DEVICE, Messages
from .outcomes import Level, Outcome, Verdict
from .wire import Broker, KitError, Wire

MAX_ENVELOPE = envelopes.MAX_ENVELOPE_BYTES


@dataclass(frozen=True, slots=True)
class Options:
    broker: Broker
    device: str
    key: Ed25519PrivateKey
    prefix: str = DEFAULT_PREFIX
    edit_cmd: str | None = None
    timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Expected:
    """What the device should run: a group bundle and a device bundle, both applied."""

    group: Bundle
    device: Bundle

    def resources(self) -> dict[str, str]:
        return {
            r.id: bundles.resource_digest(r) for r in bundles.effective(self.group, self.device)
        }


@dataclass(frozen=True, slots=True)
class Bad:
    """A message the agent must refuse, and the refusal entry it must then report."""

    section: str
    requirement: str
    topic: str
    payload: bytes
    reason: str
    kind: str
    version: int
    target: str | None  # None: any target

    def matches(self, refusal: Refusal) -> bool:
        return (
            refusal.reason == self.reason
            and refusal.kind == self.kind
            and refusal.version == self.version
            and (self.target is None or refusal.target == self.target)
        )

    def wanted(self) -> str:
        return f"{self.reason} {self.kind} {self.target or '*'} v{self.version}"


def _applied_text(report: Report) -> str:
    def one(label: str, applied: Any) -> str:
        return f"{label} -" if applied is None else f"{label} {applied.target} v{applied.version}"

    return f"{one('group', report.applied_group)}, {one('device', report.applied_device)}"


def describe(report: Report | None) -> str:
    """A report in one line, for the 'what was seen' column."""
    if report is None:
        return "no report"
    resources = ", ".join(f"{r.id}={r.status}" for r in report.resources) or "none"
    return (
        f"report seq {report.seq}: group {report.group}, applied {_applied_text(report)};"
        f" resources {resources}"
    )


def _is(applied: Applied | None, bundle: Bundle) -> bool:
    return applied is not None and (
        applied.target,
        applied.version,
        applied.digest,
        applied.commit,
    ) == (bundle.target, bundle.version, bundle.content_digest(), bundle.commit)


def runs(report: Report, expected: Expected) -> bool:
    """Does ``report`` show the device running ``expected``, every resource in sync?"""
    if not (
        _is(report.applied_group, expected.group) and _is(report.applied_device, expected.device)
    ):
        return False
    wanted = expected.resources()
    seen = {r.id: r for r in report.resources}
    return (
        report.group == expected.group.target
        and report.mode == expected.group.mode
        and set(seen) == set(wanted)
        and all(seen[i].status in ("ok", "healed") and seen[i].digest == wanted[i] for i in wanted)
    )


class Kit:
    """One run against one device; :meth:`run` returns the outcomes in order."""

    def __init__(
        self,
        options: Options,
        *,
        clock: Callable[[], float] = time.time,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.options = options
        self.device = options.device
        self.topics = Topics(options.prefix)
        self.wire = Wire(options.broker, self.topics, options.device)
        self._clock = clock
        self._on_outcome = on_outcome
        self.outcomes: list[Outcome] = []
        start = int(clock())
        self.messages = Messages(options.key, options.device, start)
        self.version = self.messages.base_version
        self.seq = self.messages.base_seq
        self.stranger = Ed25519PrivateKey.generate()  # a key the agent does not trust
        self.running: Expected | None = None
        self.changed_by_refusal: list[str] = []

    # Bookkeeping.

    def note(
        self, section: str, level: Level, requirement: str, ok: bool | None, seen: str
    ) -> bool:
        verdict: Verdict = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        outcome = Outcome(section, level, requirement, verdict, seen)
        self.outcomes.append(outcome)
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        return bool(ok)

    def next_version(self) -> int:
        self.version += 1
        return self.version

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def fresh(self) -> Messages:
        """The message builder with the clock of now (commands live minutes)."""
        return replace(self.messages, now=int(self._clock()))

    def bundle_topic(self, bundle: Bundle) -> str:
        if bundle.kind == "group":
            return self.topics.group_desired(bundle.target)
        return self.topics.device_desired(bundle.target)

    def publish_bundle(self, bundle: Bundle) -> None:
        self.wire.publish(self.bundle_topic(bundle), self.messages.sign(bundle), retain=True)

    def wait(self, check: Callable[[Report], bool], since: int) -> Report | None:
        return self.wire.wait_report(check, since=since, timeout=self.options.timeout)

    # The run.

    def run(self) -> list[Outcome]:
        self.wire.start()
        try:
            self.first_contact()
            if self.converge():
                self.bundle_refusals()
                self.command_checks()
                self.hand_edit()
                self.pin()
                self.move_and_back()
                self.clearing()
                self.stale_copies()
            else:
                self.note(
                    "§8",
                    "MUST",
                    "the remaining checks need a converged device",
                    False,
                    "stopped after convergence failed",
                )
            self.discipline()
        finally:
            self.wire.stop()
        return self.outcomes

    def first_contact(self) -> None:
        online = self.wire.wait_presence(b"online", self.options.timeout)
        seen = self.wire.presence[-1] if self.wire.presence else None
        self.note(
            "§6.7",
            "MUST",
            "presence is the bytes 'online' while connected",
            online,
            f"presence {seen!r}" if seen is not None else "no presence message",
        )
        first = self.wait(lambda _r: True, 0)
        self.note(
            "§6.6",
            "MUST",
            f"the device publishes a report on"
            f" shards/{self.wire.topics.shard_of(self.wire.device)}/devices/<id>/reported"
            " (its shard, §3.1)",
            first is not None,
            describe(first),
        )

    def converge(self) -> bool:
        group = self.messages.group_a(self.next_version())
        device = self.messages.device_bundle(self.next_version(), GROUP_A)
        expected = Expected(group, device)
        mark = self.wire.mark()
        self.publish_bundle(device)  # the device bundle first: it names the group
        self.publish_bundle(group)
        report = self.wait(lambda r: runs(r, expected), mark)
        latest = report or self.wire.latest()
        ok = self.note(
            "§8",
            "MUST",
            "applies a valid device bundle and then its group's bundle, and reports both in"
            " 'applied' (target, version, commit, content digest)",
            report is not None,
            describe(latest),
        )
        wanted = expected.resources()
        observed = {r.id: r for r in latest.resources} if latest is not None else {}
        for rid, digest in wanted.items():
            got = observed.get(rid)
            what = "not reported" if got is None else f"{got.status}, digest {got.digest[:16]}"
            self.note(
                "§4.2",
                "MUST",
                f"resource {rid!r} is reported with the digest of the merged, substituted"
                " resource (§6.3; settings keep int and float apart, §6.2)",
                got is not None and got.digest == digest and got.status in ("ok", "healed"),
                f"{what}; want {digest[:16]}",
            )
        mode_ok = latest is not None and latest.mode == "enforce" and latest.group == GROUP_A
        self.note(
            "§6.6",
            "MUST",
            "'mode' and 'group' are those of the applied bundles",
            mode_ok,
            f"mode {latest.mode if latest else None}, group {latest.group if latest else None}",
        )
        if ok:
            self.running = expected
        return ok

    # Refusals.

    def expect_refusal(self, bad: Bad) -> Report | None:
        """Send ``bad`` and wait for the refusal it must cause; one line either way."""
        mark = self.wire.mark()
        self.wire.publish(bad.topic, bad.payload)
        report = self.wait(lambda r: any(bad.matches(x) for x in r.refusals), mark)
        if report is not None:
            seen = f"refusal {bad.wanted()}"
        else:
            latest = self.wire.latest()
            tail = [
                f"{x.reason} {x.kind} {x.target} v{x.version}"
                for x in (latest.refusals if latest else ())
            ]
            seen = f"want {bad.wanted()}; latest refusals: {tail}"
        self.note(bad.section, "MUST", bad.requirement, report is not None, seen)
        if report is not None and self.running is not None and not runs(report, self.running):
            self.changed_by_refusal.append(f"{bad.requirement}: {describe(report)}")
        return report

    def send_marker(self, bundle: Bundle, since: int) -> Report | None:
        """Send ``bundle`` forged on its topic; its refusal proves that what was sent on
        that topic before it has been seen (MQTT keeps order per topic)."""
        forged = self.messages.sign(bundle, key=self.stranger)
        marker = Bad("", "", self.bundle_topic(bundle), forged,
                     "signature", bundle.kind, bundle.version, bundle.target)  # fmt: skip
        self.wire.publish(marker.topic, marker.payload)
        return self.wait(lambda r: any(marker.matches(x) for x in r.refusals), since)

    def bundle_refusals(self) -> None:
        assert self.running is not None
        m, me = self.messages, self.device
        on_group = self.topics.group_desired(GROUP_A)
        on_device = self.topics.device_desired(me)
        applied = self.running.group.version
        v = [self.next_version() for _ in range(5)]
        garbage = b"\xc1 not msgpack: conformance kit"
        cases = [
            Bad("§5.5", "refuses a bundle signed by a key it does not trust ('signature')",
                on_group, m.sign(m.group_a(v[0]), key=self.stranger),
                "signature", "group", v[0], GROUP_A),
            Bad("§8", "refuses a replayed older version ('rollback', step 9)",
                on_group, m.sign(m.group_a(applied - 1)),
                "rollback", "group", applied - 1, GROUP_A),
            Bad("§8", "refuses the applied version with other content ('rollback', step 9)",
                on_group, m.sign(m.group_a(applied, revision=9)),
                "rollback", "group", applied, GROUP_A),
            Bad("§8", "refuses an expired bundle ('expired', step 8)",
                on_group, m.sign(m.expired(m.group_a(v[1]))), "expired", "group", v[1], GROUP_A),
            Bad("§8", "refuses a device bundle naming another device ('wrong-target', step 7);"
                " the refusal names the bundle's target",
                on_device, m.sign(m.device_bundle(v[2], GROUP_A, target=OTHER_DEVICE)),
                "wrong-target", "device", v[2], OTHER_DEVICE),
            Bad("§8", "refuses a group bundle for another group on its group's topic"
                " ('wrong-target', step 7)",
                on_group, m.sign(m.group_b(v[3])), "wrong-target", "group", v[3], GROUP_B),
            Bad("§5.4", "refuses a validly signed group bundle on its device topic"
                " ('payload-type')",
                on_device, m.sign(m.group_a(v[4])), "payload-type", "device", v[4], None),
            Bad("§8", "refuses an envelope over 1 MiB unread ('too-large', step 2); target is"
                " the topic's id and version 0",
                on_device, b"\x00" * (MAX_ENVELOPE + 1), "too-large", "device", 0, me),
            Bad("§6.6", "refuses bytes that are not msgpack ('malformed'); an undecodable"
                " message is reported with the topic's id as target and version 0 (never nil)",
                on_device, garbage, "malformed", "device", 0, me),
        ]  # fmt: skip
        for bad in cases:
            self.expect_refusal(bad)
        # The same bytes again (a retained bad bundle is redelivered at each reconnect),
        # then a marker on the same topic: once the marker is reported, the repeat was seen.
        self.wire.publish(on_device, garbage)
        marker_version = self.next_version()
        marker = self.expect_refusal(
            Bad("§5.5", "refuses a device bundle signed by an untrusted key ('signature')",
                on_device, m.sign(m.device_bundle(marker_version, GROUP_A), key=self.stranger),
                "signature", "device", marker_version, me)
        )  # fmt: skip
        requirement = "a repeated identical refusal is reported once"
        if marker is None:
            self.note("§6.6", "MUST", requirement, None, "not checked: no marker refusal")
        else:
            copies = sum(1 for x in marker.refusals if cases[-1].matches(x))
            self.note("§6.6", "MUST", requirement, copies == 1,
                      f"{copies} 'malformed' refusal(s) after sending it twice")  # fmt: skip
        self.note(
            "§8", "MUST", "a refusal changes nothing: the applied bundles and resources stay",
            not self.changed_by_refusal,
            "; ".join(self.changed_by_refusal) or "applied state unchanged after every refusal",
        )  # fmt: skip

    def command_checks(self) -> None:
        assert self.running is not None
        topic = self.topics.device_command(self.device)
        me = self.device
        mark = self.wire.mark()
        sent = self.reconcile()
        seq = sent.version
        replay = self.expect_refusal(
            replace(sent, requirement="refuses a replayed command ('rollback': seq not above"
                    " the last accepted)")
        )  # fmt: skip
        refused = [
            f"{x.reason}: {x.error}"
            for r in self.wire.received()[mark:]
            if r.report is not None
            for x in r.report.refusals
            if x.kind == "command" and x.version == seq and x.reason != "rollback"
        ]
        evidence = "accepted (its replay was refused)" if replay else "no sign it was accepted"
        self.note(
            "§6.5", "MUST",
            f"accepts a valid reconcile command with seq {seq} (above 2^32: 64-bit integers,"
            " §14)",
            replay is not None and not refused, "; ".join(refused) or evidence,
        )  # fmt: skip
        s = [self.next_seq() for _ in range(3)]
        m = self.fresh()
        cases = [
            Bad("§6.5", "refuses an expired command ('expired')",
                topic, m.command(s[0], expired=True), "expired", "command", s[0], me),
            Bad("§6.5", "refuses a command for another device ('wrong-target')",
                topic, m.command(s[1], device=OTHER_DEVICE), "wrong-target", "command", s[1],
                OTHER_DEVICE),
            Bad("§6.5", "refuses a command signed by an untrusted key ('signature')",
                topic, m.command(s[2], key=self.stranger), "signature", "command", s[2], me),
            Bad("§6.5", "refuses a bundle envelope on the command topic ('payload-type')",
                topic, m.sign(self.running.group), "payload-type", "command", 0, me),
        ]  # fmt: skip
        for bad in cases:
            self.expect_refusal(bad)

    def edit_by_hand(self) -> str | None:
        """Run ``--edit-cmd``; return what went wrong, or None."""
        assert self.options.edit_cmd
        env = {**os.environ, "SETPOINT_DEVICE": self.device, "SETPOINT_EDIT_PATH": EDIT_PATH}
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", self.options.edit_cmd],
                env=env,
                capture_output=True,
                timeout=self.options.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return "--edit-cmd timed out"
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()
            return f"--edit-cmd exited {done.returncode}: {err}"
        return None

    def reconcile(self) -> Bad:
        """Send a valid reconcile command; return it as the replay that must be refused."""
        seq = self.next_seq()
        topic = self.topics.device_command(self.device)
        command = self.fresh().command(seq)
        self.wire.publish(topic, command)
        return Bad("§6.5", "refuses a replayed command", topic, command, "rollback", "command",
                   seq, self.device)  # fmt: skip

    def hand_edit(self) -> None:
        requirement = "enforce mode puts a hand edit back and reports the resource 'healed'"
        if not self.options.edit_cmd:
            self.note("§6.8", "MUST", requirement, None, "not checked: no --edit-cmd given")
            self.note("§6.8", "MUST", "observe mode leaves a hand edit as it is", None,
                      "not checked: no --edit-cmd given")  # fmt: skip
            return
        assert self.running is not None
        wanted = self.running.resources()[EDIT_ID]
        mark = self.wire.mark()
        failed = self.edit_by_hand()
        if failed:
            self.note("§6.8", "MUST", requirement, False, failed)
            return
        self.reconcile()

        def healed(r: Report) -> bool:
            return any(
                x.id == EDIT_ID and x.status == "healed" and x.digest == wanted for x in r.resources
            )

        report = self.wait(healed, mark)
        self.note(
            "§6.8", "MUST", requirement, report is not None, describe(report or self.wire.latest())
        )
        drifted = any(
            x.id == EDIT_ID and x.status == "drifted"
            for r in self.wire.received()[mark:]
            if r.report is not None
            for x in r.report.resources
        )
        self.note(
            "§6.8",
            "SHOULD",
            "the drift is reported ('drifted') before it is healed",
            drifted,
            "a 'drifted' report was seen" if drifted else "no report showed the resource 'drifted'",
        )
        if report is not None:
            self.observe_mode()

    def observe_mode(self) -> None:
        assert self.running is not None
        device = self.running.device
        quiet = replace(self.messages.group_a(self.next_version()), mode="observe")
        if not self.expect_running(
            "§6.6", "applies a group bundle in observe mode and reports 'mode' observe",
            Expected(quiet, device), quiet,
        ):  # fmt: skip
            return
        wanted = self.running.resources()[EDIT_ID]
        requirement = "observe mode leaves a hand edit as it is and reports it 'drifted'"
        mark = self.wire.mark()
        failed = self.edit_by_hand()
        if failed:
            self.note("§6.8", "MUST", requirement, False, failed)
            return
        replay = self.reconcile()

        def drifted(r: Report) -> bool:
            return any(
                x.id == EDIT_ID and x.status == "drifted" and x.digest != wanted
                for x in r.resources
            )

        seen = self.wait(drifted, mark)
        after = None
        if seen is not None:
            # The same command again is refused as a replay: the report that says so comes
            # after the drifted one, and would show a heal that followed it.
            mark = self.wire.mark()
            self.wire.publish(replay.topic, replay.payload)
            after = self.wait(lambda r: any(replay.matches(x) for x in r.refusals), mark)
        left = after is not None and drifted(after)
        self.note("§6.8", "MUST", requirement, left,
                  describe(after or seen or self.wire.latest()))  # fmt: skip
        enforce = self.messages.group_a(self.next_version())
        self.expect_running(
            "§6.8", "a new version in enforce mode puts the edited file back",
            Expected(enforce, device), enforce,
        )  # fmt: skip

    def expect_running(
        self, section: str, requirement: str, expected: Expected, *publish: Bundle
    ) -> Report | None:
        """Publish ``publish`` (retained, in order) and wait until the device runs
        ``expected``; one line either way."""
        mark = self.wire.mark()
        for bundle in publish:
            self.publish_bundle(bundle)
        report = self.wait(lambda r: runs(r, expected), mark)
        self.note(section, "MUST", requirement, report is not None,
                  describe(report or self.wire.latest()))  # fmt: skip
        if report is not None:
            self.running = expected
        return report

    def pin(self) -> None:
        assert self.running is not None
        current = self.running.group
        pinned = self.messages.device_bundle(self.next_version(), GROUP_A, pin=current.version)
        expected = Expected(current, pinned)
        self.expect_running("§6.4", "applies a device bundle that pins the group version it"
                            " runs", expected, pinned)  # fmt: skip
        newer = self.messages.group_a(self.next_version(), revision=1)
        mark = self.wire.mark()
        self.publish_bundle(newer)
        # A marker on the same topic, after the newer bundle: once it is reported, the
        # newer bundle has been seen too.
        marker = self.send_marker(self.messages.group_a(self.next_version()), mark)
        self.note(
            "§6.4", "MUST",
            "holds a group bundle above the pinned group_version (keeps running the pinned one)",
            marker is not None and runs(marker, expected),
            describe(marker) if marker else "the marker refusal never came",
        )  # fmt: skip
        moved = self.messages.device_bundle(self.next_version(), GROUP_A, pin=newer.version)
        self.expect_running("§6.4", "when the pin moves up, applies the group bundle it held"
                            " (not sent again)", Expected(newer, moved), moved)  # fmt: skip

    def move_and_back(self) -> None:
        assert self.running is not None
        home = self.running.group
        other = self.messages.group_b(self.next_version())
        away = self.messages.device_bundle(self.next_version(), GROUP_B)
        if not self.expect_running(
            "§8", f"follows its device bundle to another group ({GROUP_B}) and reports only"
            " that group's resources", Expected(other, away), other, away,
        ):  # fmt: skip
            return
        back = self.messages.device_bundle(self.next_version(), GROUP_A)
        self.expect_running(
            "§8", f"back in group {GROUP_A}, applies its retained bundle v{home.version} again"
            " although that version equals its floor (step 9: 'not new' only for the bundle"
            " it runs)", Expected(home, back), back,
        )  # fmt: skip

    def clearing(self) -> None:
        before = self.wire.latest()
        known = {
            (x.target, x.kind, x.version, x.reason) for x in (before.refusals if before else ())
        }
        mark = self.wire.mark()
        for topic in (
            self.topics.group_desired(GROUP_A),
            self.topics.group_desired(GROUP_B),
            self.topics.device_desired(self.device),
        ):
            self.wire.publish(topic, b"", retain=True)
        v = self.next_version()
        report = self.send_marker(self.messages.device_bundle(v, GROUP_A), mark)
        if report is None:
            self.note(
                "§3",
                "MUST",
                "a cleared retained bundle is neither a refusal nor an undo",
                False,
                "the marker refusal never came",
            )
            return
        new = [
            f"{x.reason} {x.kind} {x.target} v{x.version}"
            for x in report.refusals
            if (x.target, x.kind, x.version, x.reason) not in known and x.version != v
        ]
        kept = self.running is None or runs(report, self.running)
        self.note(
            "§3",
            "MUST",
            "a cleared retained bundle is neither a refusal nor an undo",
            kept and not new,
            f"new refusals {new}" if new else describe(report),
        )

    def stale_copies(self) -> None:
        mark = self.wire.presence_mark()
        self.wire.publish(
            self.topics.device_presence(self.device), reports.PRESENCE_OFFLINE, retain=True
        )
        back = self.wire.wait_presence_after(
            mark, reports.PRESENCE_OFFLINE, reports.PRESENCE_ONLINE, self.options.timeout
        )
        self.note(
            "§6.7",
            "SHOULD",
            "a device that sees 'offline' on its own presence while connected publishes"
            " 'online' again",
            back,
            "'online' again after a stale 'offline'" if back else "presence left 'offline'",
        )
        latest = self.wire.latest()
        if latest is None:
            return
        older = replace(latest, seq=max(0, min(self.wire.seqs()) - 1))
        mark = self.wire.mark()
        self.wire.plant(self.topics.device_reported(self.device), reports.encode(older))
        again = self.wait(lambda r: r.seq > latest.seq, mark)
        self.note(
            "§6.6",
            "SHOULD",
            "a device that sees an older report of its own publishes its report again",
            again is not None,
            f"seq {again.seq} after a stale seq {older.seq}"
            if again is not None
            else f"no report after a stale seq {older.seq}",
        )

    # Every message of the run.

    def discipline(self) -> None:
        mark = self.wire.mark()
        presence_mark = self.wire.presence_mark()
        self.wire.resubscribe()
        retained = self.wire.wait_retained(mark, self.options.timeout)
        kept = self.wire.wait_retained_presence(presence_mark, self.options.timeout)
        self.note(
            "§6.7",
            "MUST",
            "presence is retained: a new subscriber gets 'online' at once",
            kept == b"online",
            f"retained presence {kept!r}" if kept is not None else "no retained presence",
        )
        self.note(
            "§6.6",
            "MUST",
            "the report is retained (a new subscriber gets it at once)",
            retained,
            "a retained report arrived on subscribing"
            if retained
            else "no retained report on subscribing",
        )
        strays = self.wire.strays()
        stray = sorted(set(strays))
        self.note(
            "§3.1",
            "MUST",
            "reports and presence go only under the device's own shard",
            not stray,
            f"{len(strays)} under another shard, e.g. {stray[0]}"
            if stray
            else f"none outside shard {self.wire.topics.shard_of(self.wire.device)}",
        )
        received = self.wire.received()
        bad = [r.error for r in received if r.error is not None]
        self.note(
            "§6.6",
            "MUST",
            "every report has the fields and types of §6.6",
            not bad,
            f"{len(received)} reports; {len(bad)} refused" + (f": {bad[0]}" if bad else ""),
        )
        decoded = [r for r in received if r.report is not None]
        others = [r.report.device for r in decoded if r.report and r.report.device != self.device]
        self.note(
            "§6.6",
            "MUST",
            "every report names the device of its topic",
            not others,
            f"other ids: {sorted(set(others))}" if others else f"{len(decoded)} reports",
        )
        noncanonical = [r for r in received if not _canonical(r.raw)]
        self.note(
            "§4.2",
            "MUST",
            "every report is canonical msgpack (sorted keys, smallest encodings)",
            not noncanonical,
            f"{len(noncanonical)} of {len(received)} not canonical",
        )
        floats = [r for r in received if _has_float(r.raw)]
        self.note(
            "§6.6",
            "MUST",
            "a report holds no floats",
            not floats,
            f"{len(floats)} of {len(received)} hold a float",
        )
        seqs = [
            r.report.seq
            for r in decoded
            if r.report is not None and not r.retained and not self.wire.planted(r.raw)
        ]
        rising = all(b > a for a, b in itertools.pairwise(seqs))
        self.note(
            "§6.6",
            "MUST",
            "'seq' rises with every report",
            rising,
            f"{len(seqs)} live reports, seq {seqs[0] if seqs else '-'} to"
            f" {seqs[-1] if seqs else '-'}",
        )
        long = [r for r in decoded if r.report is not None and len(r.report.refusals) > 8]
        self.note(
            "§6.6",
            "MUST",
            "a report keeps at most 8 refusals",
            not long,
            f"{len(long)} reports with more",
        )
        odd = [p for p in self.wire.presence if p not in (b"online", b"offline")]
        self.note(
            "§6.7",
            "MUST",
            "presence is exactly 'online' or 'offline'",
            not odd,
            f"other payloads: {odd[:3]!r}"
            if odd
            else f"{len(self.wire.presence)} presence messages",
        )


def _canonical(raw: bytes) -> bool:
    try:
        return bool(codec.pack(codec.unpack(raw, max_size=len(raw))) == raw)
    except ProtocolError:
        return False


def _walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def _has_float(raw: bytes) -> bool:
    try:
        value = codec.unpack(raw, max_size=len(raw))
    except ProtocolError:
        return False
    return any(isinstance(v, float) for v in _walk(value))


def run(
    options: Options,
    *,
    clock: Callable[[], float] = time.time,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run the kit against ``options.device``; raise KitError if it cannot run at all."""
    return Kit(options, clock=clock, on_outcome=on_outcome).run()


__all__ = ["KitError", "Options", "run"]
