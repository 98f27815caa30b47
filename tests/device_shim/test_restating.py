"""The shim puts right a stale presence or report of its own that the broker delivers (a
clustered engine's node back from a split or a freeze publishes the old connection's will
and older report): the pure :class:`Restater`, then a real shim against a real mosquitto,
with another client publishing the stale copies."""

from __future__ import annotations

from dataclasses import replace

from shimkit import Fleet, Shims, on_versions

from setpoint.device_shim.restating import Restater
from setpoint.proto import reports
from setpoint.proto.bundles import FileResource

MOTD = FileResource("motd", "etc/motd", b"hello ${name}\n", 0o644)

# --- The decisions (no broker) ------------------------------------------------------------


def test_offline_on_its_presence_is_restated_at_most_once_per_interval() -> None:
    r = Restater(interval=5.0)
    assert r.next_at() is None and r.due(0.0) == []
    r.saw_presence(reports.PRESENCE_OFFLINE)
    assert r.next_at() == float("-inf")
    assert r.due(100.0) == ["presence"]
    assert r.due(100.0) == []  # done
    r.saw_presence(reports.PRESENCE_OFFLINE)  # a second stale will, 1 s later
    assert r.due(101.0) == [] and r.next_at() == 105.0  # waits for the interval
    assert r.due(105.0) == ["presence"]
    r.saw_presence(reports.PRESENCE_OFFLINE)
    r.saw_presence(reports.PRESENCE_ONLINE)  # its own `online` came back after it
    assert r.next_at() is None and r.due(200.0) == []


def test_a_report_is_stale_only_below_the_first_one_of_this_connection() -> None:
    r = Restater(interval=5.0)
    assert not r.saw_report(1)  # nothing sent on this connection yet: its report is on its way
    r.published(10)
    r.published(11)
    assert not r.saw_report(10)  # its own of this connection, coming back in order
    assert not r.saw_report(12)
    assert r.saw_report(9)
    assert r.due(0.0) == ["report"]
    r.want("report")  # its publication did not go out: again, after the interval
    assert r.due(1.0) == [] and r.due(5.0) == ["report"]
    r.saw_presence(reports.PRESENCE_OFFLINE)
    r.forget()  # a new connection: it publishes both anyway
    assert r.next_at() is None
    assert not r.saw_report(9)


# --- A real shim, a real mosquitto --------------------------------------------------------


def publish_pair(fleet: Fleet) -> None:
    fleet.publish_bundle(fleet.group("kiosk", 1, [MOTD]))
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk"))


def retained(fleet: Fleet) -> Fleet:
    """A new watcher: what the broker retains for the devices arrives first."""
    return Fleet(fleet.host, fleet.port, fleet.topics.prefix, fleet.dir / "retained", fleet.key)


def test_a_stale_offline_on_its_presence_is_published_online_again(
    fleet: Fleet, shims: Shims
) -> None:
    publish_pair(fleet)
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    fleet.wait_presence("dev1", b"online")
    mark = shim.mark()
    # What a node back from a split sends: the old connection's will, retained.
    fleet.publish(fleet.topics.device_presence("dev1"), reports.PRESENCE_OFFLINE)
    assert shim.wait_event("restated", after=mark) == {"what": "presence"}
    fleet.wait_presence("dev1", b"online")
    watcher = retained(fleet)
    try:
        watcher.wait_presence("dev1", b"online")
        assert watcher.presence["dev1"] == [b"online"]  # the one retained copy
    finally:
        watcher.close()


def test_a_stale_report_is_replaced_by_the_current_one(fleet: Fleet, shims: Shims) -> None:
    publish_pair(fleet)
    shim = shims.start("dev1")
    current = fleet.wait_report("dev1", on_versions(1, 1))
    # Stopped and started again: the broker's retained report and presence (`offline`,
    # from the clean stop) answer the new connection's SUBSCRIBE; they are from before it,
    # and restate nothing (the shim publishes both on every connection anyway).
    shim = shims.restart(shim)
    current = fleet.wait_report("dev1", lambda r: r.seq > current.seq)
    fleet.wait_presence("dev1", b"online")
    mark = shim.mark()
    older = replace(current, seq=current.seq - 1000, applied_group=None, applied_device=None)
    fleet.publish(fleet.topics.device_reported("dev1"), reports.encode(older))
    assert shim.wait_event("restated", after=mark) == {"what": "report"}
    again = fleet.wait_report("dev1", lambda r: r.seq > current.seq)
    assert again.applied_group == current.applied_group
    assert shim.count("restated") == 1  # only the one provoked
    watcher = retained(fleet)
    try:
        kept = watcher.wait_report("dev1", lambda r: True)
        assert kept.seq >= again.seq and kept.applied_group == current.applied_group
    finally:
        watcher.close()
