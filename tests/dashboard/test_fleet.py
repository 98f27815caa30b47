"""The dashboard's fleet model: messages in, pages out. Pure; no broker."""

from __future__ import annotations

import pytest

from setpoint.dashboard.fleet import HISTORY_SECONDS, DeviceQuery, Fleet, summary
from setpoint.proto import rollout_status, status
from setpoint.proto.repository import BranchStatus, RepositoryStatus
from setpoint.proto.status import DriftStatus, GroupStatus, ResourceDiff
from setpoint.proto.topics import Topics

T = Topics("setpoint/v1")
NOW = 1_800_000_000.0


def drift(device: str, state: str = "in_sync", group: str = "kiosks", **kw: object) -> bytes:
    return DriftStatus(device, group, state, 1, 1, "c0ffee", NOW - 10, **kw).to_json()  # type: ignore[arg-type]


def fleet_of(n: int) -> Fleet:
    fleet = Fleet(T)
    for i in range(n):
        state = ("in_sync", "drifted", "failed", "pending")[i % 4]
        group = "kiosks" if i % 2 else "gateways"
        fleet.take(T.device_drift(f"dev-{i:05d}"), drift(f"dev-{i:05d}", state, group), NOW)
    return fleet


def test_devices_are_paged_on_the_server_and_never_all_returned() -> None:
    fleet = fleet_of(10_000)
    page = fleet.devices(DeviceQuery(per_page=50, page=3, sort="device"))
    assert page.total == 10_000 and page.pages == 200 and len(page.rows) == 50
    assert page.rows[0].device == "dev-00100"
    last = fleet.devices(DeviceQuery(per_page=50, page=999, sort="device"))
    assert last.page == 200 and last.rows[-1].device == "dev-09999"


def test_filters_by_state_group_and_text() -> None:
    fleet = fleet_of(100)
    fleet.take(
        T.device_drift("odd-one"),
        drift("odd-one", "drifted", "gateways", resources=(ResourceDiff("motd", "edited"),)),
        NOW,
    )
    drifted = fleet.devices(DeviceQuery(state="drifted"))
    assert drifted.total == 26 and {d.state for d in drifted.rows} == {"drifted"}
    both = fleet.devices(DeviceQuery(state="drifted", group="gateways"))
    assert {d.group for d in both.rows} == {"gateways"}
    assert [d.device for d in fleet.devices(DeviceQuery(text="MOTD")).rows] == ["odd-one"]


def test_sort_by_state_puts_the_worst_first_and_can_reverse() -> None:
    fleet = fleet_of(8)
    states = [d.state for d in fleet.devices(DeviceQuery()).rows]
    assert states[:2] == ["failed", "failed"] and states[-2:] == ["in_sync", "in_sync"]
    reverse = [d.state for d in fleet.devices(DeviceQuery(descending=True)).rows]
    assert reverse == states[::-1]


def test_a_query_from_a_url_never_fails() -> None:
    q = DeviceQuery.from_params(
        {"state": "<bogus>", "sort": "x", "page": "-3", "per_page": "99999", "q": " a "}
    )
    assert (q.state, q.sort, q.page, q.per_page, q.text) == ("", "state", 1, 500, "a")
    assert DeviceQuery.from_params({"page": "nan"}).page == 1
    assert q.params(page=2) == {"q": "a", "page": "2", "per_page": "500"}


def test_bad_and_foreign_messages_are_counted_not_fatal() -> None:
    fleet = Fleet(T)
    assert fleet.take(T.device_drift("a"), b"{not json", NOW) is None
    assert fleet.take(T.device_drift("a"), drift("b"), NOW) is None  # names another device
    assert "device 'b'" in fleet.last_ignored
    other = rollout_status.rollout_to_json(rollout_status.RolloutStatus("other", "main", "idle"))
    assert fleet.take(T.group_rollout("g"), other, NOW) is None
    assert fleet.ignored == 3 and "not a rollout status for 'g'" in fleet.last_ignored
    assert fleet.take(T.group_rollout("g"), b'{"group": "g"}', NOW) is None  # read by the codec
    assert fleet.ignored == 4 and "'branch' is missing" in fleet.last_ignored
    assert fleet.take("elsewhere/topic", b"x", NOW) is None


