"""The operator verbs on a clustered engine that speaks only MQTT 3.1.1: ``--mqtt-version
auto`` falls back, ``--mqtt-version 5`` says why it cannot, and a ``--broker`` list skips a
dead node."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from setpoint.engines import NatsCluster
from setpoint.mosquitto import free_port
from setpoint.proto.repository import BranchStatus, RepositoryStatus
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.engine
sys.path.insert(0, str(Path(__file__).parent))

from enginekit import publish_retained, setpoint  # noqa: E402


def test_status_on_a_nats_cluster_falls_back_to_311_and_skips_a_dead_node(
    nats_cluster: NatsCluster, unique_prefix: str
) -> None:
    accepted = BranchStatus("main", "ab" * 20, True, 1.0, "kiosks: new motd")
    publish_retained(
        nats_cluster.urls[1],
        Topics(unique_prefix).repository_status(),
        RepositoryStatus({"main": accepted}).to_json(),
    )
    dead = f"mqtt://127.0.0.1:{free_port()}"
    brokers = ",".join([dead, nats_cluster.urls[2], nats_cluster.urls[0]])
    shown = setpoint("status", "--broker", brokers, "--prefix", unique_prefix)
    assert shown.returncode == 0, shown.stderr
    assert "branch main: HEAD abababababab accepted" in shown.stdout


def test_status_with_mqtt_5_only_names_the_refusal(
    nats_cluster: NatsCluster, unique_prefix: str
) -> None:
    url = nats_cluster.urls[0]
    shown = setpoint("status", "--broker", url, "--prefix", unique_prefix, "--mqtt-version", "5")
    assert shown.returncode != 0
    assert f"cannot connect to {url}: (MQTT 5): Unsupported protocol version" in (shown.stderr)


def test_a_list_of_dead_brokers_names_each(unique_prefix: str) -> None:
    dead = [f"mqtt://127.0.0.1:{free_port()}" for _ in range(2)]
    shown = setpoint("status", "--broker", ",".join(dead), "--prefix", unique_prefix)
    assert shown.returncode != 0
    for url in dead:
        assert f"{url} (MQTT 5): [Errno 111] Connection refused" in shown.stderr
