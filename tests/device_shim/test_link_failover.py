"""The link over several nodes, and the refusals it must not ignore.

Real brokers: two mosquittos (a dead, killed or refusing first node and a live second one),
a mosquitto whose dynamic-security ACL refuses a subscription until an administrator's
command allows it, and, opt-in with the cluster fault tests (``make test-cluster``), a
3-node NATS cluster whose node in use is killed. The silent node is a plain listening
socket that accepts and never answers CONNACK.

Pure parts (no broker): the rotation backoff grows once per round of the node list; a SUBACK
that arrives before the subscribing thread has recorded its message id is not lost.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from setpoint.device_shim.backoff import Backoff
from setpoint.device_shim.config import BrokerSettings
from setpoint.device_shim.link import Link
from setpoint.engines import NatsCluster
from setpoint.mosquitto import Broker, free_port

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))

LINK_LOG = "setpoint.shim.link"


class FixedRandom:
    def random(self) -> float:
        return 1.0  # the nominal delay of each attempt


class LogWatch(logging.Handler):
    """The link's log lines, waited on (the link logs from its own thread)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.lines.append(record.getMessage())
            self._cond.notify_all()

    def count(self, text: str) -> int:
        with self._cond:
            return sum(text in line for line in self.lines)

    def wait_for(self, text: str, times: int = 1, timeout: float = 30) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum(text in line for line in self.lines) >= times, timeout
            )
            assert ok, f"{text!r} not logged {times} times:\n" + "\n".join(self.lines)


@pytest.fixture
def link_log() -> Iterator[LogWatch]:
    watch = LogWatch()
    logger = logging.getLogger(LINK_LOG)
    old = logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(old)


def nodes(*endpoints: tuple[str, int], **kw: Any) -> BrokerSettings:
    (host, port), *rest = endpoints
    return BrokerSettings(host, port, others=tuple(rest), **kw)


def make_link(
    settings: BrokerSettings,
    name: str,
    *,
    ups: threading.Semaphore | None = None,
    on_message: Any = None,
    **kw: Any,
) -> Link:
    return Link(
        settings,
        client_id=f"test-{name}",
        presence_topic=f"setpoint-test/acl/granted/{name}/presence",
        on_message=on_message or (lambda topic, payload: None),
        on_connection=lambda up: ups.release() if ups is not None and up else None,
        rng=FixedRandom(),
        **kw,
    )


def endpoint(broker: Broker) -> tuple[str, int]:
    return broker.host, broker.port


# Pure.


