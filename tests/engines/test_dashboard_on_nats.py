"""The dashboard on an engine that speaks only MQTT 3.1.1, given every node of the cluster
with the first one dead: it falls back from MQTT 5, moves on to a live node, and shows the
group whose retained status was published on yet another node."""

from __future__ import annotations

import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

from setpoint.commands.demo import start_dashboard
from setpoint.engines import NatsCluster
from setpoint.proto.status import GroupStatus
from setpoint.proto.topics import Topics

sys.path.insert(0, str(Path(__file__).parent))

from enginekit import publish_retained

pytestmark = pytest.mark.engine


def test_dashboard_reads_a_cluster_over_mqtt_3_1_1_past_a_dead_node(
    nats_cluster: NatsCluster, tmp_path: Path, unique_prefix: str
) -> None:
    status = GroupStatus("kiosks", 3, "c0ffee" * 6, "enforce", 0, {}, 100.0)
    publish_retained(
        nats_cluster.urls[2], Topics(unique_prefix).group_status("kiosks"), status.to_json()
    )
    dead = "mqtt://127.0.0.1:1"
    nodes = ",".join([dead, *nats_cluster.urls[:2]])
    with ExitStack() as stack:
        url = start_dashboard(stack, tmp_path / "dashboard.log", nodes, "--prefix", unique_prefix)
        page = ""
        for _ in range(300):  # the page is served before the first retained message is in
            with urllib.request.urlopen(url, timeout=10) as answer:
                page = answer.read().decode()
            if "kiosks" in page:
                break
            time.sleep(0.1)
        assert "kiosks" in page, (tmp_path / "dashboard.log").read_text()
