"""Two controller replicas on a 3-node NATS cluster, each on its own node, watched from the
third: the leader is killed with SIGKILL, a commit lands meanwhile, and the other replica
takes over and publishes it once, with the next version. The leader record travels through
the engine's replicated retained messages over MQTT 3.1.1. And the two split the 16 report
shards: hand edits are told once by their device's owner, and the shards of an owner
killed with SIGKILL move to the other."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from setpoint.engines import NatsCluster

sys.path.insert(0, str(Path(__file__).parent.parent / "e2e"))
sys.path.insert(0, str(Path(__file__).parent))

from enginekit import record_figure
from replicakit import kill_the_leader_and_commit, nats_fleet, split_shards_and_edit_by_hand

pytestmark = pytest.mark.engine


def test_the_leader_replica_is_killed_and_the_one_on_another_node_takes_over(
    nats_cluster: NatsCluster, tmp_path: Path, unique_prefix: str
) -> None:
    fleet = nats_fleet(tmp_path)
    urls = nats_cluster.urls
    took = kill_the_leader_and_commit(
        fleet, {"ctl-a": urls[0], "ctl-b": urls[1]}, urls[2], unique_prefix
    )
    record_figure("kill-9-leading-controller", {"kill_to_publish": took})


def test_two_replicas_on_two_nodes_split_the_shards_and_the_survivor_of_a_sigkill_takes_them_all(
    nats_cluster: NatsCluster, tmp_path: Path, unique_prefix: str
) -> None:
    fleet = nats_fleet(tmp_path)
    urls = nats_cluster.urls
    figures = split_shards_and_edit_by_hand(
        fleet, {"ctl-a": urls[0], "ctl-b": urls[1]}, urls[2], unique_prefix
    )
    print(
        f"on NATS: shards split {figures['split']:.2f}s after start; after SIGKILL, a hand"
        f" edit on the dead replica's shard told in {figures['edit-seen-after-kill']:.2f}s,"
        f" every shard owned by the survivor in {figures['all-shards-after-kill']:.2f}s"
        " (lease 2s)"
    )