def test_the_backoff_grows_once_per_round_of_the_node_list() -> None:
    link = make_link(nodes(("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)), "rounds",
                     backoff=Backoff(1.0, 30.0))  # fmt: skip
    assert [link.rotation_delay(a) for a in range(10)] == [1, 1, 1, 2, 2, 2, 4, 4, 4, 8]
    assert [link.rotation_delay(a) for a in range(30, 33)] == [30, 30, 30]  # the cap
    assert link.current_url == "mqtt://127.0.0.1:1"
    link._rotate()
    link._rotate()
    assert link.current_url == "mqtt://127.0.0.1:3"
    link._rotate()
    assert link.current_url == "mqtt://127.0.0.1:1"


def test_one_node_backs_off_on_every_failure() -> None:
    link = make_link(nodes(("127.0.0.1", 1)), "one", backoff=Backoff(1.0, 30.0))
    assert [link.rotation_delay(a) for a in range(4)] == [1, 2, 4, 8]


REFUSED = ReasonCode(PacketTypes.SUBACK, identifier=0x87)
GRANTED = ReasonCode(PacketTypes.SUBACK, identifier=1)


class RacingClient:
    """A paho stand-in whose SUBACK is handled (as by the network thread) before
    ``subscribe`` returns its message id to the caller."""

    def __init__(self, link: Link, reasons: list[ReasonCode], *, early: bool) -> None:
        self.link, self.reasons, self.early = link, reasons, early

    def subscribe(self, topics: list[tuple[str, int]]) -> tuple[mqtt.MQTTErrorCode, int]:
        if self.early:
            self.link._on_subscribe(self, None, 7, self.reasons, None)  # type: ignore[arg-type]
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS, 7


@pytest.mark.parametrize("early", [True, False], ids=["suback-first", "mid-first"])
def test_a_refusal_is_noted_whichever_comes_first_suback_or_mid(early: bool) -> None:
    link = make_link(nodes(("127.0.0.1", 1)), "race", resubscribe=Backoff(2.0, 8.0))
    client = RacingClient(link, [GRANTED, REFUSED], early=early)
    link._subscribe(client, ["t/granted", "t/refused"])  # type: ignore[arg-type]
    if not early:
        link._on_subscribe(client, None, 7, [GRANTED, REFUSED], None)  # type: ignore[arg-type]
    assert link._refused == {"t/refused"}
    assert link._resubscribe_at is not None
    assert link._pending == {} and link._early == {}


# Real brokers.


def wait_connected_to(link: Link, ups: threading.Semaphore, url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while link.current_url != url or not link.connected:
        assert ups.acquire(timeout=max(0.0, deadline - time.monotonic())), (
            f"not connected to {url} (at {link.current_url}, connected={link.connected})"
        )


@pytest.mark.broker
def test_a_dead_first_node_is_skipped(broker: Broker, link_log: LogWatch) -> None:
    ups = threading.Semaphore(0)
    dead = ("127.0.0.1", free_port())
    link = make_link(nodes(dead, endpoint(broker)), "skip-dead", ups=ups,
                     backoff=Backoff(0.1, 1.0))  # fmt: skip
    link.start()
    try:
        wait_connected_to(link, ups, broker.url)
        assert link.connects == 1
        link_log.wait_for(
            f"broker mqtt://127.0.0.1:{dead[1]} unreachable (ConnectionRefusedError:"
            f" [Errno 111] Connection refused); trying {broker.url}"
        )
    finally:
        link.stop()


@pytest.mark.broker
def test_nodes_found_in_dns_are_asked_again_when_every_node_failed(
    broker: Broker, link_log: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dnskit import dns_server

    ups = threading.Semaphore(0)
    dead = free_port()
    with dns_server() as dns:
        monkeypatch.setenv("SETPOINT_DNS_SERVER", dns.address)
        # At start the cluster was one node, now dead; DNS now names the live one.
        dns.zone["_mqtt._tcp.moving.example.test"] = [(0, 0, broker.port, "localhost.")]
        settings = nodes(("localhost", dead), discovery="mqtt+srv://moving.example.test")
        link = make_link(settings, "rediscover", ups=ups, backoff=Backoff(0.1, 1.0))
        link.start()
        try:
            wait_connected_to(link, ups, f"mqtt://localhost:{broker.port}")
            link_log.wait_for(
                f"every node failed; DNS now gives mqtt://localhost:{broker.port}"
                f" (was mqtt://localhost:{dead})"
            )
            # Asked once, after the round failed: not on every reconnect.
            assert dns.queries == ["_mqtt._tcp.moving.example.test"]
        finally:
            link.stop()


@pytest.mark.broker
def test_a_failed_lookup_keeps_the_nodes_the_link_had(
    link_log: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dnskit import dns_server

    dead = free_port()
    with dns_server() as dns:
        monkeypatch.setenv("SETPOINT_DNS_SERVER", dns.address)
        settings = nodes(("localhost", dead), discovery="mqtt+srv://gone.example.test")
        link = make_link(settings, "lookup-fails", backoff=Backoff(0.1, 0.2))
        link.start()
        try:
            link_log.wait_for(
                f"every node failed; DNS gave no new list, keeping mqtt://localhost:{dead}:"
                " mqtt+srv://gone.example.test: _mqtt._tcp.gone.example.test does not exist"
            )
            assert link.current_url == f"mqtt://localhost:{dead}"
        finally:
            link.stop()


@pytest.mark.broker
def test_kill_9_of_the_node_in_use_moves_the_link_to_the_next(
    tmp_path: Path, link_log: LogWatch
) -> None:
    ups = threading.Semaphore(0)
    with Broker(tmp_path / "one") as one, Broker(tmp_path / "two") as two:
        link = make_link(nodes(endpoint(one), endpoint(two)), "kill-9", ups=ups,
                         backoff=Backoff(0.1, 1.0))  # fmt: skip
        link.start()
        try:
            wait_connected_to(link, ups, one.url)
            one.kill()
            wait_connected_to(link, ups, two.url)
            assert link.connects == 2
            link_log.wait_for(f"connection to {one.url} lost after")
            link_log.wait_for("(the socket closed without a DISCONNECT: the node stopped")
            link_log.wait_for(f"trying {two.url}")
        finally:
            link.stop()


@pytest.mark.broker
def test_a_refused_connack_moves_the_link_to_the_next_node(
    tmp_path: Path, link_log: LogWatch
) -> None:
    ups = threading.Semaphore(0)
    closed = Broker(tmp_path / "closed")  # anonymous clients refused: CONNACK 0x87
    closed.conf.write_text(
        closed.conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
    )
    with closed, Broker(tmp_path / "open") as open_:
        link = make_link(nodes(endpoint(closed), endpoint(open_)), "connack", ups=ups,
                         backoff=Backoff(0.1, 1.0))  # fmt: skip
        link.start()
        try:
            wait_connected_to(link, ups, open_.url)
            link_log.wait_for(
                f"broker {closed.url} refused the connection: Not authorized; trying {open_.url}"
            )
        finally:
            link.stop()


@pytest.fixture
def silent_node() -> Iterator[tuple[str, int]]:
    """A node that accepts TCP connections and never says a word (no CONNACK)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.getsockname()[1]
    finally:
        done.set()
        server.close()
        for conn in accepted:
            conn.close()
        thread.join(5)


@pytest.mark.broker
def test_a_node_that_sends_no_connack_is_left_after_the_connect_timeout(
    broker: Broker, silent_node: tuple[str, int], link_log: LogWatch
) -> None:
    ups = threading.Semaphore(0)
    silent_url = f"mqtt://127.0.0.1:{silent_node[1]}"
    link = make_link(nodes(silent_node, endpoint(broker)), "silent", ups=ups,
                     backoff=Backoff(0.1, 1.0), connect_timeout=1.0)  # fmt: skip
    link.start()
    try:
        wait_connected_to(link, ups, broker.url)
        link_log.wait_for(
            f"broker {silent_url} accepted the connection but sent no CONNACK within 1s"
        )
        link_log.wait_for(f"trying {broker.url}")
    finally:
        link.stop()


def dynsec_broker(directory: Path, plugin: Path) -> Broker:
    """A mosquitto whose anonymous clients may subscribe to ``.../granted/#`` only, until
    :func:`allow_every_subscription` changes the default (which, unlike a change to a role,
    does not disconnect the clients)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "dynamic-security.json"
    config.write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True,
                             "subscribe": False, "unsubscribe": True},
        "clients": [],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "devices"}]}],
        "anonymousGroup": "anonymous",
        "roles": [{"rolename": "devices", "acls": [
            {"acltype": "subscribePattern", "topic": "setpoint-test/acl/granted/#",
             "priority": 0, "allow": True},
            {"acltype": "publishClientSend", "topic": "$CONTROL/dynamic-security/#",
             "priority": 0, "allow": True},
        ]}],
    }))  # fmt: skip
    broker = Broker(directory)
    broker.conf.write_text(
        broker.conf.read_text() + f"plugin {plugin}\nplugin_opt_config_file {config}\n"
    )
    return broker


