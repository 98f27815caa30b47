"""`setpoint demo --secure`: the whole loop over mutual TLS with the ACL in force."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.broker


def test_demo_runs_on_the_secure_broker() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "setpoint", "demo", "--secure", "--devices", "2", "--no-color"],
        env={k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "mosquitto listening on mqtts://127.0.0.1:" in out
    assert "mutual TLS only" in out
    assert "issued a client certificate per device" in out
    assert "event drift/opened: kiosk-01 in_sync -> drifted" in out
    assert "event drift/resolved: kiosk-01 drifted -> in_sync" in out
    assert "gw-01 stays drifted" in out
    assert "revert converged" in out
    assert "gw-01  gateways  drifted" in out  # setpoint status with the operator's certificate
