"""Rollouts through the real ``setpoint controller`` command: the verb runs the rollouts
extension, so a ring whose content has not passed its gate reports ``gated``.

Real git branches, real mosquitto, the real CLI in subprocesses; what reaches the broker
is read with a plain paho subscriber and with ``setpoint rollout status``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker

ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")},
    "GIT_AUTHOR_NAME": "Bob",
    "GIT_AUTHOR_EMAIL": "bob@example.com",
    "GIT_COMMITTER_NAME": "Bob",
    "GIT_COMMITTER_EMAIL": "bob@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}
SETPOINT = [sys.executable, "-m", "setpoint"]
FILES = {
    "fleet.yaml": "rings:\n  - branch: main\n  - branch: canary\n"
    "    gate: {from: main, in_sync: 100%, healthy_for: 0}\n",
    "groups/qa.yaml": "branch: main\nresources:\n"
    "  - {id: motd, kind: file, path: etc/motd, content: v1}\n",
    "groups/canaries.yaml": "branch: canary\nrollout: {batch: 1}\nresources:\n"
    "  - {id: motd, kind: file, path: etc/motd, content: v1}\n",
    "devices/qa-1.yaml": "group: qa\n",
    "devices/can-1.yaml": "group: canaries\n",
}


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "commit.gpgsign=false", *args],
        cwd=repo, env=ENV, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout.strip()


def ringed_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    for name, text in FILES.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "a ringed fleet")
    git(path, "branch", "canary")
    return path


class RolloutViews:
    """Retained ``groups/+/rollout`` statuses, as any operator tool reads them."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.topics = Topics(prefix)
        self.groups: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-{secrets.token_hex(4)}"
        )
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *_: c.subscribe(self.topics.all_group_rollout(), 1)
        self._client.connect(host, port)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.payload:
            body = json.loads(message.payload)
            with self._cond:
                self.groups[body["group"]] = body
                self._cond.notify_all()

    def wait_state(self, group: str, state: str, timeout: float = 20) -> dict[str, Any]:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self.groups.get(group, {}).get("state") == state, timeout
            )
            assert ok, f"{group} never {state}: {self.groups.get(group)}"
            return self.groups[group]

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def test_setpoint_controller_runs_rollouts_and_reports_gated(
    broker: Any, unique_prefix: str, tmp_path: Path
) -> None:
    repo = ringed_repo(tmp_path / "fleet")
    subprocess.run([*SETPOINT, "keys", "generate", "--out", str(tmp_path / "keys")],
                   env=ENV, check=True, capture_output=True)  # fmt: skip
    views = RolloutViews(broker.host, broker.port, unique_prefix)
    log = (tmp_path / "controller.log").open("wb")
    controller = subprocess.Popen(
        [*SETPOINT, "controller", "--repo", str(repo), "--broker", broker.url,
         "--prefix", unique_prefix, "--key", str(tmp_path / "keys" / "signing.key"),
         "--state-dir", str(tmp_path / "state"), "--tick", "0.2"],
        env=ENV, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        # No device reports: main's content never gets in sync there, so canary waits.
        gated = views.wait_state("canaries", "gated")
        assert "0/1 devices in sync on main" in gated["reason"], gated
        assert views.groups["qa"]["state"] == "idle"
        done = subprocess.run(
            [*SETPOINT, "rollout", "status", "canaries", "--broker", broker.url,
             "--prefix", unique_prefix],
            env=ENV, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "group canaries [canary]" in done.stdout and ": gated: waiting for" in done.stdout
        assert "ring canary (from main): waiting" in done.stdout
    finally:
        controller.send_signal(signal.SIGTERM)
        code = controller.wait(timeout=20)
        log.close()
        views.close()
    assert code == 0, (tmp_path / "controller.log").read_text()
    assert (tmp_path / "state" / "rollouts.json").exists()


def test_demo_rollout_tells_the_whole_story_and_exits_0() -> None:
    done = subprocess.run(
        [*SETPOINT, "demo", "rollout", "--no-color"],
        env=ENV, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "bootstrap: v1 on every ring" in out
    assert "qa-1 in_sync on v2" in out
    for batch in ("1/3 can-1", "2/3 can-2", "3/3 can-3"):
        assert f"event rollout/batch-released: canaries v2 batch {batch}" in out
    assert "setpoint promote canary production: refused: content" in out
    assert "production gated: waiting for" in out
    assert "production went out by itself once canary passed" in out
    assert "event rollout-halted: canaries: batch 1/3 of v3: 1 failed" in out
    assert 'setpoint controller: Revert "Promote main to canary (v3)"' in out
    assert "canary walked back: every device in_sync on v2" in out
    assert "production stays gated on v3 and runs v2" in out
    assert "group prod [production] v2: gated" in out  # setpoint rollout status
    timings = out.split("==> Timings", 1)[1]
    assert "canary: promote -> batch 3/3 in sync" in timings
    assert "canary: promote -> walked back, all in sync on v2" in timings


def test_demo_rollout_refuses_the_loop_only_secure_flag() -> None:
    done = subprocess.run(
        [*SETPOINT, "demo", "rollout", "--secure"],
        env=ENV, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--secure is for the loop scenario only" in done.stderr
    bad = subprocess.run(
        [*SETPOINT, "demo", "rollouts"],
        env=ENV, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "invalid choice: 'rollouts'" in bad.stderr


def retained_group_bundles(broker: Any, prefix: str) -> set[str]:
    """The groups whose bundle the broker retains (a barrier proves all have arrived)."""
    topics = Topics(prefix)
    marker = f"{prefix}/e2e/marker-{secrets.token_hex(4)}"
    seen: set[str] = set()
    done = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == marker:
            done.set()
        elif message.payload:
            seen.add(topics.parse(message.topic).name)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-{secrets.token_hex(4)}")
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        # One connection keeps its order: the retained bundles come before the marker.
        client.subscribe([(topics.all_group_desired(), 1), (marker, 1)])
        client.publish(marker, b"x", qos=1).wait_for_publish(10)
        assert done.wait(10), "the marker never came back"
    finally:
        client.loop_stop()
        client.disconnect()
    return seen


def test_controller_once_keeps_gated_content_back(
    broker: Any, unique_prefix: str, tmp_path: Path
) -> None:
    repo = ringed_repo(tmp_path / "fleet")
    subprocess.run([*SETPOINT, "keys", "generate", "--out", str(tmp_path / "keys")],
                   env=ENV, check=True, capture_output=True)  # fmt: skip
    done = subprocess.run(
        [*SETPOINT, "controller", "--once", "--repo", str(repo), "--broker", broker.url,
         "--prefix", unique_prefix, "--key", str(tmp_path / "keys" / "signing.key"),
         "--state-dir", str(tmp_path / "state")],
        env=ENV, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # main has no gate and goes out; canary's content never ran on main: it stays back.
    assert retained_group_bundles(broker, unique_prefix) == {"qa"}
