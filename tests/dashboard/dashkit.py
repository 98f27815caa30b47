"""A live fleet for the dashboard's tests: real mosquitto, real git, the real controller and
shims, and the real ``setpoint dashboard``, each a process running the real CLI.

:class:`LiveFleet` lays out a ringed fleet repository (``main`` with an enforce and an
observe group, ``canary`` behind a gate from ``main``), starts the processes and offers what
an operator does by hand: edit a file on a device, commit to the repository.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.commands.demo import process, start_dashboard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from clikit import SETPOINT, environment

# Every CLI run sees a clean environment: no SETPOINT_* variables, no operator config file.
ENV = environment(
    Path(tempfile.mkdtemp(prefix="setpoint-dashboard-config-")),
    {"GIT_AUTHOR_NAME": "Dana Operator", "GIT_AUTHOR_EMAIL": "dana@example.com",
     "GIT_COMMITTER_NAME": "Dana Operator", "GIT_COMMITTER_EMAIL": "dana@example.com"},
)  # fmt: skip
SECRET_VALUE = "s3cr3t-value-never-shown-42"
FILES = {
    "fleet.yaml": "allow_plaintext_secret: true\nrings:\n  - branch: main\n  - branch: canary\n"
    "    gate: {from: main, in_sync: 100%, healthy_for: 3600}\n",
    "groups/kiosks.yaml": "mode: enforce\nresources:\n"
    '  - {id: motd, kind: file, path: etc/motd, content: "Welcome to ${site}\\n"}\n'
    "  - {id: log-level, kind: setting, key: log_level, value: info}\n",
    "groups/gateways.yaml": "mode: observe\nresources:\n"
    "  - {id: uplink-interval, kind: setting, key: uplink_interval_s, value: 30}\n",
    "groups/lobby.yaml": "branch: canary\nmode: enforce\nresources:\n"
    "  - {id: motd, kind: file, path: etc/motd, content: lobby}\n",
    "devices/kiosk-01.yaml": "group: kiosks\nvars: {site: hall}\n",
    # A plaintext secret: only in a device's own file, and only with allow_plaintext_secret
    # (sealing needs the device's age key; the page must hide the value either way).
    "devices/gw-01.yaml": "group: gateways\nresources:\n"
    f"  - {{id: api-token, kind: setting, key: api_token, value: {SECRET_VALUE}, secret: true}}\n",
    "devices/lobby-01.yaml": "group: lobby\n",
}
RUNNING = ("kiosk-01", "gw-01")  # lobby-01 never runs: canary's gate has a device to wait on


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "commit.gpgsign=false", *args],
        cwd=repo, env=ENV, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout.strip()


def publish(broker: Any, messages: list[tuple[str, bytes, bool]]) -> None:
    """Publish ``(topic, payload, retain)`` messages at QoS 1, as any client could."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload, retain in messages:
            client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


class LiveFleet:
    """The repository, the processes and the dashboard's URL."""

    def __init__(
        self, stack: ExitStack, work: Path, broker: Any, prefix: str, *controller_args: str
    ) -> None:
        self.work, self.broker, self.prefix = work, broker, prefix
        self.repo = work / "fleet"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True)
        self.repo.mkdir()
        git(self.repo, "init", "-q", "-b", "main")
        for name, text in FILES.items():
            (self.repo / name).parent.mkdir(parents=True, exist_ok=True)
            (self.repo / name).write_text(text)
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "-m", "a ringed fleet")
        git(self.repo, "branch", "canary")
        subprocess.run([*SETPOINT, "keys", "generate", "--out", str(work / "keys")],
                       env=ENV, check=True, capture_output=True)  # fmt: skip
        self.controller = stack.enter_context(
            process(
                [*SETPOINT, "controller", "--repo", str(self.repo), "--broker", broker.url,
                 "--prefix", prefix, "--key", str(work / "keys" / "signing.key"),
                 "--state-dir", str(work / "controller-state"), "--tick", "0.2",
                 "--grace", "20", "--reconcile-interval", "5", *controller_args],
                self.logs / "controller.log",
            )
        )  # fmt: skip
        config = work / "device.json"
        config.write_text('{"allow_commands": true}\n')
        self.roots: dict[str, Path] = {}
        for device in RUNNING:
            self.roots[device] = work / "devices" / device / "root"
            self.roots[device].mkdir(parents=True)
            stack.enter_context(
                process(
                    [*SETPOINT, "shim", "--device", device, "--broker", broker.url,
                     "--prefix", prefix, "--trust", str(work / "keys" / "signing.pub"),
                     "--root", str(self.roots[device]),
                     "--state-dir", str(work / "devices" / device / "state"),
                     "--config", str(config), "--observe-interval", "0.3",
                     "--heartbeat", "60"],
                    self.logs / f"shim-{device}.log",
                )
            )  # fmt: skip
        self.url = start_dashboard(
            stack, self.logs / "dashboard.log", broker.url, "--prefix", prefix,
            "--trust", str(work / "keys" / "signing.pub"),
            "--commit-url", "https://git.example/fleet/commit/{commit}",
        )  # fmt: skip

    def edit_setting(self, device: str, key: str, value: Any) -> None:
        """What someone with a shell on the device does: change a managed setting."""
        settings = self.roots[device] / ".setpoint" / "settings.json"
        values = json.loads(settings.read_text())
        values[key] = value
        settings.write_text(json.dumps(values))

    def commit(self, files: dict[str, str], message: str) -> str:
        for name, text in files.items():
            (self.repo / name).write_text(text)
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "-m", message)
        return git(self.repo, "rev-parse", "HEAD")

    def logs_text(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.logs.glob("*.log"))
        )
