"""``python -m bench.nats_retained`` (the reproduction of NATS's retained loss after a node's
kill -9, docs/scale-out.md) runs end to end on a real 3-node cluster and records a trial.
What the engine does in it is the engine's business (the figures are in the note); here the
probe must kill the node it says, read every survivor and name an outcome. Opt-in with the
other fault tests (``make test-cluster``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(
        not os.environ.get("SETPOINT_CLUSTER_FAULTS"),
        reason="kills NATS nodes: runs with `make test-cluster` (SETPOINT_CLUSTER_FAULTS=1)",
    ),
]


@pytest.mark.timeout(240)
def test_the_retained_probe_kills_a_node_and_reads_every_survivor(tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_RESULTS": str(tmp_path / "results")}
    result = subprocess.run(
        [sys.executable, "-m", "bench.nats_retained", "--trials", "1", "--kill", "other",
         "--read", "20"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=220, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    entry = json.loads((tmp_path / "results" / "results.jsonl").read_text().splitlines()[-1])
    assert entry["bench"] == "nats-retained" and entry["server"].startswith("v2.")
    (run,) = entry["runs"]
    assert run["killed"] != run["stream_leader"] and run["killed"] != run["publisher_on"]
    assert set(run["served"]) == {"n1", "n2", "n3"} - {run["killed"]}
    assert run["outcome"] in {"kept", "lost", "stale node"}
    assert run["outcome"] != "kept" or set(run["served"].values()) == {"v2"}
    assert "outcome" in result.stdout
