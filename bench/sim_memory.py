"""The simulator's memory per device: RSS, and with ``--trace`` where it goes.

    .venv/bin/python -m bench.sim_memory [--devices 1000] [--echo] [--trace] [--top 25]

Starts a private mosquitto and, in this process, a :class:`setpoint.sim.running.Swarm` of
``--devices`` simulated devices; measures this process's RSS before the swarm is built and
1 s after the last device is subscribed, and prints the difference per device. With
``--trace``, ``tracemalloc`` runs over the same span (it doubles the RSS, so read the
per-device RSS from a run without it) and the largest allocation sites are printed per
device, by file and by line. ``docs/performance.md`` ("The simulator") has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import tracemalloc
from pathlib import Path

from setpoint.mosquitto import Broker
from setpoint.sim.running import SimConfig, Swarm, rss_mb


async def measure(host: str, port: int, devices: int, echo: bool, trace: bool, top: int) -> None:
    gc.collect()
    if trace:
        tracemalloc.start(4)
    before = rss_mb()
    start = tracemalloc.take_snapshot() if trace else None
    swarm = Swarm(SimConfig(host, port, devices, echo=echo), lambda info: None)
    await swarm.connect_all()
    await asyncio.sleep(1.0)
    gc.collect()
    after = rss_mb()
    print(
        f"{devices:,} devices: RSS {before:.1f} MB before, {after:.1f} MB connected,"
        f" {(after - before) * 1024 / devices:.1f} KB per device;"
        f" {len(asyncio.all_tasks())} tasks"
    )
    if start is not None:
        snapshot = tracemalloc.take_snapshot()
        print(f"traced: {tracemalloc.get_traced_memory()[0] / 1024 / devices:.1f} KB per device")
        for key in ("filename", "lineno"):
            print(f"--- bytes and objects per device, by {key}")
            for stat in snapshot.compare_to(start, key)[:top]:
                print(
                    f"{stat.size_diff / devices:8.0f} B {stat.count_diff / devices:6.1f}"
                    f"  {stat.traceback[0]}"
                )
    await swarm.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--echo", action="store_true", help="the bare echo devices")
    parser.add_argument("--trace", action="store_true", help="tracemalloc: where it goes")
    parser.add_argument("--top", type=int, default=25, help="allocation sites to print")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="bench-sim-memory-") as tmp,
        Broker(Path(tmp) / "broker", autosave_changes=100_000) as broker,
    ):
        asyncio.run(
            measure(broker.host, broker.port, args.devices, args.echo, args.trace, args.top)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
