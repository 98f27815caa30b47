"""Attacks from a local account on the device, and from the repository onto the device's
file modes, against real shims on a real mosquitto: the shim runs as root (as these tests
do) and the attacker as ``nobody`` in a real subprocess."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import Converged
from shimkit import Fleet, Shims, on_versions

from setpoint.device_shim import DevicePolicy
from setpoint.device_shim.config import default_state_dir
from setpoint.mosquitto import Broker
from setpoint.proto.bundles import FileResource

pytestmark = pytest.mark.broker

NOBODY = 65534
MOTD = FileResource("motd", "etc/motd", b"hello\n", 0o644)

# What the application's account does to a root it owns: swap setpoint's directory for its
# own and leave a journal whose "rollback" copies /etc/shadow out and installs a root-owned
# setuid shell.
_PLANT = """
import json, os, sys
shell = sys.argv[1]
if os.path.isdir(".setpoint"):
    os.rename(".setpoint", ".setpoint-moved")
os.makedirs(".setpoint/state", exist_ok=True)
journal = {
    "schema": 1, "kind": "apply", "target": "x", "label": "planted", "dirs": [],
    "files": [
        {"path": "shadow", "existed": True, "backup": "/etc/shadow", "mode": 0o644,
         "uid": 65534, "gid": 65534},
        {"path": "rootshell", "existed": True, "backup": shell, "mode": 0o4755,
         "uid": 0, "gid": 0},
    ],
}
with open(".setpoint/state/journal.json", "w") as fh:
    json.dump(journal, fh)
print("planted")
"""


# nobody cannot run this virtualenv's interpreter (it lives under /root); the script needs
# the standard library only.
_SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def _as_nobody(script: str, cwd: Path, *args: str) -> str:
    result = subprocess.run(
        [_SYSTEM_PYTHON, "-c", script, *args],
        cwd=cwd, user=NOBODY, group=NOBODY, extra_groups=[],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def app_root(tmp_path: Path) -> Iterator[Path]:
    """A device root owned by the application's account (nobody), reachable by it."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the shim runs as root, the attacker as nobody")
    root = tmp_path / "app-root"
    root.mkdir()
    os.chown(root, NOBODY, NOBODY)
    yield root


@pytest.fixture
def plain_fleet(tmp_path: Path, unique_prefix: str) -> Iterator[Fleet]:
    with Broker(tmp_path / "broker") as broker:
        fleet = Fleet(broker.host, broker.port, unique_prefix, tmp_path / "fleet")
        yield fleet
        fleet.close()


def test_journal_planted_in_a_root_the_application_owns(
    plain_fleet: Fleet, app_root: Path, tmp_path: Path
) -> None:
    fleet = plain_fleet
    device = f"app-{secrets.token_hex(4)}"  # the default state dir is machine-wide
    shims = Shims(fleet, tmp_path)
    state = default_state_dir(device)
    try:
        fleet.publish_bundle(fleet.group("kiosk", 1, [MOTD]))
        fleet.publish_bundle(fleet.device(device, 1, "kiosk"))
        # The shim with its default state directory, as `setpoint shim --root` runs it.
        shim = shims.start(device, root=app_root, state_dir=None)
        fleet.wait_report(device, on_versions(1, 1))
        shim.stop()
        assert "planted" in _as_nobody(_PLANT, app_root, os.path.realpath("/bin/sh"))
        shim = shims.restart(shim)
        mark = shim.mark()
        fleet.publish_bundle(fleet.group("kiosk", 2, [MOTD]))
        fleet.wait_report(device, on_versions(2, 1))
        assert shim.mark() > mark
        # The journal it planted was never read: no copy of /etc/shadow, no setuid shell.
        assert not (app_root / "shadow").exists()
        assert not (app_root / "rootshell").exists()
        assert app_root not in state.parents
    finally:
        shims.close()
        shutil.rmtree(state, ignore_errors=True)


def _shim_cli(root: Path, state: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    pub = tmp_path / "signing.pub"
    if not pub.exists():
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from setpoint.proto import envelopes

        pub.write_bytes(envelopes.public_key_pem(Ed25519PrivateKey.generate().public_key()))
    return subprocess.run(
        [sys.executable, "-m", "setpoint", "shim", "--device", "dev1", "--root", str(root),
         "--state-dir", str(state), "--trust", str(pub), "--broker", "mqtt://127.0.0.1:1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_state_dir_inside_a_root_the_application_owns_is_refused(
    app_root: Path, tmp_path: Path
) -> None:
    # Told to keep its state under that root anyway, the shim refuses to start.
    result = _shim_cli(app_root, app_root / ".setpoint" / "state", tmp_path)
    assert result.returncode != 0
    assert f"is inside {app_root}, owned by uid {NOBODY}" in result.stderr, result.stderr
    assert not (app_root / ".setpoint" / "state" / "lock").exists()


def test_state_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    state.mkdir()
    os.chmod(state, 0o777)
    result = _shim_cli(root, state, tmp_path)
    assert result.returncode != 0
    assert "is writable by group or others (mode 0777)" in result.stderr, result.stderr


def test_journal_without_a_valid_mac_is_refused(tmp_path: Path) -> None:
    # Whoever wrote it, a journal this shim did not write is never rolled "back".
    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    state.mkdir(mode=0o700)
    (state / "journal.json").write_text(
        json.dumps(
            {"body": json.dumps({"files": [{"path": "x", "existed": True, "backup": "0.bak",
                                            "mode": 0o4755, "uid": 0, "gid": 0}]}),
             "mac": "00" * 32}
        )
    )  # fmt: skip
    result = _shim_cli(root, state, tmp_path)
    assert result.returncode != 0
    assert "was not written by this shim" in result.stderr, result.stderr
    assert not (root / "x").exists()


SETUID = FileResource("tool", "usr/local/bin/tool", b"#!/bin/sh\nid\n", 0o4755)


@pytest.mark.parametrize(
    "mode", [0o4755, 0o2755, 0o1777, 0o666], ids=["setuid", "setgid", "sticky", "world-writable"]
)
def test_special_mode_from_the_repository_is_refused_by_the_device(
    converged: Converged, mode: int
) -> None:
    fleet, root = converged.fleet, converged.root
    risky = FileResource("tool", "usr/local/bin/tool", b"#!/bin/sh\nid\n", mode)
    fleet.publish_bundle(fleet.group("kiosk", 3, [risky]))
    report = fleet.wait_report(
        "dev1", lambda r: r.failure is not None and "allow_special_modes" in r.failure.error
    )
    assert f"mode {mode:04o} is" in report.failure.error  # type: ignore[union-attr]
    assert not (root / "usr" / "local" / "bin" / "tool").exists()
    converged.unchanged()


def test_special_mode_allowed_by_the_device_policy(
    converged: Converged, secure_shims: Shims
) -> None:
    fleet = converged.fleet
    shim = secure_shims.restart(converged.shim, policy=DevicePolicy(allow_special_modes=True))
    fleet.publish_bundle(fleet.group("kiosk", 3, [SETUID]))
    fleet.wait_report("dev1", on_versions(3, 2))
    installed = shim.config.root / "usr" / "local" / "bin" / "tool"
    assert stat.S_IMODE(installed.stat().st_mode) == 0o4755
