"""The controller decides the drift state each report vector names (SPEC 7.1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from setpoint.controller.detecting import Desired, detect
from setpoint.proto import bundles, reports

VECTORS = Path(__file__).resolve().parents[2] / "proto" / "vectors"
DATA: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text())
VALID = {v["name"]: v for v in DATA["valid"]}


@pytest.mark.parametrize("case", DATA["report"], ids=lambda c: c["name"])
def test_the_controller_decides_the_drift_state_of_the_report_vector(
    case: dict[str, Any],
) -> None:
    group_vector = VALID[case["applied"]["group"]]
    device_vector = VALID[case["applied"]["device"]]
    group = bundles.decode(bytes.fromhex(group_vector["payload_hex"]))
    device = bundles.decode(bytes.fromhex(device_vector["payload_hex"]))
    desired = Desired(
        device=device.target,
        group=group.target,
        mode=group.mode,
        group_version=group.version,
        group_digest=group.content_digest(),
        device_version=device.version,
        device_digest=device.content_digest(),
        commit=group.commit,
        resources=tuple(bundles.effective(group, device)),
        published_at=group.issued_at,
    )
    report = reports.decode(bytes.fromhex(case["report_hex"]))
    status = detect(desired, report, "online", report.time + 1.0)
    assert status.state == case["drift_state"], status.reason
