"""The plots of ``docs/performance.md``, drawn from what the benchmarks left in
``bench/results/``: the convergence curve (devices in sync over time after a commit), the
drift-latency distribution (idle, under load, and the broker's round trip), and the
fleet-size curve (time and memory against fleet size, log-log; ``bench.scale``).

    .venv/bin/python -m bench.plots

``BENCH_PLOTS=DIR`` draws them elsewhere than ``docs/perf/``.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

from .common import RESULTS, ROOT

OUT = Path(os.environ.get("BENCH_PLOTS") or ROOT / "docs" / "perf")


def convergence(out: Path = OUT) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # converge-N.json: the mosquitto runs (converge-ENGINE-N.json are other engines' curves)
    files = sorted(
        (p for p in RESULTS.parent.glob("converge-*.json") if p.stem.split("-")[1].isdigit()),
        key=lambda p: int(p.stem.split("-")[1]),
    )
    if not files:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for path in files:
        data = json.loads(path.read_text())
        curve = data["curve"]
        n = data["n"]
        ax.step(curve, [100 * (i + 1) / n for i in range(n)], where="post",
                label=f"{n:,} devices (last at {curve[-1]:.2f} s)")  # fmt: skip
    ax.set_xlabel("seconds after git commit")
    ax.set_ylabel("devices in_sync on the new version (%)")
    ax.set_title("Convergence after a commit (setpoint sim, real controller)")
    ax.grid(alpha=0.3)
    ax.legend()
    out.mkdir(parents=True, exist_ok=True)
    target = out / "convergence.png"
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def drift_latency(out: Path = OUT) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = RESULTS.parent / "drift-latency.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(7, 4))
    series = [
        ("broker round trip (idle)", data["rtt"]),
        ("report -> drift event, idle", data["idle"]),
        (f"report -> drift event, load {data['load_rate']:.0f} reports/s", data["load"]),
    ]
    for label, values in series:
        ms = sorted(v * 1000 for v in values)
        ax.step(ms, [100 * (i + 1) / len(ms) for i in range(len(ms))], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (log scale)")
    ax.set_ylabel("cumulative share (%)")
    ax.set_title("Drift latency distribution")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    out.mkdir(parents=True, exist_ok=True)
    target = out / "drift-latency.png"
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def scale(out: Path = OUT) -> Path | None:
    """Log-log: commit -> all in sync and the bare retained round (left), the RSS of the
    controller, the broker and the simulator (right), against fleet size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = RESULTS.parent / "scale.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    rows = [r for r in data["runs"] if "error" not in r]
    if not rows:
        return None
    n = [r["devices"] for r in rows]
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(10, 4.2))

    def line(ax: Any, key: str, label: str, style: str) -> None:
        points = [(d, r[key]) for d, r in zip(n, rows, strict=True) if r.get(key)]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)

    line(time_ax, "converged_s", "setpoint: commit -> all in_sync", "o-")
    line(time_ax, "bare_s", "bare retained round (same broker)", "s--")
    line(time_ax, "noticed_s", "commit noticed", "^:")
    line(time_ax, "controller_cpu_s", "controller CPU s (commit -> in_sync)", "d-.")
    line(mem_ax, "controller_rss_mb", "controller", "o-")
    line(mem_ax, "broker_rss_mb", "broker (mosquitto)", "s--")
    line(mem_ax, "sim_rss_mb", "simulator (all processes)", "^:")
    for ax, label in ((time_ax, "seconds"), (mem_ax, "RSS, MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("devices")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    time_ax.set_title("Time against fleet size")
    mem_ax.set_title("Memory against fleet size")
    if data.get("stopped"):
        note = textwrap.fill(f"stopped: {data['stopped']}", 170)
        fig.text(0.01, 0.01, note, fontsize=7)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "scale.png"
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def main() -> int:
    for made in (convergence(), drift_latency(), scale()):
        if made is not None:
            print(f"wrote {made}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
