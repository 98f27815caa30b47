"""The dashboard given ``--broker mqtt+srv://DOMAIN``: its nodes come from SRV records served
on loopback, and when every node it had failed it asks DNS again and finds the live one."""

from __future__ import annotations

import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from setpoint.commands.demo import start_dashboard
from setpoint.mosquitto import free_port
from setpoint.proto.status import GroupStatus
from setpoint.proto.topics import Topics

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))

from clikit import retain
from dnskit import dns_server

pytestmark = pytest.mark.broker
NAME = "_mqtt._tcp.dash.example.test"


def test_the_dashboard_finds_its_nodes_in_dns_and_asks_again_when_they_fail(
    broker: Any, unique_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status = GroupStatus("kiosks", 3, "c0ffee" * 6, "enforce", 0, {}, 100.0)
    retain(broker, Topics(unique_prefix).group_status("kiosks"), status.to_json())
    log = tmp_path / "dashboard.log"
    with dns_server() as dns, ExitStack() as stack:
        monkeypatch.setenv("SETPOINT_DNS_SERVER", dns.address)
        # At start DNS names one node, which is dead.
        dns.zone[NAME] = [(0, 0, free_port(), "localhost.")]
        url = start_dashboard(stack, log, "mqtt+srv://dash.example.test", "--prefix", unique_prefix)
        dns.zone[NAME] = [(0, 0, broker.port, "localhost.")]  # the cluster moved
        page = ""
        deadline = time.monotonic() + 30
        while "kiosks" not in page and time.monotonic() < deadline:
            with urllib.request.urlopen(url, timeout=10) as answer:
                page = answer.read().decode()
            time.sleep(0.1)
        assert "kiosks" in page, log.read_text()
        assert len(dns.queries) >= 2  # once at start, again after the dead node failed