def test_empty_retained_messages_clear() -> None:
    fleet = fleet_of(2)
    fleet.take(T.device_drift("dev-00000"), b"", NOW)
    assert set(fleet.drift) == {"dev-00001"}
    fleet.take(T.repository_status(), RepositoryStatus({}).to_json(), NOW)
    assert fleet.repository is not None
    fleet.take(T.repository_status(), b"", NOW)
    assert fleet.repository is None


def test_events_are_kept_up_to_a_limit_and_changes_name_the_device() -> None:
    fleet = Fleet(T, events_kept=3)
    for i in range(5):
        change = fleet.take(
            T.event("drift"), status.event("drift", NOW + i, device=f"d{i}", state="drifted"), NOW
        )
    assert change is not None and change.device == "d4"
    assert [e["device"] for e in fleet.events] == ["d2", "d3", "d4"]
    assert fleet.device_events("d3")[0]["time"] == NOW + 3


def test_rings_come_in_promotion_order_with_their_groups() -> None:
    fleet = Fleet(T)
    for ring, source in (("production", "canary"), ("canary", "main")):
        gate = rollout_status.GateStatus(
            ring, source, "c" * 40, "t" * 40, "waiting", rollout_status.GateRule(source),
            missing=("x",),
        )  # fmt: skip
        fleet.take(T.ring_gate(ring), rollout_status.gate_to_json(gate), NOW)
    for group, branch in (("lobby", "canary"), ("qa", "main"), ("all", "production")):
        rollout = rollout_status.RolloutStatus(group, branch, "idle")
        fleet.take(T.group_rollout(group), rollout_status.rollout_to_json(rollout), NOW)
    rings = fleet.rings()
    assert [r[0] for r in rings] == ["main", "canary", "production"]
    assert rings[0][1] is None and [g["group"] for g in rings[1][2]] == ["lobby"]


def test_convergence_history_is_a_step_line_over_the_last_hour() -> None:
    fleet = Fleet(T)
    for t, pct in ((NOW - 2 * HISTORY_SECONDS, 10.0), (NOW - 600, 50.0), (NOW - 300, 100.0)):
        group = GroupStatus("kiosks", 1, "c0ffee", "enforce", 2, {}, pct, None, t)
        fleet.take(T.group_status("kiosks"), group.to_json(), t)
    ((name, points),) = fleet.chart(NOW, width=600, height=100)
    xy = [tuple(map(float, p.split(","))) for p in points.split()]
    assert name == "kiosks"
    assert xy[0] == (0.0, 90.0)  # the line starts at the hour's start, at the old value
    assert xy[-1] == (600.0, 0.0)  # and ends now at 100 %
    assert len(fleet.history["kiosks"]) == 3  # the old point is kept: it starts the line


def test_counts_and_summaries() -> None:
    fleet = fleet_of(4)
    assert fleet.counts()["failed"] == 1 and fleet.counts()["blocked"] == 0
    line = summary({"type": "drift", "device": "d", "previous": None, "state": "drifted",
                    "resources": [{"id": "motd", "why": "edited"}]})  # fmt: skip
    assert line == ("d", "(new) → drifted: motd (edited)")
    assert summary({"type": "rollout", "group": "g", "action": "paused"}) == ("g", "paused")
    repo = RepositoryStatus({"main": BranchStatus("main", "ab" * 20, True, NOW)})
    assert fleet.take(T.repository_status(), repo.to_json(), NOW) is not None


@pytest.mark.parametrize("sort", ["device", "group", "state", "since", "last_seen"])
def test_every_sort_works(sort: str) -> None:
    page = fleet_of(20).devices(DeviceQuery(sort=sort, per_page=5))
    assert len(page.rows) == 5
