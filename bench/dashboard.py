"""The dashboard at fleet scale: devices page time per page and the dashboard's RSS.

    python -m bench.dashboard [--devices 10000] [--requests 30] [--quick]

A real fleet: a private mosquitto, a repository of N simulated devices in 4 groups, the real
controller, ``setpoint sim`` (verifying, applying, reporting, with hand-made drift at
``--drift-rate`` per second so statuses keep changing) and the real ``setpoint dashboard``
with one live stream open (as a browser on the devices page would have). Once the dashboard
shows every device, each devices-page query below is requested ``--requests`` times, one
after the other, over HTTP; the table gives p50/p99/max milliseconds per page (50 rows),
and the dashboard's RSS before and after. Appends a JSON line to bench/results/results.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .common import (
    SETPOINT,
    Stack,
    percentile,
    record,
    rss_mb,
    start_sim,
    stop,
    table,
)

QUERIES = {
    "first page (worst state first)": "devices",
    "page 100": "devices?page=100",
    "sorted by since, descending": "devices?sort=since&order=desc",
    "filter state=in_sync": "devices?state=in_sync&page=20",
    "filter group + text": "devices?group=sim-g1&q=sim-0",
    "fleet page": "",
}
READY_TIMEOUT = 600.0


def get(url: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read().decode()
    return time.perf_counter() - t0, body


def matched(url: str, query: str) -> int:
    found = re.search(r'<span id="matched">(\d+)</span>', get(url + query)[1])
    return int(found.group(1)) if found else 0


def start_dashboard(stack: Stack, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [SETPOINT, "dashboard", "--broker", stack.broker.url, "--prefix", stack.prefix,
         "--listen", "127.0.0.1:0"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"setpoint dashboard: (http://\S+)", log.read_text())
        if found:
            return proc, found.group(1)
        time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"the dashboard did not start: {log.read_text()}")


async def run(devices: int, requests: int, drift_rate: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        work = Path(tmp)
        with Stack(work, devices, groups=4) as stack:
            await stack.start_controller()
            dashboard, url = start_dashboard(stack, work / "dashboard.log")
            stream = subprocess.Popen(
                ["curl", "-sN", url + "stream?page=devices"], stdout=subprocess.DEVNULL
            )
            sim = start_sim(
                stack.broker.url, devices, "--trust", str(stack.pub), "--prefix", stack.prefix,
                "--drift-rate", str(drift_rate),
            )  # fmt: skip
            try:
                started = time.monotonic()
                while (
                    matched(url, "devices") < devices
                    or matched(url, "devices?state=in_sync") < devices * 0.9
                ):
                    if time.monotonic() - started > READY_TIMEOUT:
                        raise RuntimeError("the fleet did not converge in the dashboard")
                    await asyncio.sleep(1.0)
                shown = matched(url, "devices")
                rss_before = rss_mb(dashboard.pid)
                rows = []
                for name, query in QUERIES.items():
                    times = [get(url + query)[0] * 1000 for _ in range(requests)]
                    rows.append(
                        [name, round(percentile(times, 0.5), 1), round(percentile(times, 0.99), 1),
                         round(max(times), 1)]
                    )  # fmt: skip
                rss_after = rss_mb(dashboard.pid)
            finally:
                sim.stop()
                with contextlib.suppress(Exception):
                    stream.terminate()
                    stream.wait(10)
                stop(dashboard)
    table(
        f"devices page, {shown:,} devices in the dashboard, {requests} requests each,"
        f" drift {drift_rate}/s (ms)",
        ["query", "p50", "p99", "max"],
        rows,
    )
    print(f"dashboard RSS: {rss_before:.1f} MB with the fleet loaded, {rss_after:.1f} MB after")
    return {
        "devices": devices,
        "shown": shown,
        "requests": requests,
        "drift_rate": drift_rate,
        "pages_ms": {r[0]: {"p50": r[1], "p99": r[2], "max": r[3]} for r in rows},
        "rss_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--drift-rate", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="2,000 devices, 10 requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.requests = 2_000, 10
    results = asyncio.run(run(args.devices, args.requests, args.drift_rate))
    record("dashboard", args.quick, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
