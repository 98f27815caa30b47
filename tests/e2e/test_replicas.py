"""Controller replicas: two real ``setpoint controller --lease`` processes on one fleet and
one mosquitto. One leads and publishes; the other publishes nothing. The leader is killed
with SIGKILL, a commit lands meanwhile, and the other replica takes the lead with the next
term and publishes the commit with the next version: nothing lost, nothing published twice.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import test_controller_cli
from replicakit import kill_the_leader_and_commit, split_shards_and_edit_by_hand
from test_controller_cli import setpoint

fleet = test_controller_cli.fleet  # the example fleet and its keys (a fixture)

pytestmark = pytest.mark.broker


def test_the_leader_is_killed_and_the_other_replica_takes_over(
    fleet: dict[str, Path], broker: Any, unique_prefix: str
) -> None:
    urls = {"ctl-a": broker.url, "ctl-b": broker.url}
    took = kill_the_leader_and_commit(fleet, urls, broker.url, unique_prefix)
    print(f"handover and publication: {took:.2f}s after SIGKILL")


def test_lease_and_once_do_not_mix(fleet: dict[str, Path]) -> None:
    done = setpoint(
        "controller", "--repo", str(fleet["repo"]), "--broker", "mqtt://127.0.0.1:1",
        "--key", str(fleet["key"]), "--lease", "5", "--once",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--lease runs a replica until stopped; it cannot be used with --once" in done.stderr


def test_two_replicas_split_the_shards_and_the_survivor_of_a_sigkill_takes_them_all(
    fleet: dict[str, Path], broker: Any, unique_prefix: str
) -> None:
    urls = {"ctl-a": broker.url, "ctl-b": broker.url}
    figures = split_shards_and_edit_by_hand(fleet, urls, broker.url, unique_prefix)
    print(
        f"shards split {figures['split']:.2f}s after start; after SIGKILL, a hand edit on the"
        f" dead replica's shard told in {figures['edit-seen-after-kill']:.2f}s, every shard"
        f" owned by the survivor in {figures['all-shards-after-kill']:.2f}s (lease 2s)"
    )


def test_share_and_lease_do_not_mix(fleet: dict[str, Path]) -> None:
    done = setpoint(
        "controller", "--repo", str(fleet["repo"]), "--broker", "mqtt://127.0.0.1:1",
        "--key", str(fleet["key"]), "--lease", "5", "--share", "ctl",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--share and --lease do not mix" in done.stderr
