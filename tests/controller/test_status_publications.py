"""The drift engine's publications, counted by a plain subscriber on a real mosquitto: a
round publishes what changed, and reports that change nothing publish nothing."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from driftkit import Devices, DriftWatch, in_sync_report, run_drift

pytestmark = pytest.mark.broker
DEVICES = ("gw-01", "kiosk-01", "kiosk-02")


class CountingWatch(DriftWatch):
    """Counts every drift status and group status that arrives, per topic kind."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.arrived: Counter[str] = Counter()

    async def handle(self, topic: str, payload: bytes) -> None:
        if topic != self.topics.barrier(self._id):
            self.arrived[self.topics.parse(topic).kind] += 1
        await super().handle(topic, payload)


async def test_unchanged_statuses_are_not_published_again(
    broker: Any, unique_prefix: str, example_repo: Any, signing_key: Path, tmp_path: Path
) -> None:
    async with (
        CountingWatch(broker.host, broker.port, unique_prefix) as watch,
        Devices(broker.host, broker.port, unique_prefix) as devices,
        run_drift(broker, unique_prefix, example_repo, signing_key, tmp_path / "s") as (_c, engine),
    ):
        for n, name in enumerate(DEVICES):
            await devices.report(in_sync_report(engine._fleet.desired[name], seq=n + 1))
        await watch.wait(lambda: all(watch.state(d) == "in_sync" for d in DEVICES))
        await watch.wait(lambda: all(g.converged_pct == 100.0 for g in watch.groups.values()))
        await watch.barrier()
        before = Counter(watch.arrived)
        assert before["device-drift"] >= len(DEVICES) and before["group-status"] >= 1
        # The same state again, reported anew: the engine decides each device again...
        reports = engine.metrics.reports._value.get()
        for n, name in enumerate(DEVICES):
            await devices.report(in_sync_report(engine._fleet.desired[name], seq=n + 10))
        await engine.wait_for(lambda: engine.metrics.reports._value.get() >= reports + 3)
        await engine.wait_for(lambda: True)  # and one more pass after them
        await watch.barrier()
        # ...and publishes nothing: no drift status, no group summary, no event.
        assert watch.arrived == before
