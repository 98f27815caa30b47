"""The controller's report ingest: per-pass work bounded by what changed, no leaked coroutines.

The drift engine keeps its group summaries and its gauge as running counts, moved one
status change at a time; here they are checked against the from-scratch recount
(:meth:`DriftEngine.group_statuses`) after a real sequence of reports, presence and
clears, against a real mosquitto and a real repository.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from driftkit import Devices, DriftWatch, drifted_report, in_sync_report, run_drift

from setpoint.controller.drifting import PUBLISH_CONCURRENCY, DriftEngine
from setpoint.controller.errors import BrokerUnavailable
from setpoint.proto import reports
from setpoint.proto.status import DRIFT_STATES

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
async def test_running_counts_agree_with_a_recount(drift, broker, unique_prefix) -> None:  # type: ignore[no-untyped-def]
    async with (
        DriftWatch(broker.host, broker.port, unique_prefix) as watch,
        Devices(broker.host, broker.port, unique_prefix) as devices,
        drift(grace=3600.0) as (_controller, engine),
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


async def test_a_failed_publication_leaves_no_coroutine_never_awaited() -> None:
    engine = DriftEngine()
    started: list[int] = []

    async def fails() -> None:
        raise BrokerUnavailable("connection lost")

    async def waits(n: int) -> None:
        started.append(n)
        await asyncio.sleep(3600)

    # More than PUBLISH_CONCURRENCY: those behind the semaphore never start.
    coros = [fails()] + [waits(n) for n in range(PUBLISH_CONCURRENCY * 2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BrokerUnavailable, match="connection lost"):
            await engine._gather(coros)
        del coros
        gc.collect()
    assert len(started) < PUBLISH_CONCURRENCY * 2  # some never started...
    never = [w for w in caught if "never awaited" in str(w.message)]
    assert never == []  # ...and none was left behind unawaited
