"""``setpoint status`` shows the controller's verdict on each branch: a refused commit is
visible to the operator who looks, with every problem's file and line, in text and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.proto.repository import BranchStatus, Problem, RepositoryStatus
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")}
    return subprocess.run(
        [sys.executable, "-m", "setpoint", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def retain(broker: Any, topic: str, payload: bytes) -> None:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_status_shows_a_refused_head_with_file_and_line(broker: Any, unique_prefix: str) -> None:
    refused = BranchStatus(
        branch="main",
        head="746209c5e1a2" + "0" * 28,
        accepted=False,
        checked_at=1.0,
        subject="kiosks: new motd\x1b[2J",
        problems=(
            Problem(
                "groups/kiosks.yaml",
                5,
                "resource 'motd': unknown kind 'fiel' (known: command, file, setting)",
            ),
            Problem("devices/kiosk-09.yaml", 1, "group 'kiosk' does not exist\x1b[31m"),
        ),
    )
    canary = BranchStatus("canary", "ab" * 20, True, 1.0, "fine")
    retain(
        broker,
        Topics(unique_prefix).repository_status(),
        RepositoryStatus({"main": refused, "canary": canary}).to_json(),
    )
    base = ["--broker", broker.url, "--prefix", unique_prefix]
    shown = cli("status", *base)
    assert shown.returncode == 0, shown.stderr
    assert "branch canary: HEAD abababababab accepted" in shown.stdout
    assert (
        "branch main: HEAD 746209c5e1a2 refused: groups/kiosks.yaml:5: resource 'motd':"
        " unknown kind 'fiel' (known: command, file, setting)"
    ) in shown.stdout
    # Text from the repository is shown, never obeyed by the terminal.
    assert "    devices/kiosk-09.yaml:1: group 'kiosk' does not exist\\x1b[31m" in shown.stdout
    assert "\x1b" not in shown.stdout
    as_json = json.loads(cli("status", *base, "--json").stdout)
    main = as_json["repository"]["branches"]["main"]
    assert main["accepted"] is False and main["head"] == refused.head
    assert main["problems"][0] == {
        "file": "groups/kiosks.yaml",
        "line": 5,
        "message": "resource 'motd': unknown kind 'fiel' (known: command, file, setting)",
    }


def test_status_without_a_repository_status_says_nothing_of_it(
    broker: Any, unique_prefix: str
) -> None:
    shown = cli("status", "--broker", broker.url, "--prefix", unique_prefix, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["repository"] is None
