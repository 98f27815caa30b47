"""The plots of ``docs/performance.md``, drawn from what the benchmarks left in
``bench/results/``: the convergence curve (devices in sync over time after a commit) and the
drift-latency distribution (idle, under load, and the broker's round trip).

    .venv/bin/python -m bench.plots
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import RESULTS, ROOT

OUT = ROOT / "docs" / "perf"


def convergence(out: Path = OUT) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(RESULTS.parent.glob("converge-*.json"), key=lambda p: int(p.stem.split("-")[1]))
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


def main() -> int:
    for made in (convergence(), drift_latency()):
        if made is not None:
            print(f"wrote {made.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
