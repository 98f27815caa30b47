"""The whole loop on a 3-node NATS cluster, and what a node's death does to it.

A real controller (on node 2), a real shim given every node (``--broker n1,n2,n3``), real git.
``kill -9`` of the shim's node, left dead, with a commit made right after: the shim moves
to another node by itself, gets the new bundle, and the controller sees it in sync. The
reconvergence time (commit to ``in_sync`` on the new commit) is logged; docs/scale-out.md
gives figures.

Opt-in (``make test-cluster``): one run in three here ended with the shim subscribed again
on a surviving node and the new retained bundle never delivered. The cause is the engine's:
when the node killed also led the stream of retained messages, the controller's publication
during the election was acknowledged but never stored (docs/scale-out.md, "Why NATS loses
retained bundles"; ``python -m bench.nats_retained`` reproduces it). The controller now
sends such a bundle again once the device has stayed behind for ``--resend-after`` (60 s:
``controller/resending.py``), which the 240 s wait covers; it stays opt-in until it has
passed in enough runs to join ``.ci/run`` (docs/scale-out.md).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.engines import NatsCluster
from setpoint.proto.topics import Topics

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(
        not os.environ.get("SETPOINT_CLUSTER_FAULTS"),
        reason="the cluster fault tests run with `make test-cluster` (SETPOINT_CLUSTER_FAULTS=1):"
        " the engine loses a retained bundle published during an election (scale-out.md)",
    ),
]
sys.path.insert(0, str(Path(__file__).parent))

from enginekit import ENV, SETPOINT, git  # noqa: E402

log = logging.getLogger(__name__)


class DriftReader:
    """Retained drift statuses, read over MQTT 3.1.1 from one node (reconnecting)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.topics = Topics(prefix)
        self.status: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        host, port = url.removeprefix("mqtt://").split(":")
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self._client.on_connect = lambda c, *_: c.subscribe(self.topics.all_drift(), qos=0)
        self._client.on_message = self._on_message
        self._client.connect(host, int(port))
        self._client.loop_start()

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return
        with self._cond:
            self.status[self.topics.parse(message.topic).name] = json.loads(message.payload)
            self._cond.notify_all()

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), f"{what}: {self.status}"

    def reconnect(self) -> None:
        """After its node restarted (paho's own retry may be waiting a while)."""
        self._client.reconnect()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def loop(nats_cluster_fresh: NatsCluster, tmp_path: Path, unique_prefix: str) -> Iterator[Any]:
    cluster = nats_cluster_fresh
    repo, keys = tmp_path / "fleet", tmp_path / "keys"
    for args in (["init", str(repo)], ["keys", "generate", "--out", str(keys)]):
        subprocess.run([*SETPOINT, *args], env=ENV, check=True, capture_output=True)
    (repo / "fleet.yaml").write_text((repo / "fleet.yaml").read_text() + "engine: nats\n")
    git(repo, "commit", "-qam", "on nats")
    (tmp_path / "root").mkdir()
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("controller", "shim")}  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [*SETPOINT, "controller", "--repo", str(repo), "--broker", cluster.urls[1],
             "--key", str(keys / "signing.key"), "--state-dir", str(tmp_path / "state"),
             "--prefix", unique_prefix, "--poll-interval", "0.5"],
            env=ENV, stdout=logs["controller"], stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [*SETPOINT, "shim", "--device", "kiosk-01", "--broker", cluster.broker_list,
             "--trust", str(keys / "signing.pub"), "--root", str(tmp_path / "root"),
             "--state-dir", str(tmp_path / "shim-state"), "--prefix", unique_prefix,
             "--reconnect-min", "0.5", "--reconnect-max", "5"],
            env=ENV, stdout=logs["shim"], stderr=subprocess.STDOUT,
        ),
    ]  # fmt: skip
    reader = DriftReader(cluster.urls[2], unique_prefix)
    try:
        yield cluster, repo, reader, tmp_path
    finally:
        reader.close()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for fh in logs.values():
            fh.close()


def in_sync_on(reader: DriftReader, commit: str) -> Callable[[], bool]:
    def check() -> bool:
        status = reader.status.get("kiosk-01", {})
        return status.get("state") == "in_sync" and status.get("commit") == commit

    return check


