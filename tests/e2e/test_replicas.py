"""Controller replicas: real ``setpoint controller --lease`` processes on one fleet and one
mosquitto. One leads and alone publishes bundles; killed with SIGKILL while a commit lands,
the other takes the lead with the next term and publishes the commit with the next version.
Both split the 16 report shards: each tells the drift of its own shards' devices, a hand
edit is told once, and the shards of a replica killed or stopped move to the other.
"""

from __future__ import annotations

import re
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import test_controller_cli
from replicakit import (
    LEASE_S,
    ShardWatch,
    StderrLines,
    eventually,
    kill_the_leader_and_commit,
    replica,
    split_shards_and_edit_by_hand,
    stop,
)
from test_controller_cli import setpoint

from setpoint.controller.sharding import rank
from setpoint.proto.topics import SHARDS

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


def test_a_replica_stopped_cleanly_releases_its_shards_and_leaves(
    fleet: dict[str, Path], broker: Any, unique_prefix: str
) -> None:
    names = ["ctl-a", "ctl-b"]
    watch = ShardWatch(broker.url, unique_prefix, fleet["pub"].read_bytes())
    processes = {n: replica(fleet, broker.url, unique_prefix, n) for n in names}
    try:
        expected = {n: {s for s in SHARDS if rank(s, names)[0] == n} for n in names}
        watch.wait(lambda: watch.owners() == expected, timeout=60)
        processes["ctl-a"].send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        # It gives every shard up (a record with a lease of 1 ms) and clears its membership.
        watch.wait(lambda: {s for s, by in watch.released if by == "ctl-a"} == expected["ctl-a"])
        watch.wait(lambda: watch.members.get("ctl-a") is False)
        watch.wait(lambda: watch.owners().get("ctl-b") == set(SHARDS))
        took = time.monotonic() - stopped
        assert processes["ctl-a"].wait(timeout=15) == 0
        print(f"every shard owned by ctl-b {took:.2f}s after SIGTERM of ctl-a (lease 2s)")
    finally:
        watch.close()
        for process in processes.values():
            stop(process)


def test_a_replica_that_joins_gets_its_shards_released_one_at_a_time(
    fleet: dict[str, Path], broker: Any, unique_prefix: str
) -> None:
    names = ["ctl-a", "ctl-b"]
    watch = ShardWatch(broker.url, unique_prefix, fleet["pub"].read_bytes())
    processes = {"ctl-a": replica(fleet, broker.url, unique_prefix, "ctl-a")}
    try:
        watch.wait(lambda: watch.owners() == {"ctl-a": set(SHARDS)}, timeout=60)
        processes["ctl-b"] = replica(fleet, broker.url, unique_prefix, "ctl-b")
        joined = time.monotonic()
        expected = {n: {s for s in SHARDS if rank(s, names)[0] == n} for n in names}
        watch.wait(lambda: watch.owners() == expected, timeout=30 + 4 * len(expected["ctl-b"]))
        took = time.monotonic() - joined
        # Each shard moved by a release (a record of ctl-a's term with a lease of 1 ms),
        # then ctl-b's claim of the next term: never two holders of one term.
        for shard in expected["ctl-b"]:
            records = [(r.holder, r.term, r.lease_ms) for r in watch.history[shard]]
            released = records.index(("ctl-a", records[-1][1] - 1, 1))
            assert all(h == "ctl-b" for h, _t, _l in records[released + 1 :]), records
        assert {s for s, _by in watch.released} == expected["ctl-b"]  # one release each
        assert len(watch.released) == len(expected["ctl-b"])
        print(
            f"ctl-b joined: its {len(expected['ctl-b'])} shards released to it one per lease,"
            f" all moved {took:.2f}s after it started (lease 2s)"
        )
    finally:
        watch.close()
        for process in processes.values():
            stop(process)


def group_gauges(url: str) -> list[str]:
    """The ``setpoint_devices`` samples a replica's metrics serve."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [line for line in text.splitlines() if line.startswith("setpoint_devices{")]


def test_a_replica_that_just_stepped_down_stops_on_sigterm(
    fleet: dict[str, Path], broker: Any, unique_prefix: str
) -> None:
    """The broker stalls (SIGSTOP) for longer than the lease: the replica steps down and
    gives its shards up; SIGTERMed then, with the broker still stalled, it stops: the
    controller it cancelled on stepping down ends, and the release of its membership is
    waited for lease/2 only."""
    watch = ShardWatch(broker.url, unique_prefix, fleet["pub"].read_bytes())
    process = replica(
        fleet, broker.url, unique_prefix, "ctl-b", LEASE_S, "--metrics-listen", "127.0.0.1:0"
    )
    stderr = StderrLines(process)
    try:
        watch.wait(lambda: watch.owners() == {"ctl-b": set(SHARDS)}, timeout=60)
        stderr.wait_for("replica ctl-b leads")
        stderr.wait_for("metrics on http://127.0.0.1:")
        port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", stderr.tail(200))
        assert port is not None, stderr.tail()
        scrape = f"http://127.0.0.1:{port[1]}/metrics"
        # The leader's group gauges (every device unknown: nothing reports here) ...
        eventually(lambda: group_gauges(scrape), "the leader's group gauges")
        with broker.stalled():
            stderr.wait_for("replica ctl-b steps down: no renewal of the lead confirmed")
            stderr.wait_for("owning report shards: none")
            # ... go with the lead: a follower's scrape counts no group (its metrics are
            # still served, for the shards it may own again).
            eventually(lambda: not group_gauges(scrape), "no group gauges after the step down")
            # Stopped while the broker answers nothing: it waits lease/2 for the release
            # of its membership to be acknowledged, no longer, and stops.
            stop(process, stderr)  # fails, with the end of its stderr, if it does not stop
        assert process.returncode == 0, stderr.tail()
        assert "the release of the shards not acknowledged in time" in stderr.text()
    finally:
        watch.close()
        stop(process, stderr)
