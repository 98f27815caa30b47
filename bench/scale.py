"""The fleet-size curve: what one controller costs from 1,000 to 100,000 devices.

    .venv/bin/python -m bench.scale [--sizes 1000 3000 10000 30000 100000] [--no-ingest]

For each fleet size N, as far as this machine allows (the largest size it can hold is run
in place of the first it cannot, and it says which and why it stopped):

* **commit → all in sync** and the **bare retained round** beside it, when the controller
  noticed the commit, the controller's CPU seconds from the commit to the last ``in_sync``,
  and the RSS of the controller, the broker and the simulator (``bench.converge``);
* **ingest rate**: the controller's full ingest of 2 x N reports over N device topics, against
  ``mosquitto_sub`` on the same stream (``bench.ingest``).

What limits the size: the broker holds one file descriptor per device. This process raises
its RLIMIT_NOFILE (and so the broker's and the simulator's, which inherit it) to what the
largest size needs; past the hard limit only with CAP_SYS_RESOURCE. The simulator spreads
itself over processes and source addresses by itself (``setpoint.sim.running.plan``).

Writes ``bench/results/scale.json`` (and a line in ``results.jsonl``), then draws
``docs/perf/scale.png`` (``bench.plots``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from setpoint.sim.running import raise_fd_limit

from . import converge, ingest
from .common import ENGINES, RESULTS, machine, record, table

SIZES = (1_000, 3_000, 10_000, 30_000, 100_000)
BROKER_MARGIN = 200  # descriptors besides the devices: controller, watchers, files, listeners
SCALE_JSON = RESULTS.parent / "scale.json"


@dataclass(frozen=True)
class Capacity:
    """The largest fleet one broker can hold on this machine, and why not more."""

    devices: int
    why: str

    @classmethod
    def here(cls, want: int) -> Capacity:
        limit = raise_fd_limit(want + BROKER_MARGIN)
        if limit >= want + BROKER_MARGIN:
            return cls(want, "")
        return cls(
            limit - BROKER_MARGIN,
            f"mosquitto needs a file descriptor per device and RLIMIT_NOFILE stops at"
            f" {limit:,} here (the hard limit; raising it needs CAP_SYS_RESOURCE, which this"
            " process lacks)",
        )


def plan(sizes: list[int], capacity: Capacity) -> tuple[list[tuple[int, bool]], str]:
    """The sizes to run, each marked True when it stands in for a size out of reach (the
    largest reachable), and why the curve stops (empty if it does not)."""
    out: list[tuple[int, bool]] = []
    for n in sorted(set(sizes)):
        if n <= capacity.devices:
            out.append((n, False))
            continue
        largest = capacity.devices // 1000 * 1000 or capacity.devices
        if not out or largest > out[-1][0]:
            out.append((largest, True))
        return out, f"{n:,} devices are out of reach: {capacity.why}"
    return out, ""


async def one(n: int, with_ingest: bool, engine: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-scale-{n}-") as tmp:
        row = await converge.one(Path(tmp), n, engine)
    if with_ingest:
        runs, _ = await ingest.measure(n, 2 * n, [])
        reference, controller = runs[0], runs[-1]
        row.update(
            ingest_rate=controller["rate"],
            ingest_reference_rate=reference["rate"],
            ingest_ratio=controller["ratio"],
            ingest_complete=controller["complete"],
        )
    return row


def load_average() -> list[float]:
    return [round(float(v), 2) for v in Path("/proc/loadavg").read_text().split()[:3]]


async def main_async(
    sizes: list[int], with_ingest: bool, quick: bool, engine: str = "mosquitto"
) -> dict[str, Any]:
    capacity = Capacity.here(max(sizes))
    runs, stopped = plan(sizes, capacity)
    if stopped:
        print(f"scale: {stopped}; the largest run is {runs[-1][0]:,} devices", flush=True)
    rows = []
    for n, stand_in in runs:
        before = load_average()
        try:
            row = await one(n, with_ingest, engine)
        except (TimeoutError, RuntimeError, ConnectionError) as exc:
            row = {"devices": n, "error": f"{type(exc).__name__}: {exc}"}
            stopped = stopped or f"{n:,} devices failed: {row['error']}"
        row.update(largest_reachable=stand_in, load_before=before, load_after=load_average())
        print(f"  {n:,} devices: {row}", flush=True)
        rows.append(row)
        if "error" in row:
            break
    ok = [r for r in rows if "error" not in r]
    table(
        "Fleet-size curve (commit -> last device in_sync; bare = retained round, same broker)",
        ["devices", "bare s", "setpoint s", "ratio", "noticed s", "ctl CPU s", "ingest /s",
         "ingest vs sub", "ctl MB", "broker MB", "sim MB"],
        [[r["devices"], r["bare_s"], r["converged_s"], r["ratio"], r["noticed_s"],
          r["controller_cpu_s"], r.get("ingest_rate", "-"), r.get("ingest_ratio", "-"),
          r["controller_rss_mb"], r["broker_rss_mb"], r["sim_rss_mb"]] for r in ok],
    )  # fmt: skip
    if stopped:
        print(f"stopped: {stopped}", flush=True)
    result = {
        "sizes_asked": sorted(set(sizes)),
        "engine": engine,
        "largest": ok[-1]["devices"] if ok else None,
        "stopped": stopped,
        "capacity": {"devices": capacity.devices, "why": capacity.why},
        "runs": rows,
    }
    entry = record("scale", quick, result)
    SCALE_JSON.write_text(json.dumps({**result, "machine": machine(), "time": entry["time"],
                                      "commit": entry["commit"]}, indent=1) + "\n")  # fmt: skip
    from . import plots

    made = plots.scale()
    if made is not None:
        print(f"wrote {made}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(SIZES),
        help="fleet sizes (default: 1,000 3,000 10,000 30,000 100,000)",
    )  # fmt: skip
    parser.add_argument("--no-ingest", action="store_true", help="skip the ingest runs")
    parser.add_argument(
        "--engine", choices=ENGINES, default="mosquitto",
        help="the broker of the convergence runs (bench.converge --engine; default: mosquitto"
        " with the benchmark settings, saving every 100,000 changes)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="recorded as a quick run")
    args = parser.parse_args(argv)
    if min(args.sizes) < 1:
        parser.error("--sizes: every size must be at least 1 device")
    asyncio.run(main_async(args.sizes, not args.no_ingest, args.quick, args.engine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
