"""The drift verbs end to end: the real ``setpoint`` command in subprocesses, real mosquitto.

``setpoint demo`` is the whole loop (controller, shims, a commit, hand edits, heal, revert,
``status`` and ``diff``); the other tests feed ``status``, ``drift`` and ``diff`` retained
JSON and bundles made here, and check their bad-input paths.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.proto.status import DriftStatus, GroupStatus, ResourceDiff
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker
SETPOINT = [sys.executable, "-m", "setpoint"]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")}
    return subprocess.run(
        [*SETPOINT, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def publish_retained(broker: Any, messages: dict[str, bytes]) -> None:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages.items():
            info = client.publish(topic, payload, qos=1, retain=True)
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_demo_runs_the_whole_loop_and_exits_0() -> None:
    done = cli("demo", "--devices", "2", "--no-color", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "fleet converged" in out
    assert "event drift/opened: kiosk-01 in_sync -> drifted" in out
    assert "event drift/resolved: kiosk-01 drifted -> in_sync" in out
    assert "event drift/opened: gw-01 in_sync -> drifted" in out
    assert "gw-01 stays drifted" in out
    assert "revert converged" in out
    assert "gw-01  gateways  drifted" in out  # setpoint status, in the demo


def test_status_and_drift_read_the_retained_json(broker: Any, unique_prefix: str) -> None:
    topics = Topics(unique_prefix)
    now = time.time()
    drifted = DriftStatus(
        "gw-01", "gateways", "drifted", 2, 2, "c0ffee" * 6, now - 30,
        (ResourceDiff("uplink", "drifted: value differs"),), "observe mode: left alone",
    )  # fmt: skip
    fine = DriftStatus("kiosk-01", "kiosks", "in_sync", 3, 3, "c0ffee" * 6, now - 60)
    group = GroupStatus("gateways", 2, "c0ffee" * 6, "observe", 1,
                        {"in_sync": 0, "drifted": 1}, 0.0, None, now)  # fmt: skip
    publish_retained(
        broker,
        {
            topics.device_drift("gw-01"): drifted.to_json(),
            topics.device_drift("kiosk-01"): fine.to_json(),
            topics.group_status("gateways"): group.to_json(),
        },
    )
    base = ["--broker", broker.url, "--prefix", unique_prefix]
    done = cli("status", *base)
    assert done.returncode == 0, done.stderr
    assert "fleet: 2 devices in 1 groups, 1 in sync (50.0%)" in done.stdout
    assert "gateways  observe  v2" in done.stdout
    # The structure, not the age: "since 30s ago" becomes "31s ago" on a busy machine.
    assert re.search(
        r"^  gw-01  gateways  drifted  since \S+ ago  uplink: drifted: value differs$",
        done.stdout,
        re.MULTILINE,
    ), done.stdout
    assert "\033[" not in done.stdout  # no colour when not on a terminal
    body = json.loads(cli("status", *base, "--json").stdout)
    assert [g["group"] for g in body["groups"]] == ["gateways"]
    assert {d["device"]: d["state"] for d in body["devices"]} == {
        "gw-01": "drifted",
        "kiosk-01": "in_sync",
    }
    current = json.loads(cli("drift", *base, "--json").stdout)
    assert [d["device"] for d in current] == ["gw-01"]
    assert "gw-01" in cli("drift", *base).stdout


def test_drift_follow_prints_events_as_lines(broker: Any, unique_prefix: str) -> None:
    topics = Topics(unique_prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")}
    proc = subprocess.Popen(
        [*SETPOINT, "drift", "--follow", "--broker", broker.url, "--prefix", unique_prefix],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None and proc.stdout is not None
        assert "following drift events" in proc.stderr.readline()
        event = {"type": "drift", "time": time.time(), "device": "kiosk-01", "group": "kiosks",
                 "change": "opened", "previous": "in_sync", "state": "drifted",
                 "resources": [{"id": "motd", "why": "drifted: content differs"}]}  # fmt: skip
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        client.connect(broker.host, broker.port)
        client.loop_start()
        client.publish(topics.event("drift"), json.dumps(event), qos=1).wait_for_publish(10)
        line = proc.stdout.readline()
        client.disconnect()
        client.loop_stop()
        assert "opened" in line and "kiosk-01 (kiosks)  in_sync -> drifted" in line
        assert "motd: drifted: content differs" in line
    finally:
        proc.terminate()
        proc.wait(10)


def test_bad_input_gets_clear_errors(broker: Any, unique_prefix: str, tmp_path: Path) -> None:
    base = ["--broker", broker.url, "--prefix", unique_prefix]
    done = cli("diff", "kiosk-01", *base)
    assert done.returncode == 2
    assert "no bundle is retained for device 'kiosk-01'" in done.stderr
    done = cli("diff", "Not/A/Device", *base)
    assert done.returncode == 2 and "is not valid" in done.stderr
    done = cli("status", "--broker", "http://localhost:1")
    assert done.returncode == 2 and "use mqtt://host:port" in done.stderr
    done = cli("drift", "--broker", "mqtt://127.0.0.1:1")
    assert done.returncode == 2 and "cannot connect" in done.stderr
    done = cli("controller", "--repo", str(tmp_path), "--broker", broker.url,
               "--key", str(tmp_path / "k"), "--share", "Bad Name")  # fmt: skip
    assert done.returncode == 2 and "--share name" in done.stderr
    done = cli("controller", "--repo", str(tmp_path), "--broker", broker.url,
               "--key", str(tmp_path / "k"), "--grace", "-1")  # fmt: skip
    assert done.returncode == 2 and "positive number of seconds" in done.stderr
