"""The leading controller replica's NATS node is killed (``kill -9``): the leader can no
longer renew and stops publishing; the replica on another node takes over and publishes
the commit made during the outage once, with the next version.

Opt-in with the other fault tests (``make test-cluster``, SETPOINT_CLUSTER_FAULTS=1): a
fresh cluster per test, and the engine needs a few seconds to elect new stream leaders.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from setpoint.engines import NatsCluster

sys.path.insert(0, str(Path(__file__).parent.parent / "e2e"))

from replicakit import kill_the_leader_and_commit
from test_controller_cli import git, setpoint

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(
        not os.environ.get("SETPOINT_CLUSTER_FAULTS"),
        reason="cluster fault tests run with `make test-cluster` (SETPOINT_CLUSTER_FAULTS=1)",
    ),
]


@pytest.mark.timeout(300)
def test_kill_9_of_the_leaders_node_hands_over_to_the_replica_on_another_node(
    nats_cluster_fresh: NatsCluster, tmp_path: Path, unique_prefix: str
) -> None:
    cluster = nats_cluster_fresh
    repo = tmp_path / "fleet"
    setpoint("init", str(repo), check=True)
    setpoint("keys", "generate", "--out", str(tmp_path / "keys"), check=True)
    (repo / "fleet.yaml").write_text((repo / "fleet.yaml").read_text() + "engine: nats\n")
    git(repo, "commit", "-qam", "on nats")
    fleet = {
        "repo": repo,
        "key": tmp_path / "keys" / "signing.key",
        "pub": tmp_path / "keys" / "signing.pub",
        "state": tmp_path / "state",
    }
    node_of = {"ctl-a": 0, "ctl-b": 1}
    took = kill_the_leader_and_commit(
        fleet,
        {name: cluster.urls[i] for name, i in node_of.items()},
        cluster.urls[2],
        unique_prefix,
        kill=lambda leader: cluster.nodes[node_of[leader]].kill(),
    )
    print(f"the leader's node killed: the other replica published {took:.2f}s later")
