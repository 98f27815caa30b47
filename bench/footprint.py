"""Footprint: what the shim costs a device, idle and during an apply.

    .venv/bin/python -m bench.footprint [--idle 60] [--quick] [--poll]

A private mosquitto, a controller and one real ``setpoint shim`` (a subprocess, the way a
device runs it, with its default flags; ``--poll``: the old defaults, ``--no-watch
--observe-interval 5``) on a device of an enforce group. Once the shim has applied and
reported:

* **idle**: RSS and CPU (user + system, from ``/proc``) over ``--idle`` seconds (quick: 10);
* **apply**: a commit changes the group; RSS peak (sampled every 10 ms) and CPU from the
  commit to the report of the new version;
* **imports**: RSS of a bare Python and of a Python that only imports what the shim
  imports, to show where the memory goes.

Controller and broker RSS at 10,000 devices come from ``bench.converge``.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from setpoint.proto import reports
from setpoint.sim import fleetrepo

from .common import (
    SETPOINT,
    SHIM_POLL_FLAGS,
    Stack,
    Watcher,
    cpu_seconds,
    record,
    rss_mb,
    sampling,
    stop,
    table,
)

DEVICE = "sim-00000"


def import_rss(code: str) -> float:
    """RSS (MB) of a fresh interpreter after running ``code``."""
    probe = (
        f"{code}\nfor line in open('/proc/self/status'):\n"
        "    if line.startswith('VmRSS:'): print(int(line.split()[1]) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


async def main_async(idle: float, quick: bool, poll: bool = False) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp,
        Stack(Path(tmp), 1) as stack,
    ):
        await stack.start_controller()
        version: dict[str, int] = {}

        def parse(topic: str, payload: bytes) -> None:
            if payload:
                report = reports.decode(payload)
                if report.applied_group is not None:
                    version["group"] = report.applied_group.version

        watcher = Watcher(
            stack.broker.host, stack.broker.port, [stack.topics.device_reported(DEVICE)],
            parse=parse, keep_arrivals=False,
        )  # fmt: skip
        async with watcher:
            (Path(tmp) / "root").mkdir()
            shim = subprocess.Popen(
                [SETPOINT, "shim", "--device", DEVICE, "--broker", stack.broker.url,
                 "--trust", str(stack.pub), "--root", str(Path(tmp) / "root"),
                 "--state-dir", str(Path(tmp) / "shim-state"), "--log-level", "WARNING",
                 *(SHIM_POLL_FLAGS if poll else ())],
            )  # fmt: skip
            try:
                await watcher.until(lambda: version.get("group") == 1, 60)
                await asyncio.sleep(1.0)  # let the first report and observation pass settle
                rss_start, cpu_start, t_start = rss_mb(shim.pid), cpu_seconds(shim.pid), time.time()
                await asyncio.sleep(idle)
                cpu_idle = cpu_seconds(shim.pid) - cpu_start
                wall = time.time() - t_start
                rss_idle = rss_mb(shim.pid)
                cpu0, t0 = cpu_seconds(shim.pid), time.time()
                with sampling(shim.pid, 0.01) as samples:
                    fleetrepo.bump(stack.repo, group=0, revision=2)
                    await watcher.until(lambda: version.get("group") == 2, 60)
                apply_s = time.time() - t0
                cpu_apply = cpu_seconds(shim.pid) - cpu0
                rss_peak = max([rss_mb(shim.pid), *samples])
            finally:
                stop(shim)
    bare = import_rss("pass")
    shim_imports = import_rss("import setpoint.commands.shim, setpoint.device_shim.agent")
    result = {
        "shim_flags": " ".join(SHIM_POLL_FLAGS) if poll else "defaults",
        "idle_seconds": round(wall, 1),
        "shim_rss_idle_mb": round(rss_idle, 1),
        "shim_rss_start_mb": round(rss_start, 1),
        "shim_cpu_idle_pct": round(100 * cpu_idle / wall, 3),
        "shim_rss_apply_peak_mb": round(rss_peak, 1),
        "shim_cpu_apply_s": round(cpu_apply, 3),
        "commit_to_applied_s": round(apply_s, 3),
        "python_bare_rss_mb": round(bare, 1),
        "python_shim_imports_rss_mb": round(shim_imports, 1),
    }
    table(
        f"Footprint: one setpoint shim ({result['shim_flags']})",
        ["measure", "value"],
        [
            [f"idle RSS (after {wall:.0f} s)", f"{rss_idle:.1f} MB"],
            [f"idle CPU over {wall:.0f} s", f"{100 * cpu_idle / wall:.3f} % of a core"],
            ["RSS peak during an apply", f"{rss_peak:.1f} MB"],
            [
                "CPU for the apply",
                f"{cpu_apply * 1000:.0f} ms" if cpu_apply else "< 10 ms (1 tick)",
            ],
            ["commit to new version reported", f"{apply_s:.2f} s"],
            ["bare python3 RSS", f"{bare:.1f} MB"],
            ["python3 + the shim's imports", f"{shim_imports:.1f} MB"],
        ],
    )
    record("footprint_poll" if poll else "footprint", quick, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=None, help="idle seconds (default 60)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--poll", action="store_true", help="the shim's old defaults: no inotify, 5 s polls"
    )
    args = parser.parse_args(argv)
    idle = args.idle if args.idle is not None else (10.0 if args.quick else 60.0)
    asyncio.run(main_async(idle, args.quick, args.poll))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
