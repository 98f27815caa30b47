"""``python -m setpoint.mosquitto.broker``: starts quietly, and SIGTERM stops its mosquitto.

mosquitto runs in a session of its own, so a signal to the runner never reaches it; the
runner must stop it, on SIGTERM as on Ctrl-C, or it outlives the runner.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.broker


def mosquitto_pids(conf: Path) -> list[int]:
    """Processes whose command line names this configuration file."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(conf).encode() in cmdline:
            found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has stopped running


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_runner_stops_its_mosquitto_and_warns_nothing(tmp_path: Path, signum: int) -> None:
    data = tmp_path / "broker"
    proc = subprocess.Popen(
        [sys.executable, "-m", "setpoint.mosquitto.broker", "--dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline()
        assert url.startswith("mqtt://127.0.0.1:"), url
        [pid] = mosquitto_pids(data / "mosquitto.conf")
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "RuntimeWarning" not in err and "Warning" not in err, err
        wait_until(lambda: gone(pid), 30, f"mosquitto {pid} to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in mosquitto_pids(data / "mosquitto.conf"):
            os.kill(pid, signal.SIGKILL)  # never leave a broker behind, even if the test fails
