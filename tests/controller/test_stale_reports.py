"""A report older than the one the drift engine holds (a lower ``seq``, SPEC 6.6) is dropped
and counted: a clustered engine's node back from a split or a freeze delivers what the
device sent it before it moved on. Fed messages by hand (no broker); the same path serves
the whole fleet's engine and a shard owner's."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from setpoint.controller.broker import Message
from setpoint.controller.drifting import DriftEngine, DriftSettings
from setpoint.controller.planning import Current
from setpoint.controller.rendering import Target
from setpoint.proto import bundles
from setpoint.proto.reports import Applied, Report, ResourceReport, encode
from setpoint.proto.topics import Topics, shard_of

from .test_drift_shards import RESOURCE, bundle  # the same target bundles

TOPICS = Topics("setpoint-test/stale/v1")
NOW = 1_000_000.0
DEVICE = "kiosk-01"


def report(seq: int, state: str = "ok") -> Message:
    group, own = bundle("group", "kiosks"), bundle("device", DEVICE)
    digest = bundles.resource_digest(RESOURCE) if state == "ok" else ""
    detail = "edited" if state != "ok" else ""
    body = Report(
        device=DEVICE, time=int(NOW), seq=seq, shim_version="test", group="kiosks",
        applied_group=Applied("kiosks", 1, "c1", group.content_digest()),
        applied_device=Applied(DEVICE, 1, "c1", own.content_digest()),
        resources=(ResourceReport("s", "setting", state, digest, detail),),
    )  # fmt: skip
    return Message(TOPICS.device_reported(DEVICE), encode(body), False)


def engine(**settings: object) -> DriftEngine:
    e = DriftEngine(DriftSettings(grace=300, **settings), topics=TOPICS, clock=lambda: NOW)  # type: ignore[arg-type]
    e.published(
        None,
        {
            Target("group", "kiosks"): Current(bundle("group", "kiosks"), published_at=NOW),
            Target("device", DEVICE): Current(bundle("device", DEVICE), published_at=NOW),
        },
    )
    return e


def take(e: DriftEngine, message: Message) -> str:
    """Hand ``message`` to the engine, run a pass, and give the device's state."""
    e.take_report(message)
    e.synced()
    for action in e.decide():
        e.done(action)
    return e.statuses()[DEVICE].state


def stale(e: DriftEngine) -> float:
    return e.metrics.reports_rejected.labels("stale")._value.get()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "settings",
    [{}, {"shards": frozenset({shard_of(DEVICE)}), "summaries": False}],
    ids=["fleet", "shard-owner"],
)
def test_an_older_report_is_dropped_counted_and_logged_once_in_a_row(
    settings: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    e = engine(**settings)
    assert take(e, report(10)) == "in_sync"
    caplog.set_level(logging.WARNING, logger="setpoint.controller.drifting")
    # What a node back from a freeze delivers: the device's older report (it was drifted then).
    assert take(e, report(7, "drifted")) == "in_sync"
    assert take(e, report(8, "drifted")) == "in_sync"
    assert stale(e) == 2
    assert e.statuses()[DEVICE].report_seq == 10
    logged = [r.getMessage() for r in caplog.records if "(stale)" in r.getMessage()]
    assert logged == [
        f"report from {DEVICE} not believed (stale): seq 7 is older than the seq 10 held"
    ]
    # The same report again (an equal seq) is harmless: taken, not counted.
    assert take(e, report(10)) == "in_sync"
    assert stale(e) == 2
    # A newer one is taken, and a later stale one is logged again (once).
    assert take(e, report(11, "drifted")) == "drifted"
    assert take(e, report(9)) == "drifted"
    assert stale(e) == 3
    assert len([r for r in caplog.records if "(stale)" in r.getMessage()]) == 2


def test_a_cleared_report_lets_any_seq_in_again() -> None:
    """A device reset or removed clears its retained report: what it sends next is taken
    whatever its seq (nothing is held to compare with)."""
    e = engine()
    assert take(e, report(10)) == "in_sync"
    take(e, replace(report(10), payload=b""))
    assert take(e, report(3, "drifted")) == "drifted"
    assert stale(e) == 0
