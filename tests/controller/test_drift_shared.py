"""Two drift engines sharing the report stream (``DriftSettings(share=...)``), fed messages
by hand in the orders the broker's connections can deliver them (pure, no broker).

A controller takes reports on its ingest connection and the other engine's statuses on its
main connection: nothing orders the two, and a status queued on the main connection can be
handed over after the engine's own, newer, publication for the same device was
acknowledged. ``report_seq`` says whose status is newer (SPEC: "lets several controllers
tell whose view is newer").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from driftkit import drifted_report, in_sync_report

from setpoint.controller.broker import Message
from setpoint.controller.detecting import ShowDrift
from setpoint.controller.drifting import DriftEngine, DriftSettings
from setpoint.controller.planning import Current
from setpoint.controller.rendering import Target
from setpoint.proto.bundles import Bundle, SettingResource
from setpoint.proto.reports import Report, encode
from setpoint.proto.status import DriftStatus
from setpoint.proto.topics import Topics

TOPICS = Topics("setpoint-test/shared/v1")
NOW = 1_800_000_000.0
DEVICE = "kiosk-01"


def bundle(target: Target) -> Bundle:
    extra = {"group": "kiosks"} if target.kind == "device" else {}
    return Bundle(
        kind=target.kind,
        target=target.id,
        version=1,
        commit="c1",
        issued_at=0,
        expires_at=int(NOW) + 86_400,
        resources=(SettingResource("motd", "motd", "hello"),),
        **extra,
    )


def engine() -> DriftEngine:
    """A synced engine in shared mode that published kiosks v1 and kiosk-01's v1."""
    made = DriftEngine(DriftSettings(share="drift", grace=300), topics=TOPICS, clock=lambda: NOW)
    made.published(
        None,
        {t: Current(bundle(t), "Alice", "main", NOW) for t in (Target("group", "kiosks"),
                                                             Target("device", DEVICE))},
    )  # fmt: skip
    made.synced()
    step(made)
    return made


def step(engine: DriftEngine, *, tick: bool = False) -> list[ShowDrift]:
    """One drift pass, every action acknowledged; the statuses it published."""
    actions = engine.decide(tick=tick)
    for action in actions:
        engine.done(action)
    return [a for a in actions if isinstance(a, ShowDrift)]


def report(engine: DriftEngine, report: Report) -> None:
    engine.take_report(Message(TOPICS.device_reported(DEVICE), encode(report), False))


def status_of(engine: DriftEngine) -> DriftStatus:
    return engine.statuses()[DEVICE]


def test_a_status_older_than_ours_arriving_late_does_not_replace_ours() -> None:
    a, b = engine(), engine()
    desired = a._fleet.desired[DEVICE]
    # a takes report 1 and publishes in_sync; b takes report 2 (drifted) before a's
    # status reached it, and publishes drifted.
    report(a, in_sync_report(desired, 1))
    [from_a] = step(a)
    report(b, drifted_report(desired, 2, "motd"))
    [from_b] = step(b)
    assert (from_a.new.state, from_b.new.state) == ("in_sync", "drifted")
    # a's status, queued on b's other connection, is handed over now: older news.
    taken = b.take_drift(Message(TOPICS.device_drift(DEVICE), from_a.new.to_json(), False))
    assert taken is None
    assert status_of(b) == from_b.new  # what the broker holds: b's, published after a's
    # Everything decided again (as after a reconnect): nothing to publish, no event.
    b.interrupted()
    assert step(b) == []
    # The device puts it back: b resolves the drift it published.
    report(b, in_sync_report(desired, 3))
    [resolved] = step(b)
    assert (resolved.old, resolved.new.state) == (from_b.new, "in_sync")
    # a takes b's statuses as they come: newer than its own.
    for status in (from_b.new, resolved.new):
        a.take_drift(Message(TOPICS.device_drift(DEVICE), status.to_json(), False))
        assert status_of(a) == status


def test_a_status_from_the_same_report_or_without_one_is_taken() -> None:
    a, b = engine(), engine()
    desired = a._fleet.desired[DEVICE]
    report(a, in_sync_report(desired, 5))
    [in_sync] = step(a)
    report(b, in_sync_report(desired, 5))
    step(b)
    # The same report, another condition (say a saw its will: offline): taken.
    offline = DriftStatus(**{**_fields(in_sync.new), "state": "offline", "reason": "offline"})
    assert b.take_drift(Message(TOPICS.device_drift(DEVICE), offline.to_json(), False))
    assert status_of(b) == offline
    # A status decided from no report at all (its report was cleared): taken.
    unknown = DriftStatus(**{**_fields(in_sync.new), "state": "unknown", "report_seq": None})
    assert b.take_drift(Message(TOPICS.device_drift(DEVICE), unknown.to_json(), False))
    assert status_of(b) == unknown


def _fields(found: DriftStatus) -> dict[str, object]:
    return {name: getattr(found, name) for name in found.__dataclass_fields__}
