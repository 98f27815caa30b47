"""Running the real ``setpoint`` command in tests: a clean environment and one runner.

Every run gets the test's environment without ``SETPOINT_*`` variables and with an empty
configuration folder of its own (``XDG_CONFIG_HOME``), so neither the developer's shell
nor their ``~/.config/setpoint/config.toml`` changes what a test sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SETPOINT = [sys.executable, "-m", "setpoint"]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def environment(config_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")}
    env.update(GIT_ENV)
    env["XDG_CONFIG_HOME"] = str(config_home)
    env.update(extra or {})
    return env


def run(
    config_home: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SETPOINT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment(config_home, env),
        cwd=cwd,
        check=False,
    )


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        env=environment(repo.parent / "git-config-home"),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def retain(broker: Any, topic: str, payload: bytes) -> None:
    """Publish ``payload`` retained on ``topic`` (QoS 1, acknowledged) and disconnect."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
