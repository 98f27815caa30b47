"""The shim notices hand edits through inotify, against a real mosquitto and real files.

Every shim here polls once an hour at most (``observe_interval=3600``) unless the test is
about polling: what it sees, inotify told it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from shimkit import Fleet, Shims, on_versions, statuses, wait_for

from setpoint.device_shim import DevicePolicy
from setpoint.proto import bundles
from setpoint.proto.bundles import CommandResource, FileResource, SettingResource

pytestmark = pytest.mark.broker

MOTD = FileResource("motd", "etc/motd", b"hello ${name}\n", 0o644)
TZ = SettingResource("tz", "tz", "UTC")
RENDERED = b"hello dev1\n"
HOUR = 3600.0


def publish_pair(fleet: Fleet, version: int, resources: Any = (MOTD, TZ), **group_kw: Any) -> None:
    fleet.publish_bundle(fleet.group("kiosk", version, resources, **group_kw))
    fleet.publish_bundle(fleet.device("dev1", version, "kiosk", vars={"name": "dev1"}))


def in_place(root: Path, tmp: Path) -> None:
    with open(root / "etc" / "motd", "r+b") as fh:  # same inode, same size
        fh.write(b"HELLO")


def by_rename(root: Path, tmp: Path) -> None:
    (root / "etc" / "motd.new").write_text("replaced\n")
    os.rename(root / "etc" / "motd.new", root / "etc" / "motd")


def deleted(root: Path, tmp: Path) -> None:
    (root / "etc" / "motd").unlink()


def chmoded(root: Path, tmp: Path) -> None:
    os.chmod(root / "etc" / "motd", 0o666)


def parent_removed(root: Path, tmp: Path) -> None:
    shutil.rmtree(root / "etc")


def parent_recreated(root: Path, tmp: Path) -> None:
    shutil.rmtree(root / "etc")
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text("someone else's\n")


def setting_edited(root: Path, tmp: Path) -> None:
    (root / ".setpoint" / "settings.json").write_text('{"tz": "CET"}')


@pytest.mark.parametrize(
    "edit", [in_place, by_rename, deleted, chmoded, parent_removed, parent_recreated]
)
def test_a_hand_edit_is_seen_at_once_and_healed(fleet: Fleet, shims: Shims, edit: Any) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=HOUR)
    fleet.wait_report("dev1", on_versions(1, 1))
    root = shim.config.root
    edit(root, shims.tmp)
    fleet.wait_report("dev1", lambda r: statuses(r)["motd"] == "drifted")
    fleet.wait_report("dev1", lambda r: statuses(r) == {"motd": "healed", "tz": "ok"})
    assert (root / "etc" / "motd").read_bytes() == RENDERED
    assert stat.S_IMODE((root / "etc" / "motd").stat().st_mode) == 0o644
    # It is still watched afterwards (a re-created directory is watched again).
    (root / "etc" / "motd").write_text("again\n")
    wait_for(lambda: (root / "etc" / "motd").read_bytes() == RENDERED, what="healed again")


def test_a_setting_edit_is_seen_at_once_and_healed(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=HOUR)
    fleet.wait_report("dev1", on_versions(1, 1))
    mark = shim.mark()
    setting_edited(shim.config.root, shims.tmp)
    fleet.wait_report("dev1", lambda r: statuses(r) == {"motd": "ok", "tz": "healed"})
    observed = shim.wait_event("observed", lambda d: d["drift"], after=mark)
    assert observed["paths"] == [".setpoint/settings.json"]  # only what changed was looked at


def test_a_symlink_swapped_in_is_refused_not_followed(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=HOUR)
    fleet.wait_report("dev1", on_versions(1, 1))
    root, outside = shim.config.root, shims.tmp / "outside"
    outside.write_text("not ours\n")
    (root / "etc" / "motd").unlink()
    os.symlink(outside, root / "etc" / "motd")
    report = fleet.wait_report("dev1", lambda r: statuses(r)["motd"] == "failed")
    assert "symbolic link" in next(r.detail for r in report.resources if r.id == "motd")
    assert outside.read_text() == "not ours\n"


def test_only_the_changed_resource_is_looked_at(fleet: Fleet, shims: Shims) -> None:
    files = [FileResource(f"f{i}", f"srv/f{i}.conf", b"%d\n" % i, 0o644) for i in range(50)]
    publish_pair(fleet, 1, files)
    shim = shims.start("dev1", observe_interval=HOUR)
    fleet.wait_report("dev1", on_versions(1, 1))
    observer = shim.agent.observer
    mark = shim.mark()
    (shim.config.root / "srv" / "f7.conf").write_text("edited\n")
    fleet.wait_report("dev1", lambda r: statuses(r)["f7"] == "healed")
    looks = [d["paths"] for n, d in shim.events[mark:] if n == "observed"]
    assert looks and all(paths == ["srv/f7.conf"] for paths in looks)  # never all 50
    assert observer.hashed >= 1


def test_a_burst_of_a_thousand_writes_is_one_observation_not_a_thousand_reports(
    fleet: Fleet, shims: Shims
) -> None:
    publish_pair(fleet, 1, mode="observe")
    shim = shims.start("dev1", observe_interval=HOUR)
    fleet.wait_report("dev1", on_versions(1, 1))
    mark = shim.mark()
    fd = os.open(shim.config.root / "etc" / "motd", os.O_WRONLY | os.O_APPEND)
    try:
        for _ in range(1000):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    final = bundles.resource_digest(FileResource("motd", "etc/motd", RENDERED + b"x" * 1000, 0o644))
    fleet.wait_report(
        "dev1", lambda r: any(x.id == "motd" and x.digest == final for x in r.resources)
    )
    # The shim records its "reported" event after the publish returns: the broker may
    # deliver the report to the test first.
    shim.wait_event("reported", after=mark)
    looks = sum(1 for n, _ in shim.events[mark:] if n == "observed")
    reports = sum(1 for n, _ in shim.events[mark:] if n == "reported")
    # Typically one of each; a loaded machine may pause the writer past the 20 ms settle
    # time now and then, so allow a few, far from 1,000.
    assert 1 <= looks <= 10 and 1 <= reports <= 10, (looks, reports)


def test_its_own_writes_are_not_drift(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=HOUR)
    fleet.wait_report("dev1", on_versions(1, 1))
    files = [FileResource(f"f{i}", f"etc/f{i}.conf", b"%d\n" % i, 0o640) for i in range(30)]
    mark = shim.mark()
    publish_pair(fleet, 2, [MOTD, TZ, SettingResource("lang", "lang", "de"), *files])
    fleet.wait_report("dev1", on_versions(2, 2))
    # inotify keeps the order: once a later hand edit is seen, the apply's writes were too.
    (shim.config.root / "etc" / "f3.conf").write_text("hand edit\n")
    fleet.wait_report("dev1", lambda r: statuses(r)["f3"] == "healed")
    drift = [d for n, d in shim.events[mark:] if n == "drift"]
    assert len(drift) == 1
    assert [s.resource_id for s in drift[0]["steps"]] == ["f3"]
    # The heal's own write comes back as an event too, and is no drift either.
    mark = shim.mark()
    (shim.config.root / "etc" / "motd").write_text("hand edit\n")
    fleet.wait_report("dev1", lambda r: statuses(r)["motd"] == "healed")
    drift = [d for n, d in shim.events[mark:] if n == "drift"]
    assert [[s.resource_id for s in d["steps"]] for d in drift] == [["motd"]]


def test_an_edit_during_an_apply_is_seen_after_it(fleet: Fleet, shims: Shims) -> None:
    root = shims.tmp / "root-dev1"
    root.mkdir()
    slow = CommandResource(
        "slow",
        "test -e applied",
        "touch started; while [ ! -e go ]; do sleep 0.01; done; touch applied",
        timeout=30,
    )
    publish_pair(fleet, 1, (MOTD, slow))
    shims.start(
        "dev1",
        observe_interval=HOUR,
        policy=DevicePolicy(allow_commands=True, command_timeout_cap=30),
    )
    wait_for(lambda: (root / "started").exists(), what="the apply to reach its command")
    assert (root / "etc" / "motd").read_bytes() == RENDERED  # written before the command
    (root / "etc" / "motd").write_text("edited during the apply\n")
    (root / "go").touch()
    fleet.wait_report("dev1", lambda r: on_versions(1, 1)(r) and statuses(r)["motd"] == "healed")
    assert (root / "etc" / "motd").read_bytes() == RENDERED


def test_commands_stay_on_their_interval(fleet: Fleet, shims: Shims) -> None:
    check = CommandResource("ntp", "true", "true")
    publish_pair(fleet, 1, (MOTD, check))
    shim = shims.start("dev1", observe_interval=HOUR, policy=DevicePolicy(allow_commands=True))
    fleet.wait_report("dev1", on_versions(1, 1))
    checks = shim.agent.observer.checks_run
    (shim.config.root / "etc" / "motd").write_text("hand edit\n")
    fleet.wait_report("dev1", lambda r: statuses(r)["motd"] == "healed")
    assert shim.agent.observer.checks_run == checks  # a file event runs no check


def test_edits_while_the_broker_is_down_are_healed_and_reported_when_it_is_back(
    fleet: Fleet, shims: Shims, broker: Any
) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=HOUR)
    fleet.wait_report("dev1", on_versions(1, 1))
    broker.stop()
    wait_for(lambda: not shim.agent.link.connected, what="link down")  # type: ignore[union-attr]
    root = shim.config.root
    mark = shim.mark()
    (root / "etc" / "motd").write_text("hand edit while offline\n")
    shim.wait_event("healed", after=mark)
    assert (root / "etc" / "motd").read_bytes() == RENDERED
    broker.start()
    watcher = Fleet(broker.host, broker.port, fleet.topics.prefix, fleet.dir / "w", fleet.key)
    try:
        report = watcher.wait_report("dev1", lambda r: statuses(r)["motd"] == "healed")
        assert report.observe == "inotify"
    finally:
        watcher.close()


# How it observes, said once.


def test_the_report_says_inotify_by_default_and_poll_without_it(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=HOUR)
    assert fleet.wait_report("dev1", on_versions(1, 1)).observe == "inotify"
    shim.stop()
    shims.start("dev2", watch=False)
    fleet.publish_bundle(fleet.device("dev2", 1, "kiosk", vars={"name": "dev2"}))
    assert fleet.wait_report("dev2", on_versions(1, 1)).observe == "poll"


def test_watch_limit_reached_falls_back_to_polling_and_says_so_once(
    fleet: Fleet, shims: Shims, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="setpoint.shim")
    publish_pair(fleet, 1)
    # One watch: the root fits, etc/ (and .setpoint/) do not.
    shim = shims.start("dev1", observe_interval=0.2, max_watches=1)
    report = fleet.wait_report("dev1", lambda r: on_versions(1, 1)(r) and r.observe == "poll")
    assert statuses(report) == {"motd": "ok", "tz": "ok"}
    (shim.config.root / "etc" / "motd").write_text("hand edit\n")
    fleet.wait_report("dev1", lambda r: statuses(r)["motd"] == "healed")  # by polling
    said = [r.getMessage() for r in caplog.records if "observing by polling" in r.getMessage()]
    assert said == [
        "observing by polling every 0.2s (--observe-interval): the inotify watch limit is"
        " reached (over 1 watches); raise fs.inotify.max_user_watches"
    ]
    assert shim.count("observe-method") == 1


def test_a_watcher_failing_later_hands_over_to_polling(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet, 1)
    shim = shims.start("dev1", observe_interval=0.2)
    assert fleet.wait_report("dev1", on_versions(1, 1)).observe == "inotify"
    watcher = shim.agent._watcher
    assert watcher is not None
    null = os.open(os.devnull, os.O_RDONLY)  # the descriptor fails under the reader
    os.dup2(null, watcher._inotify.fileno())
    os.close(null)
    (shim.config.root / "etc" / "motd").write_text("hand edit\n")
    fleet.wait_report("dev1", lambda r: r.observe == "poll")
    assert shim.wait_event("observe-method")["why"].startswith("the inotify watcher failed")
    wait_for(lambda: (shim.config.root / "etc" / "motd").read_bytes() == RENDERED, what="heal")
