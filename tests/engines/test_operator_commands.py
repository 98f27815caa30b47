"""The operator verbs on a clustered engine that speaks only MQTT 3.1.1: ``--mqtt-version
auto`` falls back, ``--mqtt-version 5`` says why it cannot, and a ``--broker`` list skips a
dead node."""

from __future__ import annotations

import os
import subprocess
import sys

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.engines import NatsCluster
from setpoint.mosquitto import free_port
from setpoint.proto.repository import BranchStatus, RepositoryStatus
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.engine


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")}
    return subprocess.run(
        [sys.executable, "-m", "setpoint", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def retain_311(url: str, topic: str, payload: bytes) -> None:
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect(host, int(port))
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def test_status_on_a_nats_cluster_falls_back_to_311_and_skips_a_dead_node(
    nats_cluster: NatsCluster, unique_prefix: str
) -> None:
    accepted = BranchStatus("main", "ab" * 20, True, 1.0, "kiosks: new motd")
    retain_311(
        nats_cluster.urls[1],
        Topics(unique_prefix).repository_status(),
        RepositoryStatus({"main": accepted}).to_json(),
    )
    dead = f"mqtt://127.0.0.1:{free_port()}"
    brokers = ",".join([dead, nats_cluster.urls[2], nats_cluster.urls[0]])
    shown = cli("status", "--broker", brokers, "--prefix", unique_prefix)
    assert shown.returncode == 0, shown.stderr
    assert "branch main: HEAD abababababab accepted" in shown.stdout


def test_status_with_mqtt_5_only_names_the_refusal(
    nats_cluster: NatsCluster, unique_prefix: str
) -> None:
    url = nats_cluster.urls[0]
    shown = cli("status", "--broker", url, "--prefix", unique_prefix, "--mqtt-version", "5")
    assert shown.returncode != 0
    assert f"cannot connect to {url}: {url} (MQTT 5): Unsupported protocol version" in (
        shown.stderr
    )


def test_a_list_of_dead_brokers_names_each(unique_prefix: str) -> None:
    dead = [f"mqtt://127.0.0.1:{free_port()}" for _ in range(2)]
    shown = cli("status", "--broker", ",".join(dead), "--prefix", unique_prefix)
    assert shown.returncode != 0
    for url in dead:
        assert f"{url} (MQTT 5): [Errno 111] Connection refused" in shown.stderr
