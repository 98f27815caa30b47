"""The controller's report ingest: per-pass work bounded by what changed, no leaked coroutines.

The drift engine keeps its group summaries and its gauge as running counts, moved one
status change at a time; here they are checked against the from-scratch recount
(:meth:`DriftEngine.group_statuses`) after a real sequence of reports, presence and
clears, against a real mosquitto and a real repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from driftkit import Devices, DriftWatch, drifted_report, in_sync_report, run_drift

from setpoint.controller.broker import (
    Backoff,
    BrokerSettings,
    Connected,
    Fact,
    Link,
    Message,
    Subscription,
)
from setpoint.controller.drifting import DriftEngine
from setpoint.controller.ingesting import IngestConnection, IngestStats, Routes
from setpoint.proto import reports
from setpoint.proto.status import DRIFT_STATES
from setpoint.proto.topics import Topics
from setpoint.transport import Session, Settings

DEVICES = ("gw-01", "kiosk-01", "kiosk-02")


@pytest.fixture
def drift(broker: Any, unique_prefix: str, example_repo: Any, signing_key: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    def start(**settings: Any):  # type: ignore[no-untyped-def]
        return run_drift(
            broker, unique_prefix, example_repo, signing_key, tmp_path / "state", **settings
        )

    return start


def recounted_gauges(engine: DriftEngine) -> dict[tuple[str, str], int]:
    counts: Counter[tuple[str, str]] = Counter()
    for found in engine.statuses().values():
        counts[(found.group or "-", found.state)] += 1
    return {(g, s): counts[(g, s)] for g in ("gateways", "kiosks") for s in DRIFT_STATES}


def gauges(engine: DriftEngine) -> dict[tuple[str, str], int]:
    gauge = engine.metrics.devices
    return {
        (g, s): int(gauge.labels(g, s)._value.get())
        for g in ("gateways", "kiosks")
        for s in DRIFT_STATES
    }


def assert_counts_agree(engine: DriftEngine) -> None:
    now = 1_000.0
    reference = engine.group_statuses(now)
    assert set(reference) == {"gateways", "kiosks"}
    for group, expected in reference.items():
        assert engine._summary(group, now) == expected, group
    assert gauges(engine) == recounted_gauges(engine)


@pytest.mark.broker
async def test_running_counts_agree_with_a_recount(  # type: ignore[no-untyped-def]
    drift, broker, unique_prefix, example_repo
) -> None:
    from fleetkit import FLEET

    async with (
        DriftWatch(broker.host, broker.port, unique_prefix) as watch,
        Devices(broker.host, broker.port, unique_prefix) as devices,
        drift(grace=3600.0) as (controller, engine),
    ):
        await watch.wait(lambda: {"kiosks", "gateways"} <= set(watch.groups))
        await engine.wait_for(lambda: sum(gauges(engine).values()) == len(DEVICES))
        assert_counts_agree(engine)  # all unknown
        assert gauges(engine)[("kiosks", "unknown")] == 2
        desired = engine._fleet.desired
        for n, name in enumerate(DEVICES):
            await devices.report(in_sync_report(desired[name], seq=n + 1))
        await watch.wait(lambda: all(watch.state(d) == "in_sync" for d in DEVICES))
        await engine.wait_for(lambda: gauges(engine)[("kiosks", "in_sync")] == 2)
        assert_counts_agree(engine)
        assert engine._summary("kiosks", 0.0).converged_pct == 100.0  # type: ignore[union-attr]

        await devices.report(drifted_report(desired["kiosk-01"], 10, "motd"))
        await devices.presence("gw-01", reports.PRESENCE_OFFLINE)
        await watch.wait(watch.is_("kiosk-01", "drifted"))
        await watch.wait(watch.is_("gw-01", "offline"))
        await engine.wait_for(lambda: gauges(engine)[("gateways", "offline")] == 1)
        assert_counts_agree(engine)
        kiosks = engine._summary("kiosks", 0.0)
        assert kiosks is not None and kiosks.counts["drifted"] == 1
        assert kiosks.converged_pct == 50.0

        # A device that claims nothing yet is pending (within the grace): the oldest one
        # is named in the summary, and goes when it is no longer pending.
        await devices.report(in_sync_report(desired["kiosk-02"], 11, applied_group=None))
        await watch.wait(watch.is_("kiosk-02", "pending"))
        await engine.wait_for(lambda: gauges(engine)[("kiosks", "pending")] == 1)
        assert_counts_agree(engine)
        assert engine._summary("kiosks", 0.0).oldest_pending is not None  # type: ignore[union-attr]
        await devices.report(in_sync_report(desired["kiosk-02"], 12))
        await watch.wait(watch.is_("kiosk-02", "in_sync"))
        await engine.wait_for(lambda: gauges(engine)[("kiosks", "pending")] == 0)
        assert_counts_agree(engine)
        assert engine._summary("kiosks", 0.0).oldest_pending is None  # type: ignore[union-attr]
        await watch.wait(lambda: watch.groups["kiosks"].oldest_pending is None)

        # A commit changes a group: its version moves and the running counts follow it
        # (its member is no longer in sync on the new version; the other group is as it was).
        await devices.presence("gw-01", reports.PRESENCE_ONLINE)
        await devices.report(in_sync_report(desired["gw-01"], 13))
        await watch.wait(watch.is_("gw-01", "in_sync"))
        await watch.wait(lambda: watch.groups["gateways"].converged_pct == 100.0)
        gateways = FLEET["groups/gateways.yaml"].replace("value: 30", "value: 45")
        example_repo.commit({"groups/gateways.yaml": gateways}, "gateways: uplink 45 s")
        await controller.settle(10)
        await watch.wait(watch.is_("gw-01", "pending"))
        await watch.wait(lambda: watch.groups["gateways"].converged_pct == 0.0)
        assert_counts_agree(engine)
        assert watch.groups["kiosks"].converged_pct == 50.0


# --- The ingest connection ---------------------------------------------------------------


def test_routes_dispatch_on_the_last_level_and_match_only_when_needed() -> None:
    got: list[tuple[str, str]] = []
    routes = Routes()
    routes.add("$share/eng/a/v1/devices/+/reported", lambda t, p, r: got.append(("rep", t)))
    routes.add("a/v1/devices/+/presence", lambda t, p, r: got.append(("pres", t)))
    routes.add("b/v1/devices/+/presence", lambda t, p, r: got.append(("pres-b", t)))
    routes.dispatch("a/v1/devices/x/reported", b"", False)
    routes.dispatch("a/v1/devices/x/presence", b"", False)
    routes.dispatch("b/v1/devices/y/presence", b"", False)
    routes.dispatch("a/v1/devices/x/other", b"", False)
    assert got == [
        ("rep", "a/v1/devices/x/reported"),
        ("pres", "a/v1/devices/x/presence"),
        ("pres-b", "b/v1/devices/y/presence"),
    ]


@pytest.mark.parametrize(
    ("topic_filter", "kwargs", "message"),
    [
        ("p/devices/+/#", {}, "literal level"),
        ("p/devices/+", {}, "literal level"),
        ("p/devices/+/reported", {"no_local": True}, "no_local"),
        ("p/devices/+/reported", {"qos": 2}, "QoS 0 or 1"),
        ("$share//p/devices/+/reported", {}, "malformed shared"),
    ],
)
def test_bad_bulk_subscriptions_are_refused(topic_filter: str, kwargs: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Subscription(topic_filter, bulk=True, **kwargs)


async def test_a_bad_queue_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="max_waiting"):
        await IngestConnection.open(
            host="127.0.0.1", port=1, client_id="x", routes=Routes(), filters=[],
            barrier_topic="b", stats=IngestStats(), max_waiting=0,
        )  # fmt: skip


async def serve_link(link: Link) -> asyncio.Task[None]:
    task = asyncio.create_task(link.run())
    async with asyncio.timeout(10):
        await link.wait_connected()
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.mark.broker
async def test_bulk_routes_get_a_flood_in_order_bounded_and_the_barrier_covers_them(
    broker: Any, unique_prefix: str
) -> None:
    topics = Topics(unique_prefix)
    reported: list[tuple[str, bytes, bool]] = []
    presence: list[str] = []

    def take(fact: Fact) -> None:
        if isinstance(fact, Message):
            if topics.parse(fact.topic).kind == "device-presence":
                presence.append(fact.topic)
            else:
                reported.append((fact.topic, fact.payload, fact.retain))

    subscriptions = [
        Subscription(topics.all_reported(), bulk=True),
        Subscription(topics.all_presence(), bulk=True),
    ]
    link = Link(BrokerSettings(broker.host, broker.port), topics, subscriptions, take)
    link.ingest_max_waiting = 64
    # Retained before the controller connects: they come with the SUBSCRIBE.
    publisher = await Session.open(Settings(broker.host, broker.port, "ingest-test-pub"))
    for i in range(50):
        await publisher.publish(topics.device_reported(f"old-{i}"), b"old", qos=0, retain=True)
    await (await publisher.publish(topics.device_reported("old-last"), b"old", qos=1, retain=True))
    task = await serve_link(link)
    try:
        await link.barrier()
        assert len(reported) == 51 and all(retain for _t, _p, retain in reported)
        count = 20_000  # far more than gmqtt reads ahead of the bound (see ingesting)
        for i in range(count):
            await publisher.publish(topics.device_reported(f"d{i % 100}"), b"%d" % i)
        await (await publisher.publish(topics.device_presence("d0"), b"x", qos=1))
        await link.barrier()  # everything the broker sent before was handled
        live = reported[51:]
        assert [t for t, _p, _r in live] == [
            topics.device_reported(f"d{i % 100}") for i in range(count)
        ]
        assert [p for _t, p, _r in live] == [b"%d" % i for i in range(count)]
        assert presence == [topics.device_presence("d0")]
        # The bound held under the flood: reading paused, and never more waited than the
        # bound and what gmqtt had read before the pause (256 KiB of ~40-byte messages).
        assert link.ingest_stats.pauses >= 1
        assert link.ingest_stats.high_water <= 64 + 256 * 1024 // 40
        assert link.ingest_stats.received >= count + 51
    finally:
        publisher.close()
        await stop(task)


@pytest.mark.broker
async def test_ingest_reconnects_after_the_broker_restarts(broker: Any, unique_prefix: str) -> None:
    topics = Topics(unique_prefix)
    seen: list[bytes] = []
    link = Link(
        BrokerSettings(broker.host, broker.port),
        topics,
        [Subscription(topics.all_reported(), bulk=True)],
        lambda fact: seen.append(fact.payload) if isinstance(fact, Message) else None,
        backoff=Backoff(base=0.05, cap=0.3),
    )
    task = await serve_link(link)
    try:
        broker.restart()
        async with asyncio.timeout(15):
            await link.failed.wait()
            await link.wait_connected()
        publisher = await Session.open(Settings(broker.host, broker.port, "ingest-test-pub2"))
        await (await publisher.publish(topics.device_reported("d1"), b"after", qos=1))
        await link.barrier()
        assert seen[-1:] == [b"after"]
        publisher.close()
    finally:
        await stop(task)


@pytest.mark.broker
async def test_the_link_delivers_connection_changes_and_messages_as_facts_in_order(
    broker: Any, unique_prefix: str
) -> None:
    """One door in: Connected before anything its session brings, the session's messages
    (main and bulk connection alike), Disconnected when it ends, then a new Connected."""
    topics = Topics(unique_prefix)
    facts: list[Any] = []
    link = Link(
        BrokerSettings(broker.host, broker.port),
        topics,
        [
            Subscription(topics.all_reported(), bulk=True),
            Subscription(topics.all_group_desired()),
        ],
        facts.append,
        backoff=Backoff(base=0.05, cap=0.3),
    )
    publisher = await Session.open(Settings(broker.host, broker.port, "facts-test-pub"))
    await (await publisher.publish(topics.group_desired("g"), b"kept", qos=1, retain=True))
    task = await serve_link(link)
    try:
        await link.barrier()
        first = facts[0]
        assert isinstance(first, Connected)
        assert [(f.topic, f.retain) for f in facts[1:]] == [(topics.group_desired("g"), True)]
        broker.restart()
        async with asyncio.timeout(15):
            await link.failed.wait()
            await link.wait_connected()
        publisher.close()
        publisher = await Session.open(Settings(broker.host, broker.port, "facts-test-pub2"))
        await (await publisher.publish(topics.device_reported("d1"), b"r", qos=1))
        await link.barrier()
        kinds = [type(f).__name__ for f in facts]
        lost = kinds.index("Disconnected")
        assert kinds[lost + 1] == "Connected" and facts[lost + 1].session is not first.session
        assert isinstance(facts[-1], Message) and facts[-1].payload == b"r"
    finally:
        publisher.close()
        await stop(task)
