"""Commits are noticed by the watch alone, one after another, each exactly once.

How fast is measured in ``bench/commit_latency.py``, not here.
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.broker
RUNS = 10


async def test_every_commit_is_noticed_without_a_wake(
    example_repo: Any, run_controller: Any, observe: Any
) -> None:
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        for run in range(1, RUNS + 1):
            # Commits come one at a time, as people make them: everything from the previous
            # one (its events too) has been delivered before the next.
            await seen.wait(lambda r=run: len(seen.of_type("published")) >= 4 + r)
            version = seen.version("device/kiosk-01")
            commit = example_repo.commit(
                {"devices/kiosk-01.yaml": f"group: kiosks\nvars: {{n: {run}}}\n"}
            )
            # No settle() here: only the repository watch can make this happen.
            await seen.wait(lambda v=version: seen.version("device/kiosk-01") == v + 1)
            assert seen.bundle("device/kiosk-01").commit == commit
        await controller.settle(10)
    kiosk = [target for _, target, _ in seen.arrivals if target == "device/kiosk-01"]
    assert len(kiosk) == RUNS + 1  # the first publication, then one per commit
