"""Fixtures every test directory shares: a real private mosquitto and a topic prefix.

``broker`` is a fresh broker per test (for tests that stop, kill or wipe it);
``broker_session`` is one broker for the whole run, for tests that only talk through it.
Both come from ``setpoint.mosquitto.Broker``, started from ``mosquitto/setpoint.conf`` on a
free loopback port, never the machine's own broker.

``nats_cluster`` is one 3-node NATS cluster (JetStream + MQTT, ``engines/nats-cluster.conf``)
for the whole run, for tests that only talk through it; ``nats_cluster_fresh`` is a cluster
per test, for tests that kill, pause or restart nodes; ``nats_cluster_splittable`` is one per
test whose routes go through relays that can cut a node off (``cluster.split(i)``). None uses
the machine's own NATS.

``dynsec_plugin`` is the path of mosquitto's dynamic security plugin, for a broker whose
ACLs refuse a subscription (the test is skipped without it).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from setpoint.engines import NatsCluster
from setpoint.mosquitto import Broker


@pytest.fixture(scope="session")
def broker_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker(tmp_path_factory.mktemp("broker-session")) as broker:
        yield broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path_factory.mktemp("nats-session")) as cluster:
        yield cluster


@pytest.fixture
def nats_cluster_fresh(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats") as cluster:
        yield cluster


DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"


@pytest.fixture
def dynsec_plugin() -> Path:
    """mosquitto's dynamic security plugin (in Debian's mosquitto package). Its ACLs can
    refuse a subscription (mosquitto's acl_file never does: it is checked on delivery)."""
    found = sorted(Path("/usr/lib").glob(f"*/{DYNSEC_PLUGIN}")) + sorted(
        Path("/usr/lib").glob(DYNSEC_PLUGIN)
    )
    if not found:
        pytest.skip(f"{DYNSEC_PLUGIN} not found under /usr/lib (apt-get install mosquitto)")
    return found[0]


@pytest.fixture
def nats_cluster_splittable(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats", splittable=True) as cluster:
        yield cluster


@pytest.fixture
def unique_prefix() -> str:
    """A topic prefix no other test uses, so tests sharing a broker never see each other."""
    return f"setpoint-test/{secrets.token_hex(4)}/v1"
