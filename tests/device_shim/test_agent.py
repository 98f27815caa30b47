"""The shim against a real mosquitto: converge, heal, follow, resume, survive the broker."""

from __future__ import annotations

import itertools
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from shimkit import Fleet, Shims, on_versions, snapshot, statuses, wait_for

from setpoint.device_shim import DevicePolicy
from setpoint.proto import bundles
from setpoint.proto.bundles import CommandResource, FileResource, SettingResource

pytestmark = pytest.mark.broker

MOTD = FileResource("motd", "etc/motd", b"hello ${name}\n", 0o644)
TZ = SettingResource("tz", "tz", "UTC")
ALLOW = DevicePolicy(allow_commands=True, command_timeout_cap=10)


def publish_pair(fleet: Fleet, version: int, resources: Any = (MOTD, TZ), **group_kw: Any) -> None:
    fleet.publish_bundle(fleet.group("kiosk", version, resources, **group_kw))
    fleet.publish_bundle(fleet.device("dev1", version, "kiosk", vars={"name": "dev1"}))


def content(snap: dict[str, Any]) -> dict[str, Any]:
    return {path: (body, mode) for path, (body, mode, _inode) in snap.items()}


def settings(root: Path) -> dict[str, Any]:
    return json.loads((root / ".setpoint" / "settings.json").read_text())  # type: ignore[no-any-return]


# Converging.


def test_converges_a_root_to_the_published_bundle(fleet: Fleet, shims: Shims) -> None:
    device_only = FileResource("id", "etc/device-id", b"${name}", 0o600)
    fleet.publish_bundle(fleet.group("kiosk", 4, [MOTD, TZ], commit="abc123"))
    fleet.publish_bundle(
        fleet.device("dev1", 2, "kiosk", [device_only], vars={"name": "dev1"}, commit="abc123")
    )
    shim = shims.start("dev1")
    report = fleet.wait_report("dev1", on_versions(4, 2))
    root = shim.config.root
    assert (root / "etc" / "motd").read_bytes() == b"hello dev1\n"
    assert (root / "etc" / "device-id").read_bytes() == b"dev1"
    assert stat.S_IMODE((root / "etc" / "device-id").stat().st_mode) == 0o600
    assert settings(root) == {"tz": "UTC"}
    # The report says exactly what the controller needs to call this device in sync.
    desired = bundles.effective(
        fleet.group("kiosk", 4, [MOTD, TZ]),
        fleet.device("dev1", 2, "kiosk", [device_only], vars={"name": "dev1"}),
    )
    assert {r.id: r.digest for r in report.resources} == {
        r.id: bundles.resource_digest(r) for r in desired
    }
    assert report.group == "kiosk" and report.mode == "enforce" and report.device == "dev1"
    assert report.applied_group is not None and report.applied_group.commit == "abc123"
    assert report.applied_group.digest == fleet.group("kiosk", 4, [MOTD, TZ]).content_digest()
    assert report.shim_version and report.time > 0 and report.failure is None
    fleet.wait_presence("dev1", b"online")


def test_reports_only_on_change_and_heartbeat(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=0.02)
    report = fleet.wait_report("dev1", on_versions(1, 1))
    # The broker may deliver the report before the shim's thread has counted it as sent.
    reporter = shim.agent.reporter
    assert reporter is not None
    wait_for(lambda: reporter.last_seq >= report.seq, what="the report counted as sent")
    shim.wait_event("observed")
    published = reporter.published
    # Many observe passes later, with nothing changed, nothing more was published.
    mark = shim.mark()
    wait_for(lambda: shim.count("observed") > mark + 20, what="20 observe passes")
    assert reporter.published == published


