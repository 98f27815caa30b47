"""``setpoint conformance`` against real agents: the Python shim passes, a broken one fails.

Both run as real processes (``setpoint shim``, or the broken double of it) on the project's
private mosquitto; the kit runs as the real CLI and talks to them over MQTT only, with a
hand edit through ``--edit-cmd``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from setpoint.mosquitto import Broker
from setpoint.mosquitto.broker import free_port
from setpoint.proto import envelopes, shard_of

pytestmark = pytest.mark.broker

SETPOINT = [sys.executable, "-m", "setpoint"]
BROKEN = Path(__file__).with_name("broken_shim.py")
STRAY = Path(__file__).with_name("stray_shard_shim.py")
KIT_TIMEOUT = "20"  # per answer; the run takes seconds when the agent answers


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = tmp_path / "signing.key", tmp_path / "signing.pub"
    private.write_bytes(envelopes.private_key_pem(key))
    private.chmod(0o600)
    public.write_bytes(envelopes.public_key_pem(key.public_key()))
    return private, public


class Agent:
    """A device agent process with its own root and log."""

    def __init__(self, command: list[str], root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self._out = log.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")}
        self.proc = subprocess.Popen(command, stdout=self._out, stderr=self._out, env=env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@pytest.fixture
def start_agent(
    broker_session: Broker, unique_prefix: str, keys: tuple[Path, Path], tmp_path: Path
) -> Iterator[Any]:
    started: list[Agent] = []

    def start(program: list[str], device: str) -> Agent:
        root = tmp_path / f"root-{device}"
        root.mkdir()
        args = [
            "--device",
            device,
            "--broker",
            broker_session.url,
            "--prefix",
            unique_prefix,
            "--trust",
            str(keys[1]),
            "--root",
            str(root),
            # Both agents here are setpoint's shim, whose default state directory is
            # machine-wide (/var/lib/setpoint/DEVICE as root): give each test its own.
            "--state-dir",
            str(tmp_path / f"state-{device}"),
        ]
        agent = Agent([*program, *args], root, tmp_path / f"{device}.log")
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def kit(
    broker: Broker, prefix: str, device: str, key: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *SETPOINT,
            "conformance",
            "--device",
            device,
            "--broker",
            broker.url,
            "--prefix",
            prefix,
            "--trust-key",
            str(key),
            "--timeout",
            KIT_TIMEOUT,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_the_python_shim_passes_the_kit(
    start_agent: Any, broker_session: Broker, unique_prefix: str, keys: tuple[Path, Path]
) -> None:
    agent = start_agent([*SETPOINT, "shim"], "kiosk-01")
    edit = f'echo "edited by hand" >> {agent.root}/"$SETPOINT_EDIT_PATH"'
    result = kit(broker_session, unique_prefix, "kiosk-01", keys[0], "--edit-cmd", edit)
    shown = result.stdout + result.stderr + agent.log.read_text(errors="replace")[-4000:]
    assert result.returncode == 0, shown
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("conformance: CONFORMS"), shown
    assert not [line for line in lines if " FAIL " in line], shown
    # Every group of checks ran, the hand edit included (no SKIP).
    for needle in ("§8 ", "§6.4 ", "§6.5 ", "§6.8 ", "§3 ", "§3.1 ", "§4.2 ", "§6.7 "):
        assert any(line.startswith(needle) for line in lines), needle
    assert not [line for line in lines if " SKIP " in line], shown


def test_a_shim_with_the_group_return_bug_fails_on_section_8(
    start_agent: Any, broker_session: Broker, unique_prefix: str, keys: tuple[Path, Path]
) -> None:
    agent = start_agent([sys.executable, str(BROKEN)], "kiosk-02")
    result = kit(broker_session, unique_prefix, "kiosk-02", keys[0], "--json")
    shown = result.stdout + result.stderr + agent.log.read_text(errors="replace")[-4000:]
    assert result.returncode == 1, shown
    data = json.loads(result.stdout)
    assert data["conforms"] is False
    failed = [r for r in data["results"] if r["verdict"] == "FAIL"]
    assert failed, shown
    assert [r["section"] for r in failed] == ["§8"], failed
    assert "back in group conformance-a" in failed[0]["requirement"]
    assert "applied group conformance-b" in failed[0]["seen"]


def test_a_shim_reporting_under_another_shard_fails_on_section_3_1(
    start_agent: Any, broker_session: Broker, unique_prefix: str, keys: tuple[Path, Path]
) -> None:
    agent = start_agent([sys.executable, str(STRAY)], "kiosk-04")
    result = kit(broker_session, unique_prefix, "kiosk-04", keys[0], "--json")
    shown = result.stdout + result.stderr + agent.log.read_text(errors="replace")[-4000:]
    assert result.returncode == 1, shown
    data = json.loads(result.stdout)
    failed = [r for r in data["results"] if r["verdict"] == "FAIL"]
    assert [r["section"] for r in failed] == ["§3.1"], failed
    own = shard_of("kiosk-04")
    assert own != "0"  # the double strays to shard 0
    assert f"{unique_prefix}/shards/0/devices/kiosk-04/reported" in failed[0]["seen"], failed


def test_the_kit_says_what_is_wrong_with_its_options(
    broker_session: Broker, unique_prefix: str, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    result = kit(broker_session, unique_prefix, "kiosk-03", keys[1])
    assert result.returncode == 2
    assert "--trust-key" in result.stderr and "private signing key" in result.stderr
    result = kit(broker_session, unique_prefix, "Kiosk 03", keys[0])
    assert result.returncode == 2 and "--device" in result.stderr
    result = kit(broker_session, unique_prefix, "kiosk-03", tmp_path / "missing.key")
    assert result.returncode == 2 and "cannot read it" in result.stderr
    result = kit(broker_session, unique_prefix, "kiosk-03", keys[0], "--timeout", "0")
    assert result.returncode == 2 and "--timeout" in result.stderr


def test_the_kit_says_when_the_broker_is_not_there(
    unique_prefix: str, keys: tuple[Path, Path]
) -> None:
    port = free_port()  # nothing listens there
    result = subprocess.run(
        [*SETPOINT, "conformance", "--device", "kiosk-04", "--broker",
         f"mqtt://127.0.0.1:{port}", "--trust-key", str(keys[0])],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"mqtt://127.0.0.1:{port}" in result.stderr
    assert "cannot connect" in result.stderr