def allow_every_subscription(broker: Broker) -> None:
    command = {"commands": [{"command": "setDefaultACLAccess",
                             "acls": [{"acltype": "subscribe", "allow": True}]}]}  # fmt: skip
    publish(broker, "$CONTROL/dynamic-security/v1", json.dumps(command).encode(), retain=False)


def publish(broker: Broker, topic: str, payload: bytes, *, retain: bool = True) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.broker
@pytest.mark.parametrize(("mqtt311", "cause"), [
    (False, "Not authorized (0x87): the broker's ACL does not let this client read the topic"),
    (True, "SUBACK 0x80: MQTT 3.1.1 carries no cause"),
], ids=["mqtt5", "mqtt3.1.1"])  # fmt: skip
def test_a_refused_subscription_is_retried_on_the_same_connection(
    tmp_path: Path,
    link_log: LogWatch,
    monkeypatch: pytest.MonkeyPatch,
    dynsec_plugin: Path,
    mqtt311: bool,
    cause: str,
) -> None:
    writers: set[str] = set()
    real_loop_write = mqtt.Client.loop_write

    def recording_loop_write(self: mqtt.Client) -> Any:
        if self._client_id == b"test-suback":  # the link's client, not the test's publishers
            writers.add(threading.current_thread().name)
        return real_loop_write(self)

    monkeypatch.setattr(mqtt.Client, "loop_write", recording_loop_write)
    broker = dynsec_broker(tmp_path / "broker", dynsec_plugin)
    refused, granted = "setpoint-test/acl/refused/desired", "setpoint-test/acl/granted/desired"
    got: dict[str, bytes] = {}
    arrived = threading.Condition()

    def on_message(topic: str, payload: bytes) -> None:
        with arrived:
            got[topic] = payload
            arrived.notify_all()

    ups = threading.Semaphore(0)
    with broker:
        publish(broker, refused, b"bundle for the refused topic")
        publish(broker, granted, b"bundle for the granted topic")
        link = make_link(nodes(endpoint(broker)), "suback", ups=ups, on_message=on_message,
                         mqtt311=mqtt311, resubscribe=Backoff(0.2, 0.4))  # fmt: skip
        link.start()
        try:
            assert ups.acquire(timeout=30), "never connected"
            # The agent's thread asks for both topics on the live connection.
            link.subscribe_to([refused, granted])
            with arrived:
                assert arrived.wait_for(lambda: granted in got, 30), "granted never delivered"
            line = f"broker {broker.url} refused the subscription to {refused}: {cause}"
            link_log.wait_for(line, times=3)  # refused, retried, refused again, ...
            assert refused not in got
            # The operator fixes the ACL; the next retry on the same connection is granted.
            allow_every_subscription(broker)
            with arrived:
                assert arrived.wait_for(lambda: refused in got, 30), "\n".join(link_log.lines)
            assert got[refused] == b"bundle for the refused topic"
            assert link.connects == 1
            assert link_log.count(f"refused the subscription to {granted}") == 0
            link_log.wait_for(f"subscribing again on {broker.url} to {refused}")
        finally:
            link.stop()
    assert writers == {"setpoint-link"}, writers


