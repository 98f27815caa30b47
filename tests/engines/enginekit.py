"""What the engine tests share: the real ``setpoint`` command in a clean environment, git
with a fixed author, and a plain MQTT 3.1.1 publisher (NATS speaks nothing newer)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger("setpoint.faults")

SETPOINT = [sys.executable, "-m", "setpoint"]
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")},
    "GIT_AUTHOR_NAME": "Bob",
    "GIT_AUTHOR_EMAIL": "bob@example.com",
    "GIT_COMMITTER_NAME": "Bob",
    "GIT_COMMITTER_EMAIL": "bob@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def setpoint(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SETPOINT, *args], capture_output=True, text=True, timeout=timeout, env=ENV, check=False
    )


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "commit.gpgsign=false", *args],
        cwd=repo, env=ENV, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


def publish_retained(url: str, topic: str, payload: bytes, timeout: float = 30) -> None:
    """One retained QoS 1 message over MQTT 3.1.1, acknowledged before this returns."""
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect(host, int(port))
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def record_figure(fault: str, figures: dict[str, object]) -> str:
    """One parseable line of a fault test's figures, ``fault-figure fault=<name> key=value
    ...`` (seconds with two decimals, ``-`` for none), logged, and appended to the file
    ``$SETPOINT_FAULT_FIGURES`` names, if any (``make test-cluster`` collects them there)."""

    def text(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value).replace(" ", "_")

    pairs = (f"{key}={text(value)}" for key, value in figures.items())
    line = " ".join([f"fault-figure fault={fault}", *pairs])
    log.warning("%s", line)
    print(line)
    target = os.environ.get("SETPOINT_FAULT_FIGURES")
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return line
