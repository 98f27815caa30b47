"""A device writes terminal control sequences into its own report text, hoping that they
reach an operator's terminal through the drift status: the real ``setpoint controller``,
the real ``setpoint drift`` and ``status`` (operator certificate), the secure broker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from kit import Client, LiveController, operator_cli

from setpoint.controller.pki import Pki
from setpoint.mosquitto import SecureBroker
from setpoint.proto import reports

pytestmark = pytest.mark.broker

# Erase the line and write a fake one, set the window title, write the clipboard (OSC 52),
# and a C1 CSI; a newline to start a line of its own.
HOSTILE = (
    "disk full\x1b[2K\r\x1b[32mall devices in sync\x1b[0m\x1b]0;owned\x07"
    "\x1b]52;c;cm0gLXJmIH4=\x07\x9b31m\nkiosk-99  in_sync"
)
CONTROLS = ("\x1b", "\x07", "\x9b", "\r")


def test_control_sequences_in_a_device_report_never_reach_the_terminal(
    secure_broker: SecureBroker, pki: Pki, tmp_path: Path
) -> None:
    live = LiveController(secure_broker, pki, tmp_path)
    topics = live.topics
    operator = Client(secure_broker, pki.operator, "operator-view")
    operator.subscribe(topics.device_drift("dev1"))
    try:
        bundle = live.bundle()
        now = int(time.time())
        report = reports.Report(
            device="dev1", time=now, seq=1, shim_version="0.1.0", group="kiosk",
            failure=reports.Failure("kiosk", bundle.version, HOSTILE, True, now),
        )  # fmt: skip
        device = Client(secure_broker, pki.device("dev1"), "setpoint-shim-dev1")
        assert device.publish(topics.device_presence("dev1"), b"online") == 0
        assert device.publish(topics.device_reported("dev1"), reports.encode(report)) == 0

        def failed() -> list[dict[str, object]]:
            out = []
            for _, payload, _ in operator.received(topics.device_drift("dev1")):
                body = json.loads(payload)
                if body.get("state") == "failed":
                    out.append(body)
            return out

        with operator._cond:
            assert operator._cond.wait_for(lambda: bool(failed()), 60)
        reason = str(failed()[-1]["reason"])
        assert "all devices in sync" in reason  # the text is there, its controls are not
        assert not [c for c in CONTROLS if c in reason], repr(reason)

        for verb in (["drift"], ["status"]):
            shown = operator_cli(secure_broker, pki, *verb)
            assert shown.returncode == 0, shown.stderr
            assert "disk full" in shown.stdout
            assert not [c for c in CONTROLS if c in shown.stdout], repr(shown.stdout)
            # The device's newline is shown as \n: it cannot start a line of its own.
            assert not [
                line for line in shown.stdout.splitlines() if line.startswith("kiosk-99")
            ], shown.stdout
    finally:
        live.close()
