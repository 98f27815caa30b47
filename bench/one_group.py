"""One group changed in a fleet of N: the controller's CPU per commit, as N grows.

    .venv/bin/python -m bench.one_group [--devices 100 1000 10000] [--commits 5]

For each fleet size N: a private mosquitto, a repository of N simulated devices in groups
of 100 (``sim.fleetrepo``), and the real ``setpoint controller`` (drift engine included,
as it runs by default) as a process. Once every bundle is retained, each of ``--commits``
commits changes one group's ``motd`` (``fleetrepo.bump``); the controller's user+system CPU
(``/proc/<pid>/stat``) is read before the commit and again once its ``published`` event
has arrived and the process has gone quiet (no CPU for ``QUIET`` seconds). The idle rate
measured before (the drift engine's tick) is subtracted. Devices do not report: what is
measured is the commit's cost to the controller alone (read, render, plan, sign, publish,
and the drift engine's re-evaluation of the fleet after a publication).

If the controller's work were proportional to what changed, the CPU per commit would be
the same at every N. Prints a table and appends a JSON line to ``bench/results/results.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from setpoint.sim import fleetrepo

from .common import Stack, Watcher, cpu_seconds, record, table

GROUP_SIZE = 100
QUIET = 1.5  # seconds without CPU that count as "done"
IDLE_SAMPLE = 3.0


def _event(topic: str, payload: bytes) -> Any:
    return json.loads(payload) if payload else None


async def _quiet(pid: int, idle_rate: float | None = None, timeout: float = 600.0) -> float:
    """Wait until ``pid`` is back to its idle pace (the drift engine's tick): a window of
    QUIET seconds using at most the idle rate (plus 20 ms), or, before the idle rate is
    known, two windows in a row within 20 ms of each other, under a quarter of a core.
    Its CPU seconds then."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    previous: float | None = None
    while time.monotonic() < deadline:
        await asyncio.sleep(QUIET)
        now = cpu_seconds(pid)
        used = now - last
        if idle_rate is not None and used <= idle_rate * QUIET + 0.02:
            return now
        steady = previous is not None and abs(used - previous) <= 0.02
        if idle_rate is None and steady and used <= 0.25 * QUIET:  # idle: a few % of a core
            return now
        last, previous = now, used
    raise TimeoutError("the controller did not go back to idle")


async def measure(devices: int, commits: int) -> dict[str, Any]:
    groups = max(1, devices // GROUP_SIZE)
    with tempfile.TemporaryDirectory(prefix="setpoint-bench-") as tmp:
        work = Path(tmp)
        with Stack(work, devices, groups=groups) as stack:
            startup = await stack.start_controller()
            assert stack.controller is not None
            pid = stack.controller.pid
            await _quiet(pid)
            idle0 = cpu_seconds(pid)
            await asyncio.sleep(IDLE_SAMPLE)
            idle_rate = (cpu_seconds(pid) - idle0) / IDLE_SAMPLE
            watcher = Watcher(
                stack.broker.host,
                stack.broker.port,
                [stack.topics.event("published")],
                parse=_event,
            )
            costs: list[float] = []
            async with watcher:
                for n in range(commits):
                    group = n % groups
                    before_cpu, before = cpu_seconds(pid), time.monotonic()
                    seen = len(watcher.arrivals)
                    commit = await asyncio.to_thread(
                        fleetrepo.bump, stack.repo, group, revision=n + 2
                    )
                    await watcher.until(
                        lambda c=commit, s=seen: any(
                            a[2] and a[2].get("commit") == c for a in watcher.arrivals[s:]
                        )
                    )
                    after_cpu = await _quiet(pid, idle_rate)
                    took = time.monotonic() - before
                    costs.append(max(0.0, after_cpu - before_cpu - idle_rate * took))
    return {
        "devices": devices,
        "groups": groups,
        "startup_s": round(startup, 2),
        "idle_cpu_per_s": round(idle_rate, 4),
        "cpu_per_commit_s": [round(c, 4) for c in costs],
        "cpu_per_commit_median_s": round(statistics.median(costs), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--commits", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 devices, 3 commits")
    args = parser.parse_args(argv)
    sizes, commits = ([100, 1000], 3) if args.quick else (args.devices, args.commits)
    rows = [asyncio.run(measure(n, commits)) for n in sizes]
    table(
        "one group changed in a fleet of N: controller CPU per commit",
        ["devices", "groups", "CPU per commit (median, s)", "each (s)", "idle CPU/s"],
        [
            [
                r["devices"],
                r["groups"],
                r["cpu_per_commit_median_s"],
                r["cpu_per_commit_s"],
                r["idle_cpu_per_s"],
            ]
            for r in rows
        ],
    )
    record("one_group", args.quick, {"sizes": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
