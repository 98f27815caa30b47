"""The whole loop on a 3-node NATS cluster, and what each fault of a node does to it.

A real controller (given every node, its own first: ``--broker n2,n3,n1``), a real shim
(``--broker n1,n2,n3``: it starts on node 1), real git, and a watcher: a plain MQTT 3.1.1
client that reads the drift statuses, the shim's reports and the ``published`` events from
whichever node answers. Each fault begins an outage; during it the device's
``etc/kiosk/config.ini`` is edited by hand and a commit changes the kiosks' motd; the outage
ends (or the node stays dead) and the test waits for the device to be ``in_sync`` on the new
commit. Each run asserts:

* nothing lost: the device ends ``in_sync`` on the newest commit with its content, and the
  hand edit was seen (a report of the device names ``kiosk-config`` drifted or healed) and
  put back;
* nothing published twice: the controller made each (target, version) once, and the
  watcher saw no ``published`` event of a change twice (the same envelope published again
  to repair a copy the engine lost, ``restore`` or ``re-sent``, is counted apart);
* versions monotonic: the controller's versions of each target only go up, and so do the
  versions the shim applied;
* after a node that was cut off (frozen, or split from the others) comes back: the device
  ends ``online`` and ``in_sync`` again, once the node can no longer publish the shim's old
  will (1.5 keepalives), although the node sends that will and the report the shim sent it
  before it moved (the shim puts both right, the controller drops the older report);

and writes one ``fault-figure`` line (:func:`enginekit.record_figure`) with the
reconvergence times: commit to ``in_sync``, hand edit to the drift seen.

Opt-in (``make test-cluster``): a fresh cluster per test, and the engine can lose a retained
bundle published during an election (docs/scale-out.md, "Why NATS loses retained bundles");
the controller sends such a bundle again once the device has stayed behind for
``--resend-after``, set to 20 s here so that a lost bundle costs 20 s, not 60.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.engines import NatsCluster
from setpoint.engines.cluster import EngineError
from setpoint.proto import reports
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

from enginekit import ENV, SETPOINT, git, record_figure  # noqa: E402

log = logging.getLogger(__name__)

DEVICE = "kiosk-01"
RETAINED_STREAM = "$MQTT_rmsgs"
EDITED = b"hand edit during the outage\n"
# The shim's MQTT keepalive (ShimConfig.keepalive, not settable from its command line). A
# node ends a silent client's session (and publishes its will) 1.5 keepalives after the
# last packet it had (MQTT 3.1.1, 3.1.2.10); 15 s more for the routes to carry it.
SHIM_KEEPALIVE = 60
OLD_SESSION_ENDS_WITHIN = 1.5 * SHIM_KEEPALIVE + 15


class Watcher:
    """Drift statuses, the device's reports and ``published`` events, read over MQTT 3.1.1
    (QoS 0: a node refuses QoS 1 subscriptions for a while after another node's death).
    It moves to the next node whenever its connection fails, so it reads through any
    fault that leaves a node up, and again once a restarted cluster answers."""

    def __init__(self, urls: list[str], prefix: str) -> None:
        self.topics = Topics(prefix)
        self.urls = urls
        self.status: dict[str, dict[str, Any]] = {}
        self.reports: list[tuple[float, reports.Report]] = []
        self.published: list[tuple[str, int, str]] = []  # (target, version, reason)
        self.updates: list[str] = []  # the device's drift states, in the order they came
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        turn = 0
        while not self._stop.is_set():
            host, port = self.urls[turn % len(self.urls)].removeprefix("mqtt://").split(":")
            turn += 1
            gone = threading.Event()
            client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
            client.on_connect = self._on_connect
            client.on_message = self._on_message
            client.on_disconnect = lambda *_, gone=gone: gone.set()
            client.on_connect_fail = lambda *_, gone=gone: gone.set()
            try:
                client.connect(host, int(port), keepalive=5)
            except OSError:
                self._stop.wait(0.2)
                continue
            client.loop_start()
            while not self._stop.is_set() and not gone.wait(0.2):
                pass
            client.disconnect()
            client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, _u: object, _f: object, rc: object, _p: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            client.disconnect()
            return
        client.subscribe(
            [(self.topics.all_drift(), 0), (self.topics.device_reported(DEVICE), 0),
             (self.topics.event("published"), 0)]
        )  # fmt: skip

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return
        now = time.monotonic()
        with self._cond:
            if message.topic.endswith("/reported"):
                self.reports.append((now, reports.decode(bytes(message.payload))))
            elif message.topic == self.topics.event("published"):
                event = json.loads(message.payload)
                self.published.append((event["target"], event["version"], event.get("reason")))
            else:
                name = self.topics.parse(message.topic).name
                self.status[name] = json.loads(message.payload)
                if name == DEVICE:
                    self.updates.append(self.status[name].get("state", "?"))
            self._cond.notify_all()

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), f"{what}: {self.status}"

    def wait_quietly(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def in_sync_on(self, commit: str) -> Callable[[], bool]:
        def check() -> bool:
            status = self.status.get(DEVICE, {})
            return status.get("state") == "in_sync" and status.get("commit") == commit

        return check

    def drift_seen_after(self, since: float) -> float | None:
        """When a report of the device first named ``kiosk-config`` drifted or healed,
        after ``since`` (monotonic), or None."""
        with self._cond:
            for at, report in self.reports:
                if at >= since and any(
                    r.id == "kiosk-config" and r.status in ("drifted", "healed")
                    for r in report.resources
                ):
                    return at
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Loop:
    cluster: NatsCluster
    repo: Path
    watcher: Watcher
    dir: Path
    shim_node: int  # the node the shim starts on (the first of its --broker list)
    controller_node: int  # the controller's
    notes: dict[str, Any] = field(default_factory=dict)

    def text(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def dump(self) -> None:
        for name in ("shim", "controller"):
            print(f"--- {name}.log (tail)\n{self.text(name)[-5000:]}")
        for node in self.cluster.nodes:
            print(f"--- {node.name} ({'running' if node.running else 'stopped'})")


@pytest.fixture
def loop(request: pytest.FixtureRequest, tmp_path: Path, unique_prefix: str) -> Iterator[Loop]:
    """The loop on a fresh cluster, the shim on node 1 and the controller on node 2.
    Parametrized ``"splittable"``: on a cluster whose routes can be cut; ``"leader-apart"``:
    the shim and the controller on the two nodes that do not lead ``$MQTT_rmsgs``."""
    kind = getattr(request, "param", "fresh")
    cluster: NatsCluster = request.getfixturevalue(
        "nats_cluster_splittable" if kind == "splittable" else "nats_cluster_fresh"
    )
    shim_node, controller_node = 0, 1
    if kind == "leader-apart":
        shim_node, controller_node = (i for i in range(3) if i != retained_leader(cluster))
    third = 3 - shim_node - controller_node
    repo, keys = tmp_path / "fleet", tmp_path / "keys"
    for args in (["init", str(repo)], ["keys", "generate", "--out", str(keys)]):
        subprocess.run([*SETPOINT, *args], env=ENV, check=True, capture_output=True)
    (repo / "fleet.yaml").write_text((repo / "fleet.yaml").read_text() + "engine: nats\n")
    git(repo, "commit", "-qam", "on nats")
    (tmp_path / "root").mkdir()
    urls = cluster.urls
    shim_urls = [urls[shim_node], urls[controller_node], urls[third]]
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("controller", "shim")}  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [*SETPOINT, "controller", "--repo", str(repo),
             "--broker", ",".join([urls[controller_node], urls[third], urls[shim_node]]),
             "--key", str(keys / "signing.key"), "--state-dir", str(tmp_path / "state"),
             "--prefix", unique_prefix, "--poll-interval", "0.5", "--resend-after", "20"],
            env=ENV, stdout=logs["controller"], stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [*SETPOINT, "shim", "--device", DEVICE, "--broker", ",".join(shim_urls),
             "--trust", str(keys / "signing.pub"), "--root", str(tmp_path / "root"),
             "--state-dir", str(tmp_path / "shim-state"), "--prefix", unique_prefix,
             "--reconnect-min", "0.5", "--reconnect-max", "5"],
            env=ENV, stdout=logs["shim"], stderr=subprocess.STDOUT,
        ),
    ]  # fmt: skip
    watcher = Watcher([urls[third], urls[shim_node], urls[controller_node]], unique_prefix)
    loop = Loop(cluster, repo, watcher, tmp_path, shim_node, controller_node)
    try:
        yield loop
    finally:
        watcher.close()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for fh in logs.values():
            fh.close()


def wait_for_line(loop: Loop, name: str, pattern: str, after: int, timeout: float) -> None:
    """Until ``pattern`` (a regex) is in the log ``name`` past its first ``after`` chars."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, loop.text(name)[after:]):
        if time.monotonic() > deadline:
            loop.dump()
            raise AssertionError(f"no {pattern!r} in {name}.log within {timeout:.0f}s")
        time.sleep(0.1)


def retained_leader(cluster: NatsCluster, timeout: float = 30) -> int:
    """The index of the node that leads ``$MQTT_rmsgs``, as the nodes' ``/jsz`` says."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            state = node.stream(RETAINED_STREAM) if node.running else None
            if state is not None and state.leader:
                return next(i for i, n in enumerate(cluster.nodes) if n.name == state.leader)
        time.sleep(0.2)
    raise AssertionError(f"no leader of {RETAINED_STREAM} within {timeout:.0f}s")


def restart(cluster: NatsCluster, *indexes: int) -> None:
    for i in indexes:
        cluster.nodes[i].start()
    cluster.wait_ready(timeout=120)


def back_and_settled(loop: Loop, bring_back: Callable[[], None]) -> None:
    """The node that was cut off comes back; the device must end ``online`` and ``in_sync``
    on the newest commit. The node may publish the shim's old will (``offline``) and the
    report the shim sent it before it moved, once it is routed again or once it notices
    that the old connection is gone: the shim puts both right (SPEC 6.6, 6.7) and the
    controller drops an older report (docs/scale-out.md, "Fault tests"). So the test waits
    out the time in which the node can still end the old session (its keepalive expiry,
    1.5 keepalives) and only then asserts the end state."""
    seen, shim_mark, controller_mark = (
        len(loop.watcher.updates), len(loop.text("shim")), len(loop.text("controller"))
    )  # fmt: skip
    bring_back()
    try:
        loop.cluster.wait_ready(timeout=120)
        loop.notes["node_ready_after_heal"] = True
    except EngineError as exc:  # the engine's health under load, not what is asserted here
        log.warning("%s", str(exc)[:500])
        loop.notes["node_ready_after_heal"] = False
    loop.watcher.wait_quietly(lambda: False, OLD_SESSION_ENDS_WITHIN)
    head = git(loop.repo, "rev-parse", "HEAD")
    try:
        loop.watcher.wait("online and in sync after the heal", loop.watcher.in_sync_on(head), 60)
    except AssertionError:
        loop.dump()
        raise
    shim, controller = loop.text("shim")[shim_mark:], loop.text("controller")[controller_mark:]
    loop.notes["states_after_heal"] = "/".join(loop.watcher.updates[seen:]) or "-"
    loop.notes["presence_restated"] = shim.count("publishing online again")
    loop.notes["report_restated"] = shim.count("publishing the current one again")
    loop.notes["stale_reports_dropped"] = controller.count("(stale)")


def run_fault(
    loop: Loop,
    fault: str,
    begin: Callable[[Loop], None],
    end: Callable[[Loop], None] | None = None,
) -> None:
    """The device in sync; ``begin`` the outage; a hand edit and a commit during it; ``end``
    it (None: the fault stays); then the checks of the module's docstring, and the figures."""
    cluster, repo, watcher = loop.cluster, loop.repo, loop.watcher
    head = git(repo, "rev-parse", "HEAD")
    try:
        watcher.wait("first convergence", watcher.in_sync_on(head), 180)
    except AssertionError:
        loop.dump()
        raise
    assert f"connected to {cluster.urls[loop.shim_node]}" in loop.text("shim")

    begin(loop)
    began = time.monotonic()
    shim_mark = len(loop.text("shim"))
    config = loop.dir / "root" / "etc" / "kiosk" / "config.ini"
    desired_config = (repo / "files" / "kiosk" / "config.ini").read_bytes()
    config.write_bytes(EDITED)
    edited = time.monotonic()
    # The shim notices at once (inotify) whether or not it is connected, and puts it back.
    wait_for_line(loop, "shim", r"healed: .*kiosk-config", shim_mark, 60)
    motd = repo / "groups" / "kiosks.yaml"
    motd.write_text(motd.read_text().replace("Welcome to the", f"After {fault} at the"))
    git(repo, "commit", "-qam", f"motd during the outage: {fault}")
    committed, head = time.monotonic(), git(repo, "rev-parse", "HEAD")
    if end is not None:
        end(loop)
    ended = time.monotonic()
    try:
        watcher.wait(f"in sync after {fault}", watcher.in_sync_on(head), 240)
    except AssertionError:
        loop.dump()
        raise
    in_sync = time.monotonic()
    if "after" in loop.notes:
        loop.notes.pop("after")(loop)
    controller, shim = loop.text("controller"), loop.text("shim")

    # Nothing lost: the new content, the hand edit put back and seen.
    assert f"After {fault} at the" in (loop.dir / "root" / "etc" / "motd").read_text()
    assert config.read_bytes() == desired_config
    drift_seen = watcher.drift_seen_after(edited)
    controller_saw = re.search(
        rf"drift \w+: {DEVICE} \w+ -> drifted \(.*kiosk-config", controller
    ) is not None  # fmt: skip
    if drift_seen is None and not controller_saw:
        loop.dump()
    assert drift_seen is not None or controller_saw, (
        "the hand edit was never reported: no report naming kiosk-config drifted or healed,"
        " no drift event"
    )
    # Nothing published twice, versions only up (controller and device). A version is made
    # once (reason `change`); the same envelope published again to repair a retained copy
    # the engine lost (`restore`, rule 1; `re-sent`, rule 2) is no second publication.
    # "(change, recorded after a restart)": a publication whose PUBACK the lost connection
    # took, found on the broker after the reconnect; still the one making of that version.
    found = re.findall(r"published (\S+) v(\d+) \((\w+)[,)]", controller)
    published = [(t, int(v)) for t, v, reason in found if reason == "change"]
    assert len(published) == len(set(published)), published
    for target in {t for t, _ in published}:
        versions = [int(v) for t, v, _ in found if t == target]
        assert versions == sorted(versions), (target, versions)
    made = Counter((t, v) for t, v, reason in watcher.published if reason == "change")
    twice = [key for key, n in made.items() if n > 1]
    assert not twice, f"published events seen twice: {twice}"
    applied = [int(v) for v in re.findall(r"applied group kiosks v(\d+) ", shim)]
    newest = max(v for t, v in published if t == "group/kiosks")
    assert applied == sorted(applied) and applied[-1] == newest, (applied, newest)

    figures: dict[str, Any] = {
        "restored": sum(1 for *_, reason in found if reason == "restore"),
        "commit_to_in_sync": in_sync - committed,
        "outage_end_to_in_sync": in_sync - ended if end is not None else None,
        "edit_to_drift_seen": None if drift_seen is None else drift_seen - edited,
        "edit_to_commit": committed - edited,
        "controller_drift_event": controller_saw,
        "resent": len(re.findall(r"re-sent ", controller)),
        "outage_began_to_edit": edited - began,
        **{k: v for k, v in loop.notes.items() if k != "after"},
    }
    record_figure(fault, figures)


@pytest.mark.timeout(480)
def test_kill_9_of_the_shims_node(loop: Loop) -> None:
    """Node 1, the shim's, dies and stays dead: the shim moves to another node by itself."""
    run_fault(loop, "kill-9-shims-node", lambda lp: lp.cluster.nodes[0].kill())
    shim = loop.text("shim")
    assert any(f"connected to {url}" in shim for url in loop.cluster.urls[1:]), shim


@pytest.mark.timeout(480)
def test_kill_9_of_the_controllers_node(loop: Loop) -> None:
    """Node 2, the controller's, dies and stays dead: the controller moves to node 3."""
    run_fault(loop, "kill-9-controllers-node", lambda lp: lp.cluster.nodes[1].kill())
    assert f"connected to {loop.cluster.urls[2]}" in loop.text("controller") or (
        f"connected to {loop.cluster.urls[0]}" in loop.text("controller")
    )


@pytest.mark.timeout(480)
@pytest.mark.parametrize("loop", ["leader-apart"], indirect=True)
def test_kill_9_of_the_retained_stream_leader(loop: Loop) -> None:
    """The node that leads ``$MQTT_rmsgs`` (found through the nodes' ``/jsz``) dies and stays
    dead; the shim and the controller are on the other two, so this is the stream's fault
    alone: the one that loses a retained bundle published during the election
    (scale-out.md), which the controller's re-send repairs."""

    def begin(lp: Loop) -> None:
        leader = retained_leader(lp.cluster)
        lp.notes["killed"] = lp.cluster.nodes[leader].name
        lp.notes["killed_clients_node"] = leader in (lp.shim_node, lp.controller_node)
        lp.cluster.nodes[leader].kill()

    run_fault(loop, "kill-9-retained-leader", begin)


@pytest.mark.timeout(600)
def test_kill_9_of_all_nodes(loop: Loop) -> None:
    """Every node dies; the hand edit and the commit happen while none runs; all restart."""

    def begin(lp: Loop) -> None:
        for node in lp.cluster.nodes:
            node.kill()

    run_fault(loop, "kill-9-all-nodes", begin, lambda lp: restart(lp.cluster, 0, 1, 2))


@pytest.mark.timeout(600)
def test_rolling_restart(loop: Loop) -> None:
    """SIGTERM and restart one node at a time; the hand edit and the commit happen while
    the shim's node (the first) is down."""

    def end(lp: Loop) -> None:
        restart(lp.cluster, 0)
        for i in (1, 2):
            lp.cluster.nodes[i].stop()
            restart(lp.cluster, i)

    run_fault(loop, "rolling-restart", lambda lp: lp.cluster.nodes[0].stop(), end)


@pytest.mark.timeout(720)
def test_the_shims_node_cut_off(loop: Loop) -> None:
    """A network split seen from node 1: it stops answering (SIGSTOP) yet keeps its sockets,
    routes and clients' connections open; the shim must notice by its keepalive and move.
    After the device is in sync, the node comes back: the device ends online and in sync."""

    loop.notes["after"] = lambda lp: back_and_settled(lp, lp.cluster.nodes[0].resume)
    run_fault(loop, "cut-off-shims-node", lambda lp: lp.cluster.nodes[0].pause())


@pytest.mark.timeout(780)
@pytest.mark.parametrize("loop", ["splittable"], indirect=True)
def test_a_split_cuts_the_shims_node_off_the_cluster(loop: Loop) -> None:
    """A real network split: node 1's routes are closed and refused (the relays of
    ``engines/splitting.py``) while it keeps running and keeps the shim's connection. The
    isolated node closes its MQTT clients once its JetStream requests time out, so the shim
    moves; the split lasts until the device is in sync on the new commit, then heals: the
    device ends online and in sync."""

    loop.notes["after"] = lambda lp: back_and_settled(lp, lambda: lp.cluster.heal(0))
    run_fault(loop, "split-shims-node", lambda lp: lp.cluster.split(0))
