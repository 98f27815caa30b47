"""Run every benchmark: ``python -m bench`` (``make bench``) or ``python -m bench --quick``
(``make bench-quick``, under five minutes on a 2-core machine).

Each benchmark prints its table and appends a JSON line to ``bench/results/results.jsonl``;
then the plots of ``docs/performance.md`` are redrawn. ``--only`` picks some of them.

* ingest: reports/s, controller full ingest vs mosquitto_sub and bare clients
  (200,000 reports over 10,000 devices; quick: 20,000 over 2,000);
* converge: git commit -> last device in_sync vs a bare retained round (1,000 and
  10,000 devices; quick: 1,000);
* drift: report -> drift event p50/p99, idle and under 1/4 of the ingest rate, vs the
  broker's round trip (1,000 reports each; quick: 300);
* footprint: shim RSS and CPU idle (60 s; quick: 10 s) and during an apply;
* commit: git commit -> retained bundle at a subscriber (bench/commit_latency.py; 20 / 5);
* device: hand edit on a device -> drift event, -> healed (bench/device_drift.py; 100 / 20);
* dashboard: devices page time per page and the dashboard's RSS (bench/dashboard.py; 10,000
  devices, 30 requests per query; quick: 2,000 and 10);
* broker-save: mosquitto's retained-database save settings, update rate and kill -9 loss
  (bench/broker_save.py; 10,000 retained, 3 kills each; quick: 2,000 and one).

Not in the default run (it takes many minutes): ``--only scale``, the fleet-size curve
(bench/scale.py; 1,000 to 100,000 devices as far as the machine allows; quick: 1,000 and
3,000); ``python -m bench.scale --sizes ...`` runs it with other sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import time

NAMES = (
    "ingest",
    "converge",
    "drift",
    "footprint",
    "commit",
    "device",
    "dashboard",
    "broker-save",
)
EXTRA = ("scale",)  # only with --only


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, under five minutes")
    parser.add_argument("--only", nargs="+", choices=NAMES + EXTRA, default=list(NAMES))
    args = parser.parse_args(argv)
    quick = ["--quick"] if args.quick else []
    started = time.monotonic()
    took: dict[str, float] = {}
    for name in NAMES + EXTRA:
        if name not in args.only:
            continue
        t0 = time.monotonic()
        print(f"\n=== {name} ===", flush=True)
        try:
            run(name, args.quick, quick)
        except Exception as exc:  # one benchmark failing must not hide the others
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
        took[name] = time.monotonic() - t0
    from . import plots

    plots.main()
    total = time.monotonic() - started
    print("\n" + ", ".join(f"{k} {v:.0f}s" for k, v in took.items()) + f"; total {total:.0f}s")
    return 0


def run(name: str, is_quick: bool, quick: list[str]) -> None:
    if name == "ingest":
        from . import ingest

        sizes = ["--reports", "20000", "--devices", "2000"] if is_quick else []
        ingest.main([*sizes, *quick])
    elif name == "converge":
        from . import converge

        asyncio.run(converge.main_async([1000] if is_quick else [1000, 10000], is_quick))
    elif name == "drift":
        from . import drift_load

        drift_load.main(quick)
    elif name == "footprint":
        from . import footprint

        footprint.main(quick)
    elif name == "commit":
        from . import commit_latency

        commit_latency.main(quick)
    elif name == "device":
        from . import device_drift

        device_drift.main(quick)
    elif name == "dashboard":
        from . import dashboard

        dashboard.main(quick)
    elif name == "broker-save":
        from . import broker_save

        broker_save.main(quick)
    elif name == "scale":
        from . import scale

        scale.main(["--sizes", "1000", "3000", *quick] if is_quick else [])


if __name__ == "__main__":
    raise SystemExit(main())
