"""How long from ``git commit`` to the retained bundle at a subscriber (prints; asserts little).

Run it on its own to see the figures: ``pytest tests/controller/test_latency.py -s``.
Two clocks are reported per commit: from the moment ``git commit`` is started, and from
the moment the branch ref was updated (the ref file's mtime), each to the arrival of the
new retained bundle at a separate MQTT subscriber.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest

pytestmark = pytest.mark.broker
RUNS = 10


async def test_commit_to_retained_latency(
    example_repo: Any, run_controller: Any, observe: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from_start: list[float] = []
    from_ref: list[float] = []
    ref_file = example_repo.path / ".git" / "refs" / "heads" / "main"
    async with observe() as seen, run_controller(example_repo) as controller:
        await controller.settle(10)
        for run in range(1, RUNS + 1):
            # Commits come one at a time, as people make them: everything from the previous
            # one (its events too) has been delivered before the next.
            await controller.settle(10)
            await seen.wait(lambda r=run: len(seen.of_type("published")) >= 4 + r)
            version = seen.version("device/kiosk-01")
            started = time.time()
            example_repo.commit({"devices/kiosk-01.yaml": f"group: kiosks\nvars: {{n: {run}}}\n"})
            ref_updated = ref_file.stat().st_mtime_ns / 1e9
            await seen.wait(lambda v=version: seen.version("device/kiosk-01") == v + 1)
            arrived = next(
                t for t, target, _ in reversed(seen.arrivals) if target == "device/kiosk-01"
            )
            from_start.append(arrived - started)
            from_ref.append(arrived - ref_updated)
    with capsys.disabled():
        print(
            f"\ncommit -> retained bundle over {RUNS} commits:"
            f" from `git commit` start median {statistics.median(from_start) * 1000:.1f} ms"
            f" (min {min(from_start) * 1000:.1f}, max {max(from_start) * 1000:.1f});"
            f" from the ref update median {statistics.median(from_ref) * 1000:.1f} ms"
            f" (min {min(from_ref) * 1000:.1f}, max {max(from_ref) * 1000:.1f})"
        )
    assert statistics.median(from_ref) < 1.0
