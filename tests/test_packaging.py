"""The package builds as a wheel, and the wheel alone works: verbs, configs, vectors."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("setpoint-*.whl")
    return built


def test_wheel_holds_every_package_and_its_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "setpoint/cli.py",
        "setpoint/commands/keys.py",
        "setpoint/proto/envelopes.py",
        "setpoint/controller/service.py",
        "setpoint/device_shim/agent.py",
        "setpoint/mosquitto/broker.py",
        "setpoint/mosquitto/setpoint.conf",
        "setpoint/engines/cluster.py",
        "setpoint/engines/nats-cluster.conf",
        "setpoint/engines/nats-cluster-burst.conf",
        "setpoint/proto/SPEC.md",
        "setpoint/proto/vectors/vectors.json",
    ):
        assert module in names, module
    assert not any(name.startswith(("tests/", "setpoint/tests/")) for name in names)


def test_installed_wheel_runs_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    probe = (
        "import setpoint, setpoint.mosquitto.broker as b, setpoint.proto as p;"
        "print(setpoint.__file__);"
        "assert 'listener @PORT@' in b.config_template();"
        "from setpoint.cli import main; raise SystemExit(main(['keys', 'generate', '--out', 'k']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(str(target))
    assert (tmp_path / "k" / "signing.key").stat().st_mode & 0o777 == 0o600