# A real 3-node NATS cluster: opt-in, with the other cluster fault tests.


@pytest.mark.engine
@pytest.mark.timeout(300)
@pytest.mark.skipif(
    not os.environ.get("SETPOINT_CLUSTER_FAULTS"),
    reason="a cluster fault test: runs with `make test-cluster` (SETPOINT_CLUSTER_FAULTS=1)",
)
def test_kill_9_of_the_nats_node_in_use_moves_the_link_to_another(
    nats_cluster_fresh: NatsCluster, link_log: LogWatch
) -> None:
    cluster = nats_cluster_fresh
    endpoints = [
        (host, int(port))
        for host, port in (url.removeprefix("mqtt://").split(":") for url in cluster.urls)
    ]
    ups = threading.Semaphore(0)
    link = make_link(nodes(*endpoints), "nats-failover", ups=ups, mqtt311=True,
                     backoff=Backoff(0.5, 5.0))  # fmt: skip
    link.subscribe_to(["setpoint-test/nats/desired"])
    link.start()
    try:
        wait_connected_to(link, ups, cluster.urls[0], timeout=60)
        cluster.nodes[0].kill()
        killed = time.monotonic()
        deadline = killed + 120
        while link.current_url == cluster.urls[0] or not link.connected:
            assert ups.acquire(timeout=max(0.0, deadline - time.monotonic())), (
                "no failover to another node:\n" + "\n".join(link_log.lines)
            )
        logging.getLogger(__name__).warning(
            "NATS kill -9 of the link's node: connected to %s after %.2fs",
            link.current_url, time.monotonic() - killed,
        )  # fmt: skip
        assert link.current_url in cluster.urls[1:]
        link_log.wait_for(f"connection to {cluster.urls[0]} lost after")
    finally:
        link.stop()
