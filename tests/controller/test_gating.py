"""The pure rollout decisions: ring validation, gate evidence, batches, windows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from setpoint.controller import fleet, gating
from setpoint.controller.gating import BatchPolicy, Gate, RingHealth
from setpoint.controller.trees import DirectoryTree
from setpoint.proto.status import DriftStatus


def load(tmp_path: Path, files: dict[str, str]) -> fleet.Snapshot:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return fleet.load(DirectoryTree(tmp_path))


RINGS = "rings:\n  - branch: main\n  - branch: canary\n    gate: {from: main}\n"


def test_rings_validate(tmp_path: Path) -> None:
    snap = load(tmp_path, {"fleet.yaml": RINGS, "groups/kiosks.yaml": "mode: enforce\n"})
    assert snap.ok
    assert snap.settings is not None
    ring = snap.settings.ring_list().get("canary")
    assert ring is not None and ring.gate == Gate("main", 1.0, 0, 0, False)


def test_gate_from_unknown_branch_is_refused(tmp_path: Path) -> None:
    text = "rings:\n  - branch: main\n  - branch: production\n    gate: {from: canry}\n"
    snap = load(tmp_path, {"fleet.yaml": text})
    [problem] = snap.problems
    assert problem.file == "fleet.yaml"
    assert "gate 'from: canry' names a branch that is not a ring" in problem.message


def test_gate_cycle_is_refused(tmp_path: Path) -> None:
    text = (
        "rings:\n  - branch: canary\n    gate: {from: production}\n"
        "  - branch: production\n    gate: {from: canary}\n"
    )
    snap = load(tmp_path, {"fleet.yaml": text})
    [problem] = snap.problems
    assert "gates make a cycle" in problem.message


def test_gate_from_itself_and_duplicate_ring_are_refused(tmp_path: Path) -> None:
    text = "rings:\n  - branch: main\n  - branch: main\n    gate: {from: main}\n"
    [problem] = load(tmp_path, {"fleet.yaml": text}).problems
    assert "declared twice" in problem.message and "its own ring" in problem.message


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        ("{batch: 0}", "at least 1 device"),
        ("{batch: '150%'}", "out of range"),
        ("{on_failure: explode}", "on_failure"),
        ("{pause: soon}", "is not a duration"),
    ],
)
def test_bad_rollout_specs_are_refused(tmp_path: Path, rollout: str, message: str) -> None:
    snap = load(tmp_path, {"groups/g.yaml": f"rollout: {rollout}\n"})
    [problem] = snap.problems
    assert message in problem.message and problem.file == "groups/g.yaml"


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ("{days: [someday]}", "day 'someday' is unknown"),
        ("{hours: '9-5'}", "write them like"),
        ("{tz: Mars/Olympus}", "time zone 'Mars/Olympus' is unknown"),
    ],
)
def test_bad_windows_are_refused(tmp_path: Path, window: str, message: str) -> None:
    [problem] = load(tmp_path, {"groups/g.yaml": f"window: {window}\n"}).problems
    assert message in problem.message


def status(device: str, state: str, applied: int | None, desired: int = 2) -> DriftStatus:
    return DriftStatus(device, "g", state, desired, applied, "c", 0.0)  # type: ignore[arg-type]


def test_ring_health_counts_in_sync_on_the_published_version() -> None:
    statuses = {
        "a": status("a", "in_sync", 2),
        "b": status("b", "pending", 1),
        "c": status("c", "failed", 1),
    }
    health = gating.ring_health("main", {"g": (2, "t")}, {"a": "g", "b": "g", "c": "g"}, statuses)
    assert health == RingHealth("main", "t", 3, 1, (("c", "failed", ""),))
    assert gating.ring_health("main", {"g": (2, "t"), "h": (1, "u")}, {}, statuses) is None


def test_gate_waits_then_passes_after_healthy_for() -> None:
    gate = Gate("main", in_sync=1.0, healthy_for=30)
    sick = RingHealth("main", "t", 2, 1)
    well = RingHealth("main", "t", 2, 2)
    ev = gating.track(None, gate, sick, 100.0)
    decision = gating.decide_gate("canary", gate, "t", ev, approved=False, now=100.0)
    assert decision.state == "waiting" and "1/2 devices in sync on main" in decision.reason
    ev = gating.track(ev, gate, well, 110.0)
    decision = gating.decide_gate("canary", gate, "t", ev, approved=False, now=120.0)
    assert decision.state == "waiting" and decision.until == 140.0
    ev = gating.track(ev, gate, sick, 130.0)  # a relapse restarts the clock
    assert ev.healthy_since is None
    ev = gating.track(ev, gate, well, 131.0)
    ev = gating.track(ev, gate, well, 161.0)
    assert ev.passed_at == 161.0
    assert gating.decide_gate("canary", gate, "t", ev, approved=False, now=161.0).open
    # Once passed it stays passed (a rollback to it must not wait).
    assert gating.track(ev, gate, sick, 200.0).passed_at == 161.0


def test_content_that_never_ran_is_refused() -> None:
    decision = gating.decide_gate("production", Gate("canary"), "abc", None, approved=True, now=1)
    assert decision.state == "refused" and "never ran on canary" in decision.reason


def test_approval_is_required_when_the_gate_says_so() -> None:
    gate = Gate("canary", approval=True)
    ev = gating.track(None, gate, RingHealth("canary", "t", 1, 1), 5.0)
    waiting = gating.decide_gate("production", gate, "t", ev, approved=False, now=5.0)
    assert waiting.state == "waiting" and "approval" in waiting.reason
    assert gating.decide_gate("production", gate, "t", ev, approved=True, now=5.0).open


def test_unhealthy_beyond_threshold_blocks() -> None:
    gate = Gate("main", in_sync=0.5, max_unhealthy=0)
    health = RingHealth("main", "t", 2, 1, (("b", "drifted", "x"),))
    ev = gating.track(None, gate, health, 1.0)
    decision = gating.decide_gate("canary", gate, "t", ev, approved=False, now=1.0)
    assert decision.state == "waiting" and "1 unhealthy on main" in decision.reason


def test_batches_by_count_share_order_and_var() -> None:
    devices = {f"d{i}": {"wave": 3 - i % 3} for i in range(5)}
    assert gating.plan_batches(devices, BatchPolicy(size=2)) == [
        ("d0", "d1"),
        ("d2", "d3"),
        ("d4",),
    ]
    assert len(gating.plan_batches(devices, BatchPolicy(share=0.5))) == 2
    ordered = gating.plan_batches(devices, BatchPolicy(size=1, order=("d3",), by="wave"))
    assert ordered[0] == ("d3",) and ordered[1] == ("d2",)
    assert gating.plan_batches({}, BatchPolicy(size=1)) == []


def test_batch_outcome_offline_rule() -> None:
    statuses = {
        "a": status("a", "in_sync", 2),
        "b": status("b", "offline", 1),
        "c": status("c", "failed", 1),
    }
    outcome = gating.assess_batch(["a", "b"], 2, statuses)
    assert outcome.offline == ("b",) and not outcome.failed
    assert not outcome.complete(2, 1.0)  # 100%: waits for the offline device
    assert outcome.complete(2, 0.5)  # 50%: goes on without it
    assert gating.assess_batch(["a", "c"], 2, statuses).halts(0)
    assert not gating.assess_batch(["a", "c"], 2, statuses).halts(1)


def test_window_over_midnight_in_a_time_zone() -> None:
    window = gating.parse_window(["mon"], "22:00-04:00", "Europe/Berlin")
    berlin = dt.timezone(dt.timedelta(hours=1))  # January: CET
    monday_23 = dt.datetime(2024, 1, 15, 23, 0, tzinfo=berlin).timestamp()
    tuesday_03 = dt.datetime(2024, 1, 16, 3, 0, tzinfo=berlin).timestamp()
    tuesday_05 = dt.datetime(2024, 1, 16, 5, 0, tzinfo=berlin).timestamp()
    assert window.contains(monday_23) and window.contains(tuesday_03)
    assert not window.contains(tuesday_05)
    next_monday_22 = dt.datetime(2024, 1, 22, 22, 0, tzinfo=berlin).timestamp()
    assert window.next_open(tuesday_05) == next_monday_22


def test_urgent_marker() -> None:
    assert gating.is_urgent("[urgent] fix the certificate")
    assert not gating.is_urgent("routine change")