@pytest.mark.timeout(420)
def test_kill_9_of_the_shims_node_with_a_commit_during_the_outage(loop: Any) -> None:
    cluster, repo, reader, tmp_path = loop
    head = git(repo, "rev-parse", "HEAD")
    try:
        reader.wait("first convergence", in_sync_on(reader, head), 180)
    except AssertionError:
        print((tmp_path / "shim.log").read_text(errors="replace")[-4000:])
        raise
    shim_log = (tmp_path / "shim.log").read_text(errors="replace")
    assert f"connected to {cluster.urls[0]}" in shim_log, shim_log

    cluster.nodes[0].kill()  # the node the shim is connected to
    motd = repo / "groups" / "kiosks.yaml"
    motd.write_text(motd.read_text().replace("Welcome to the", "Hello from the"))
    git(repo, "commit", "-qam", "motd during the outage")
    committed, head = time.monotonic(), git(repo, "rev-parse", "HEAD")
    # The node stays dead: the shim must find another one by itself.
    try:
        reader.wait("after the outage", in_sync_on(reader, head), 240)
    except AssertionError:
        print((tmp_path / "shim.log").read_text(errors="replace")[-4000:])
        print((tmp_path / "controller.log").read_text(errors="replace")[-4000:])
        raise
    took = time.monotonic() - committed
    log.warning("kill -9 of the shim's node: commit to in_sync in %.2fs", took)
    assert "Hello from the" in (tmp_path / "root" / "etc" / "motd").read_text()
    # The shim rotated to the other nodes while its own was dead.
    shim_log = (tmp_path / "shim.log").read_text(errors="replace")
    assert any(
        f"trying {url}" in shim_log or f"to {url} in" in shim_log for url in cluster.urls[1:]
    )


@pytest.mark.timeout(480)
def test_kill_9_of_all_nodes_with_a_commit_during_the_outage(loop: Any) -> None:
    cluster, repo, reader, tmp_path = loop
    head = git(repo, "rev-parse", "HEAD")
    reader.wait("first convergence", in_sync_on(reader, head), 180)

    for node in cluster.nodes:
        node.kill()
    motd = repo / "groups" / "kiosks.yaml"
    motd.write_text(motd.read_text().replace("Welcome to the", "Back again at the"))
    git(repo, "commit", "-qam", "motd while the whole cluster is down")
    committed, head = time.monotonic(), git(repo, "rev-parse", "HEAD")
    for node in cluster.nodes:
        node.start()
    cluster.wait_ready(timeout=120)
    restarted = time.monotonic()
    reader.reconnect()
    try:
        reader.wait("after the restart", in_sync_on(reader, head), 240)
    except AssertionError:
        print((tmp_path / "shim.log").read_text(errors="replace")[-4000:])
        print((tmp_path / "controller.log").read_text(errors="replace")[-4000:])
        raise
    now = time.monotonic()
    log.warning(
        "kill -9 of all nodes: commit to in_sync in %.2fs (%.2fs after the cluster was ready)",
        now - committed, now - restarted,
    )  # fmt: skip
    assert "Back again at the" in (tmp_path / "root" / "etc" / "motd").read_text()


@pytest.mark.timeout(480)
def test_rolling_restart_with_a_commit_while_the_shims_node_is_down(loop: Any) -> None:
    cluster, repo, reader, tmp_path = loop
    head = git(repo, "rev-parse", "HEAD")
    reader.wait("first convergence", in_sync_on(reader, head), 180)

    committed = 0.0
    for n, node in enumerate(cluster.nodes):
        node.stop()  # SIGTERM: an orderly restart, one node at a time
        if n == 0:  # the shim's node is down: commit now
            motd = repo / "groups" / "kiosks.yaml"
            motd.write_text(motd.read_text().replace("Welcome to the", "Rolled at the"))
            git(repo, "commit", "-qam", "motd during a rolling restart")
            committed, head = time.monotonic(), git(repo, "rev-parse", "HEAD")
        node.start()
        cluster.wait_ready(timeout=120)
    reader.reconnect()
    try:
        reader.wait("after the rolling restart", in_sync_on(reader, head), 240)
    except AssertionError:
        print((tmp_path / "shim.log").read_text(errors="replace")[-4000:])
        print((tmp_path / "controller.log").read_text(errors="replace")[-4000:])
        raise
    log.warning("rolling restart: commit to in_sync in %.2fs", time.monotonic() - committed)
    assert "Rolled at the" in (tmp_path / "root" / "etc" / "motd").read_text()
