"""The link over several nodes, and the refusals it must not ignore.

* A ``--broker`` list: a dead first node is skipped, and ``kill -9`` of the node in use moves
  the link to another node of a real 3-node NATS cluster.
* A SUBACK failure code (a NATS user not permitted to subscribe: 0x80) is logged with its cause
  and retried with backoff on the same connection until the broker grants it.
* The rotation backoff grows once per round of the node list (pure, no broker).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from setpoint.device_shim.backoff import Backoff
from setpoint.device_shim.config import BrokerSettings
from setpoint.device_shim.link import Link
from setpoint.engines import NatsCluster
from setpoint.engines.cluster import NatsNode, find_nats_server
from setpoint.mosquitto import Broker, free_port


class FixedRandom:
    def random(self) -> float:
        return 1.0  # the nominal delay of each attempt


def _endpoint(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("mqtt://").split(":")
    return host, int(port)


def _link(
    settings: BrokerSettings,
    name: str,
    *,
    on_message: object = None,
    ups: threading.Semaphore | None = None,
    **kw: object,
) -> Link:
    return Link(
        settings,
        client_id=f"test-{name}",
        presence_topic=f"setpoint-test/{name}/presence",
        on_message=on_message or (lambda topic, payload: None),  # type: ignore[arg-type]
        on_connection=lambda up: ups.release() if ups is not None and up else None,
        rng=FixedRandom(),
        **kw,  # type: ignore[arg-type]
    )


def test_the_backoff_grows_once_per_round_of_the_node_list() -> None:
    settings = BrokerSettings("127.0.0.1", 1, alternates=(("127.0.0.1", 2), ("127.0.0.1", 3)))
    link = _link(settings, "rounds", backoff=Backoff(1.0, 30.0))
    assert [link.rotation_delay(a) for a in range(7)] == [1, 1, 1, 2, 2, 2, 4]
    assert link.current_url == "mqtt://127.0.0.1:1"
    link._rotate()
    link._rotate()
    assert link.current_url == "mqtt://127.0.0.1:3"
    link._rotate()
    assert link.current_url == "mqtt://127.0.0.1:1"


@pytest.mark.broker
def test_a_dead_first_node_is_skipped(broker: Broker) -> None:
    ups = threading.Semaphore(0)
    dead = free_port()
    settings = BrokerSettings("127.0.0.1", dead, alternates=((broker.host, broker.port),))
    link = _link(settings, "skip-dead", ups=ups, backoff=Backoff(0.1, 1.0))
    link.start()
    try:
        assert ups.acquire(timeout=30), "never connected to the live node"
        assert link.current_url == broker.url
    finally:
        link.stop()


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_kill_9_of_the_node_in_use_moves_the_link_to_another(
    nats_cluster_fresh: NatsCluster, unique_prefix: str
) -> None:
    cluster = nats_cluster_fresh
    first, *rest = (_endpoint(url) for url in cluster.urls)
    settings = BrokerSettings(*first, alternates=tuple(rest))
    ups = threading.Semaphore(0)
    link = _link(settings, "nats-failover", ups=ups, mqtt311=True, backoff=Backoff(0.5, 5.0))
    link.start()
    try:
        assert ups.acquire(timeout=60), "never connected"
        assert link.current_url == cluster.urls[0]
        cluster.nodes[0].kill()
        killed = time.monotonic()
        assert ups.acquire(timeout=120), "no failover to another node"
        took = time.monotonic() - killed
        assert link.current_url in cluster.urls[1:]
        logging.getLogger(__name__).info("failover after kill -9 took %.2fs", took)
    finally:
        link.stop()


SOLO_CONF = """\
server_name: solo
listen: 127.0.0.1:{node.client_port}
http: 127.0.0.1:{node.http_port}
jetstream {{ store_dir: "{node.dir}" }}
mqtt {{ listen: 127.0.0.1:{node.mqtt_port} }}
authorization {{ users: [
  {{ user: dev, password: pw, permissions: {{ subscribe: {{ deny: [{deny}] }} }} }}
] }}
"""


@pytest.mark.engine
def test_a_refused_subscription_is_logged_with_its_cause_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A real engine that refuses a QoS 1 subscription (NATS answers SUBACK 0x80 when the
    # user may not subscribe, as it does when it cannot create the consumer yet).
    node = NatsNode("solo", tmp_path / "nats", find_nats_server())
    node.conf.write_text(SOLO_CONF.format(node=node, deny='"fleet.refused.>"'))
    refused, granted = "fleet/refused/desired", "fleet/granted/desired"
    got = threading.Event()
    ups = threading.Semaphore(0)
    node.start()
    try:
        deadline = time.monotonic() + 120
        while not node.healthy():
            assert time.monotonic() < deadline, node.tail_log()
            time.sleep(0.1)
        _retain("127.0.0.1", node.mqtt_port, granted, b"bundle")
        link = _link(
            BrokerSettings("127.0.0.1", node.mqtt_port, username="dev", password="pw"),
            "suback",
            ups=ups,
            on_message=lambda t, payload: got.set() if t == granted else None,
            mqtt311=True,
            resubscribe=Backoff(0.2, 0.4),
        )
        link.subscribe_to([refused, granted])
        with caplog.at_level(logging.WARNING, logger="setpoint.shim.link"):
            link.start()
            try:
                assert ups.acquire(timeout=60), "never connected"
                assert got.wait(60), "the granted subscription never delivered"
                warning = f"refused the subscription to {refused}: Unspecified error"
                while caplog.text.count(warning) < 3:  # refused, retried, refused again ...
                    assert time.monotonic() < deadline, caplog.text
                    time.sleep(0.05)
                assert link.connects == 1  # retried on the same connection
                assert granted not in caplog.text
            finally:
                link.stop()
    finally:
        node.kill()


def _retain(host: str, port: int, topic: str, payload: bytes) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.username_pw_set("dev", "pw")
    deadline = time.monotonic() + 60
    while True:  # the engine may be re-reading its configuration
        try:
            client.connect(host, port)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, f"{host}:{port} refuses connections"
            time.sleep(0.2)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()
