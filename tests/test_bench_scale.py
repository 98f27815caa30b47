"""``python -m bench.scale`` runs end to end on a real broker at a tiny size: the whole path
(bare reference, controller, simulator, ingest, JSON, plot) works. Speed is not checked here:
figures belong in docs/performance.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_scale_runs_end_to_end_at_a_tiny_size(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BENCH_RESULTS": str(tmp_path / "results"),
        "BENCH_PLOTS": str(tmp_path / "plots"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--sizes", "20"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=170, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "results" / "scale.json").read_text())
    assert data["largest"] == 20 and data["stopped"] == ""
    (row,) = data["runs"]
    assert row["devices"] == 20 and "error" not in row, row
    assert row["converged_s"] > 0 and row["bare_s"] > 0 and row["ingest_rate"] > 0
    assert row["controller_rss_mb"] > 0 and row["broker_rss_mb"] > 0
    assert (tmp_path / "plots" / "scale.png").stat().st_size > 0
    assert "Fleet-size curve" in result.stdout


def test_scale_refuses_a_size_below_one() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--sizes", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "at least 1 device" in result.stderr


def test_the_curve_runs_the_largest_reachable_size_in_place_of_the_first_out_of_reach(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.scale import Capacity, plan

    capacity = Capacity(19_800, "RLIMIT_NOFILE stops at 20,000 here")
    runs, stopped = plan([1_000, 3_000, 10_000, 30_000, 100_000], capacity)
    assert runs == [(1_000, False), (3_000, False), (10_000, False), (19_000, True)]
    assert stopped.startswith("30,000 devices are out of reach") and "20,000" in stopped
    assert plan([1_000, 3_000], capacity) == ([(1_000, False), (3_000, False)], "")
    # Nothing larger than what already ran: no stand-in, still a reason.
    runs, stopped = plan([19_000, 25_000], capacity)
    assert runs == [(19_000, False)] and "25,000" in stopped
