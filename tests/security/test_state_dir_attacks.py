"""A local account reads the controller's state directory: the real ``setpoint controller``
with a state directory made beforehand as systemd's ``StateDirectory=`` makes it (0755),
and a repository URL that carries credentials."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from kit import run_controller, stop
from shimkit import wait_for

from setpoint.controller.pki import Pki
from setpoint.mosquitto import SecureBroker

pytestmark = pytest.mark.broker


def test_state_dir_and_mirror_url_are_private(
    secure_broker: SecureBroker, pki: Pki, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    # Nothing listens there: the controller keeps retrying the fetch, which is enough.
    url = "https://alice:hunter2@127.0.0.1:9/fleet.git"
    controller = run_controller(secure_broker, pki, url, tmp_path, "--poll-interval", "60")
    try:
        wait_for(lambda: (state / "mirror.url").exists(), 60, "mirror.url")
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        recorded = (state / "mirror.url").read_text()
        assert "hunter2" not in recorded and "127.0.0.1:9/fleet.git" in recorded
        assert stat.S_IMODE((state / "mirror.url").stat().st_mode) & 0o077 == 0
        for path in (state / "mirror.git").rglob("*"):
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
        for path in state.rglob("*"):
            assert not path.is_file() or b"hunter2" not in path.read_bytes(), path
    finally:
        stop(controller)
    assert "hunter2" not in (tmp_path / "controller.log").read_text()
