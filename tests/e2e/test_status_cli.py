"""``setpoint status`` shows the controller's verdict on each branch: a refused commit is
visible to the operator who looks, with every problem's file and line, in text and JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).parent))

from clikit import retain

from setpoint.proto.repository import BranchStatus, Problem, RepositoryStatus
from setpoint.proto.status import DriftStatus, drift_from_json
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


def test_a_command_the_device_policy_forbids_is_blocked_not_drift(
    tmp_path: Path, broker: Any, unique_prefix: str
) -> None:
    # The example fleet's gateway without a policy file that allows commands: before, it
    # showed `drifted` forever although nobody changed anything.
    assert cli("init", str(tmp_path / "fleet")).returncode == 0
    assert cli("keys", "generate", "--out", str(tmp_path / "keys")).returncode == 0
    (tmp_path / "gw-01").mkdir()
    base = ["--broker", broker.url, "--prefix", unique_prefix]
    topics = Topics(unique_prefix)
    seen: dict[str, DriftStatus] = {}
    cond = threading.Condition()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        with cond:
            if message.payload:
                seen[message.topic] = drift_from_json(bytes(message.payload))
            cond.notify_all()

    watcher = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = on_message
    watcher.connect(broker.host, broker.port)
    watcher.subscribe(topics.device_drift("gw-01"), qos=1)
    watcher.loop_start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "setpoint", *args, *base],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for args in (
            [
                "controller",
                "--repo",
                str(tmp_path / "fleet"),
                "--key",
                str(tmp_path / "keys" / "signing.key"),
                "--state-dir",
                str(tmp_path / "state"),
            ],
            [
                "shim",
                "--device",
                "gw-01",
                "--trust",
                str(tmp_path / "keys" / "signing.pub"),
                "--root",
                str(tmp_path / "gw-01"),
                "--state-dir",
                str(tmp_path / "gw-01-state"),
            ],
        )
    ]
    try:
        topic = topics.device_drift("gw-01")
        with cond:
            assert cond.wait_for(
                lambda: topic in seen and seen[topic].state == "blocked", timeout=90
            ), seen
        blocked = seen[topic]
        assert [r.id for r in blocked.resources] == ["ready-marker"]
        assert blocked.resources[0].why.startswith("blocked: device policy forbids commands")
        shown = cli("status", *base)
        assert "gateways  observe" in shown.stdout and "blocked 1" in shown.stdout
        assert re.search(r"gw-01\s+gateways\s+blocked\s+since", shown.stdout), shown.stdout
        assert "ready-marker: blocked: device policy forbids commands" in shown.stdout
        assert not (tmp_path / "gw-01" / "var" / "lib" / "gateway" / "ready").exists()
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