def test_heartbeat_republishes_an_unchanged_report(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shims.start("dev1", heartbeat=0.3)
    first = fleet.wait_report("dev1", on_versions(1, 1))
    later = fleet.wait_report("dev1", lambda r: r.seq > first.seq)
    assert later.resources == first.resources and later.time >= first.time


def test_restart_resumes_without_reapplying(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1")
    first = fleet.wait_report("dev1", on_versions(1, 1))
    before = snapshot(shim.config.root)
    shim = shims.restart(shim)
    again = fleet.wait_report("dev1", lambda r: r.seq > first.seq)
    assert on_versions(1, 1)(again)
    assert shim.count("applied") == 0
    assert snapshot(shim.config.root) == before  # same inodes: nothing rewritten


def test_duplicates_and_reordering_never_apply_a_version_twice(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    v2 = fleet.sign(fleet.group("kiosk", 2, [FileResource("motd", "etc/motd", b"two")]))
    v1 = fleet.sign(fleet.group("kiosk", 1, [MOTD, TZ]))
    topic = fleet.topics.group_desired("kiosk")
    for payload in (v2, v2, v1, v2, v1):
        fleet.publish(topic, payload, retain=False)
    fleet.publish(topic, v2)
    fleet.wait_report("dev1", on_versions(2, 1))
    # The last publish is the retained v2 again; wait until the shim has seen it too.
    wait_for(lambda: not shim.agent._candidates, what="candidates drained")
    labels = [d["label"] for n, d in shim.events if n == "applied"]
    assert labels == ["group kiosk v1 + device dev1 v1", "group kiosk v2 + device dev1 v1"]


def test_offline_across_several_versions_applies_only_the_newest(
    fleet: Fleet, shims: Shims
) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    shim.stop()
    for version in (2, 3, 4):
        fleet.publish_bundle(
            fleet.group("kiosk", version, [FileResource("motd", "etc/motd", b"v%d" % version)])
        )
    shim = shims.restart(shim)
    fleet.wait_report("dev1", on_versions(4, 1))
    assert [d["label"] for n, d in shim.events if n == "applied"] == [
        "group kiosk v4 + device dev1 v1"
    ]
    assert (shim.config.root / "etc" / "motd").read_bytes() == b"v4"


# Drift.


def test_hand_edit_is_healed_in_enforce_mode(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    root = shim.config.root
    (root / "etc" / "motd").write_text("hand edit\n")
    drifted = fleet.wait_report("dev1", lambda r: statuses(r)["motd"] == "drifted")
    assert next(r.detail for r in drifted.resources if r.id == "motd") == "content differs"
    healed = fleet.wait_report("dev1", lambda r: statuses(r)["motd"] == "healed")
    assert (root / "etc" / "motd").read_bytes() == b"hello dev1\n"
    assert healed.resources[0].digest == bundles.resource_digest(
        bundles.render(MOTD, {"name": "dev1"})
    )


def test_mode_and_setting_and_deletion_are_healed(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    root = shim.config.root
    os.chmod(root / "etc" / "motd", 0o666)
    (root / ".setpoint" / "settings.json").write_text('{"tz": "CET", "mine": 1}')
    fleet.wait_report("dev1", lambda r: set(statuses(r).values()) == {"healed"})
    assert stat.S_IMODE((root / "etc" / "motd").stat().st_mode) == 0o644
    assert settings(root) == {"tz": "UTC", "mine": 1}  # a key it does not manage stays
    (root / "etc" / "motd").unlink()
    wait_for(lambda: (root / "etc" / "motd").exists(), what="motd recreated")


def test_what_cannot_be_healed_is_failed_and_the_rest_is_healed(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    root = shim.config.root
    (root / "etc" / "motd").unlink()
    (root / "etc" / "motd").mkdir()  # someone put a directory where the file belongs
    (root / "etc" / "motd" / "theirs").write_text("not ours")
    (root / ".setpoint" / "settings.json").write_text('{"tz": "CET"}')
    report = fleet.wait_report("dev1", lambda r: statuses(r) == {"motd": "failed", "tz": "healed"})
    assert "not a regular file" in report.resources[0].detail
    assert (root / "etc" / "motd" / "theirs").read_text() == "not ours"


def test_hand_edit_is_reported_but_left_in_observe_mode(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1, mode="observe")
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    root = shim.config.root
    (root / "etc" / "motd").write_text("hand edit\n")
    report = fleet.wait_report("dev1", lambda r: statuses(r)["motd"] == "drifted")
    assert report.mode == "observe"
    # Several observe intervals later it is still there and still reported.
    mark = shim.mark()
    shim.wait_event("drift", after=mark)
    shim.wait_event("drift", after=shim.mark())
    assert (root / "etc" / "motd").read_text() == "hand edit\n"
    assert statuses(fleet.latest("dev1"))["motd"] == "drifted"  # type: ignore[arg-type]
    assert shim.count("healed") == 0


def test_without_inotify_drift_is_found_by_the_full_look(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1, mode="observe")
    shim = shims.start("dev1", observe_interval=0.2, watch=False)
    assert fleet.wait_report("dev1", on_versions(1, 1)).observe == "poll"
    mark = shim.mark()
    (shim.config.root / "etc" / "motd").write_text("hand edit\n")
    fleet.wait_report("dev1", lambda r: statuses(r)["motd"] == "drifted")
    looks = [data["paths"] for name, data in shim.events[mark:] if name == "observed"]
    assert looks and all(paths is None for paths in looks)  # every look was a full one


# Ownership.


def test_unmanaged_files_are_never_touched(fleet: Fleet, shims: Shims) -> None:
    shim_config = shims.config("dev1")
    root = shim_config.root
    (root / "etc").mkdir()
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc" / "motd").write_text("pre-existing\n")  # will be managed content, not owned
    (root / "var").mkdir()
    (root / "var" / "log").write_text("log\n")
    untouched = {k: v for k, v in snapshot(root).items() if k in ("etc/hosts", "var", "var/log")}
    extra = FileResource("extra", "etc/extra", b"x")
    publish_pair(fleet, 1, resources=(MOTD, extra))
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    assert (root / "etc" / "motd").read_bytes() == b"hello dev1\n"
    # Both dropped from the bundle: the file it created goes, the one it found stays.
    publish_pair(fleet, 2, resources=())
    fleet.wait_report("dev1", on_versions(2, 2))
    assert not (root / "etc" / "extra").exists()
    assert (root / "etc" / "motd").read_bytes() == b"hello dev1\n"
    now = snapshot(root)
    assert {k: now[k] for k in untouched} == untouched
    assert shim.agent.state.managed_files == frozenset()


def test_directories_it_created_are_removed_when_emptied(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1, resources=(FileResource("deep", "opt/app/conf/x", b"x"),))
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    root = shim.config.root
    (root / "opt" / "keep").write_text("mine")  # someone else's file in a dir it created
    publish_pair(fleet, 2, resources=())
    fleet.wait_report("dev1", on_versions(2, 2))
    assert not (root / "opt" / "app").exists()
    assert (root / "opt" / "keep").read_text() == "mine"


# Groups.


def test_group_change_is_followed(fleet: Fleet, shims: Shims) -> None:
    fleet.publish_bundle(fleet.group("kiosk", 3, [MOTD]))
    fleet.publish_bundle(fleet.group("lobby", 8, [FileResource("lobby", "etc/lobby", b"L")]))
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk", vars={"name": "dev1"}))
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(3, 1))
    root = shim.config.root
    fleet.publish_bundle(fleet.device("dev1", 2, "lobby"))
    report = fleet.wait_report("dev1", on_versions(8, 2))
    assert report.group == "lobby" and report.applied_group.target == "lobby"  # type: ignore[union-attr]
    assert (root / "etc" / "lobby").read_bytes() == b"L"
    assert not (root / "etc" / "motd").exists()  # kiosk's file, created by the shim, is gone
    # kiosk's updates no longer reach it; lobby's do.
    mark = shim.mark()
    fleet.publish_bundle(fleet.group("kiosk", 4, [FileResource("motd", "etc/motd", b"k4")]))
    fleet.publish_bundle(fleet.group("lobby", 9, [FileResource("lobby", "etc/lobby", b"L9")]))
    fleet.wait_report("dev1", on_versions(9, 2))
    assert not (root / "etc" / "motd").exists()
    assert [d["label"] for n, d in shim.events[mark:] if n == "applied"] == [
        "group lobby v9 + device dev1 v2"
    ]


def test_group_change_waits_for_the_new_groups_bundle(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    fleet.publish_bundle(fleet.device("dev1", 2, "lobby"))
    shim.wait_event("waiting", lambda d: "group lobby" in d["why"])
    assert (shim.config.root / "etc" / "motd").exists()  # still enforcing kiosk v1
    fleet.publish_bundle(fleet.group("lobby", 1, []))
    fleet.wait_report("dev1", lambda r: r.group == "lobby" and on_versions(1, 2)(r))


# Failures.


def test_failing_apply_in_the_middle_restores_everything(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", policy=ALLOW)
    fleet.wait_report("dev1", on_versions(1, 1))
    root = shim.config.root
    before = snapshot(root)
    trust_before = shim.agent.state.trust
    bad = [
        FileResource("motd", "etc/motd", b"changed"),
        FileResource("new", "srv/new/file", b"new"),
        SettingResource("tz", "tz", "CET"),
        CommandResource("fails", "false", "echo nope >&2; exit 7", 5),
    ]
    fleet.publish_bundle(fleet.group("kiosk", 2, bad))
    report = fleet.wait_report("dev1", lambda r: r.failure is not None)
    failure = report.failure
    assert failure is not None and not failure.permanent
    assert (failure.target, failure.version) == ("kiosk", 2)
    assert "exit 7" in failure.error and "nope" in failure.error
    # Restored by atomic rewrite: same content and modes (new inodes), nothing added.
    assert content(snapshot(root)) == content(before)
    assert shim.agent.state.trust == trust_before
    assert on_versions(1, 1)(report)
    # A fixed version applies, and clears the failure.
    fleet.publish_bundle(fleet.group("kiosk", 3, bad[:3]))
    fixed = fleet.wait_report("dev1", on_versions(3, 1))
    assert fixed.failure is None and settings(root) == {"tz": "CET"}


def test_failed_version_is_retried_with_backoff_not_in_a_loop(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", policy=ALLOW, retry_base=0.2, retry_cap=10.0)
    fleet.wait_report("dev1", on_versions(1, 1))
    counter = shim.config.root.parent / "attempts"
    fleet.publish_bundle(
        fleet.group("kiosk", 2, [CommandResource("flaky", "false", f"echo x >> {counter}; false")])
    )
    gates = []
    for n in range(1, 4):
        gates.append(
            shim.wait_event("apply-failed", lambda d, n=n: d["gate"].attempts == n)["gate"]
        )
    waits = [g.next_at - g.at for g in gates]
    # Equal jitter: each wait is at least half of 0.2, 0.4, 0.8 s, and at most all of it.
    for wait, nominal in zip(waits, (0.2, 0.4, 0.8), strict=True):
        assert nominal / 2 <= wait <= nominal
    for earlier, later in itertools.pairwise(gates):
        assert later.at >= earlier.next_at  # never retried before its time
    assert counter.read_text().count("x") == 3
    # Between retries the loop sleeps: a handful of passes per retry, not thousands.
    assert shim.agent.passes < 60


def test_permanent_failure_waits_for_a_new_version(
    fleet: Fleet, shims: Shims, tmp_path: Path
) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", retry_base=0.05, observe_interval=0.02)
    fleet.wait_report("dev1", on_versions(1, 1))
    (shim.config.root / "out").symlink_to(tmp_path)
    fleet.publish_bundle(fleet.group("kiosk", 2, [FileResource("x", "out/x", b"x")]))
    fleet.wait_report("dev1", lambda r: r.failure is not None and r.failure.permanent)
    shim.wait_event("waiting", lambda d: "permanently" in d["why"])
    # Many passes (and many retry periods of 0.05 s) later, still one attempt.
    mark, passes = shim.count("observed"), shim.agent.passes
    wait_for(lambda: shim.count("observed") > mark + 10, what="10 observe passes")
    assert shim.agent.passes - passes <= 12  # one pass per interval: nothing spins
    fleet.publish_bundle(fleet.group("kiosk", 3, [MOTD]))
    fleet.wait_report("dev1", on_versions(3, 1))
    assert shim.count("apply-failed") == 1


# Reconcile commands.


def test_reconcile_command_accepted(fleet: Fleet, shims: Shims) -> None:
    # Polling only, once an hour: nothing but the command can heal the edit below.
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=3600, watch=False)
    fleet.wait_report("dev1", on_versions(1, 1))
    root = shim.config.root
    (root / "etc" / "motd").write_text("hand edit\n")
    fleet.publish(fleet.topics.device_command("dev1"), fleet.command("dev1", 5), retain=False)
    shim.wait_event("command", lambda d: d["seq"] == 5)
    fleet.wait_report("dev1", lambda r: statuses(r)["motd"] == "healed")
    assert (root / "etc" / "motd").read_bytes() == b"hello dev1\n"
    state = json.loads((shim.agent.store.state_path).read_text())
    assert state["command_seq"] == 5


def command_refused(fleet: Fleet, shim: Any, payload: bytes, reason: str) -> None:
    root = shim.config.root
    (root / "etc" / "motd").write_text("hand edit\n")
    seq_before = shim.agent.state.command_seq
    fleet.publish(fleet.topics.device_command("dev1"), payload, retain=False)
    fleet.wait_report(
        "dev1", lambda r: any(x.kind == "command" and x.reason == reason for x in r.refusals)
    )
    assert (root / "etc" / "motd").read_text() == "hand edit\n"  # no reconcile happened
    assert shim.agent.state.command_seq == seq_before


def test_reconcile_command_forged(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=3600, watch=False)
    fleet.wait_report("dev1", on_versions(1, 1))
    forged = fleet.command("dev1", 1, keys=[Ed25519PrivateKey.generate()])
    command_refused(fleet, shim, forged, "signature")


def test_reconcile_command_replayed(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=3600, watch=False)
    fleet.wait_report("dev1", on_versions(1, 1))
    captured = fleet.command("dev1", 3)
    mark = shim.mark()
    fleet.publish(fleet.topics.device_command("dev1"), captured, retain=False)
    shim.wait_event("command", lambda d: d["seq"] == 3, after=mark)
    shim.wait_event("observed", after=mark)  # the reconcile it asked for is done
    command_refused(fleet, shim, captured, "rollback")
    command_refused(fleet, shim, fleet.command("dev1", 2), "rollback")


def test_reconcile_command_for_another_device_or_expired(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=3600, watch=False)
    fleet.wait_report("dev1", on_versions(1, 1))
    command_refused(fleet, shim, fleet.command("dev2", 10), "wrong-target")
    command_refused(fleet, shim, fleet.command("dev1", 11, expires_in=-3600), "expired")


def test_reconcile_command_survives_a_restart(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=3600, watch=False)
    fleet.wait_report("dev1", on_versions(1, 1))
    captured = fleet.command("dev1", 4)
    mark = shim.mark()
    fleet.publish(fleet.topics.device_command("dev1"), captured, retain=False)
    shim.wait_event("command", after=mark)
    shim.wait_event("observed", after=mark)
    shim = shims.restart(shim)
    shim.wait_event("reported")
    command_refused(fleet, shim, captured, "rollback")


# The broker.


def test_keeps_enforcing_without_a_broker(fleet: Fleet, shims: Shims, broker: Any) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    shim.stop()
    # Restarted with no broker at all: it still heals from the bundles it saved.
    with_nothing = shims.restart(shim, broker=None)
    (with_nothing.config.root / "etc" / "motd").write_text("hand edit\n")
    with_nothing.wait_event("healed")
    assert (with_nothing.config.root / "etc" / "motd").read_bytes() == b"hello dev1\n"


def test_broker_restarted(fleet: Fleet, shims: Shims, broker: Any) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1")
    first = fleet.wait_report("dev1", on_versions(1, 1))
    broker.restart()
    wait_for(lambda: shim.agent.link.connects >= 2, what="reconnect")  # type: ignore[union-attr]
    # The watcher reconnects too (its own client); use a fresh one.
    watcher = Fleet(broker.host, broker.port, fleet.topics.prefix, fleet.dir / "w", fleet.key)
    try:
        again = watcher.wait_report("dev1", lambda r: r.seq > first.seq and on_versions(1, 1)(r))
        assert again.applied_group.version == 1  # type: ignore[union-attr]
        watcher.wait_presence("dev1", b"online")
        publish_pair(watcher, 2)
        watcher.wait_report("dev1", on_versions(2, 2))
    finally:
        watcher.close()


def test_broker_gone_for_a_while(fleet: Fleet, shims: Shims, broker: Any) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    broker.stop()
    wait_for(lambda: not shim.agent.link.connected, what="link down")  # type: ignore[union-attr]
    root = shim.config.root
    (root / "etc" / "motd").write_text("hand edit while offline\n")
    shim.wait_event("healed")
    assert (root / "etc" / "motd").read_bytes() == b"hello dev1\n"
    broker.start()
    watcher = Fleet(broker.host, broker.port, fleet.topics.prefix, fleet.dir / "w", fleet.key)
    try:
        for version in (2, 3, 4):
            watcher.publish_bundle(
                watcher.group(
                    "kiosk", version, [FileResource("motd", "etc/motd", b"v%d" % version)]
                )
            )
        watcher.publish_bundle(watcher.device("dev1", 2, "kiosk"))
        watcher.wait_report("dev1", on_versions(4, 2))
        assert (root / "etc" / "motd").read_bytes() == b"v4"
    finally:
        watcher.close()


def test_mqtt_3_1_1_still_works(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", mqtt_version="3.1.1")
    fleet.wait_report("dev1", on_versions(1, 1))
    fleet.publish_bundle(fleet.group("kiosk", 2, [MOTD]))
    fleet.wait_report("dev1", on_versions(2, 1))
    shim.stop()
    fleet.wait_presence("dev1", b"offline")


def test_offline_presence_on_clean_shutdown(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1")
    fleet.wait_presence("dev1", b"online")
    shim.stop()
    fleet.wait_presence("dev1", b"offline")


# Secrets.


def test_secret_setting_values_never_reach_the_logs(
    fleet: Fleet, shims: Shims, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = SettingResource("token", "api_token", "hunter2-do-not-log", secret=True)
    publish_pair(fleet, 1, resources=(secret,))
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    root = shim.config.root
    assert settings(root) == {"api_token": "hunter2-do-not-log"}
    assert stat.S_IMODE((root / ".setpoint" / "settings.json").stat().st_mode) == 0o600
    (root / ".setpoint" / "settings.json").write_text('{"api_token": "changed-by-hand"}')
    fleet.wait_report("dev1", lambda r: statuses(r)["token"] == "healed")
    assert "hunter2" not in caplog.text and "changed-by-hand" not in caplog.text
    assert "api_token" in caplog.text  # the key is fine to log
