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
sys.path.insert(0, str(Path(__file__).parent))

from enginekit import record_figure
from replicakit import kill_the_leader_and_commit, nats_fleet

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(
        not os.environ.get("SETPOINT_CLUSTER_FAULTS"),
        reason="cluster fault tests run with `make test-cluster` (SETPOINT_CLUSTER_FAULTS=1)",
    ),
]


NODE_OF = {"ctl-a": 0, "ctl-b": 1}


@pytest.mark.timeout(300)
def test_kill_9_of_the_leaders_node_hands_over_to_the_replica_on_another_node(
    nats_cluster_fresh: NatsCluster, tmp_path: Path, unique_prefix: str
) -> None:
    cluster = nats_cluster_fresh
    took = kill_the_leader_and_commit(
        nats_fleet(tmp_path),
        {name: cluster.urls[i] for name, i in NODE_OF.items()},
        cluster.urls[2],
        unique_prefix,
        kill=lambda leader: cluster.nodes[NODE_OF[leader]].kill(),
    )
    record_figure("kill-9-leading-controllers-node", {"kill_to_publish": took})


@pytest.mark.timeout(300)
def test_the_leaders_node_cut_off_hands_over_and_the_old_leader_follows_after(
    nats_cluster_fresh: NatsCluster, tmp_path: Path, unique_prefix: str
) -> None:
    """A network split, seen from the leader: its node stops answering (SIGSTOP) but keeps
    its sockets. The leader cannot renew, steps down, and the replica on another node takes
    over; when the node comes back, the old leader follows (the test's end checks that the
    survivor still leads and nothing was published twice)."""
    cluster = nats_cluster_fresh
    paused: list[int] = []

    def cut_off(leader: str) -> None:
        paused.append(NODE_OF[leader])
        cluster.nodes[NODE_OF[leader]].pause()

    try:
        took = kill_the_leader_and_commit(
            nats_fleet(tmp_path),
            {name: cluster.urls[i] for name, i in NODE_OF.items()},
            cluster.urls[2],
            unique_prefix,
            kill=cut_off,
        )
    finally:
        for i in paused:
            cluster.nodes[i].resume()
    record_figure("cut-off-leading-controllers-node", {"cut_to_publish": took})
