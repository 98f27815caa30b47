"""Operator-side JSON: drift status, group status and events round trip and refuse junk."""

from __future__ import annotations

import json

import pytest

from setpoint.proto import DecodeError, ProtocolError, SchemaError, status
from setpoint.proto.status import DRIFT_STATES, DriftStatus, GroupStatus, ResourceDiff

DRIFTED = DriftStatus(
    device="kiosk-01",
    group="kiosks",
    state="drifted",
    desired_version=3,
    applied_version=3,
    commit="c0ffee",
    since=1_700_000_000.5,
    resources=(ResourceDiff("motd", "drifted: content changed"),),
    reason="enforce mode: the device puts it back",
    last_seen=1_700_000_001.0,
    desired_device_version=2,
    applied_device_version=2,
)


def test_drift_states_are_the_contract_states() -> None:
    assert set(DRIFT_STATES) == {
        "in_sync", "pending", "drifted", "failed", "rejected", "blocked", "offline", "unknown"
    }  # fmt: skip


def test_drift_status_round_trip() -> None:
    assert status.drift_from_json(DRIFTED.to_json()) == DRIFTED


def test_drift_status_is_plain_json_with_the_contract_fields() -> None:
    body = json.loads(DRIFTED.to_json())
    for name in ("device", "group", "state", "desired_version", "applied_version", "commit",
                 "resources", "since"):  # fmt: skip
        assert name in body
    assert body["resources"] == [{"id": "motd", "why": "drifted: content changed"}]
    assert DRIFTED.to_json() == status.codec.dumps_json(body)  # sorted keys, compact


def test_same_condition_ignores_time() -> None:
    from dataclasses import replace

    assert DRIFTED.same_condition(replace(DRIFTED, since=0.0, last_seen=None))
    assert not DRIFTED.same_condition(replace(DRIFTED, state="in_sync"))
    assert not DRIFTED.same_condition(None)


@pytest.mark.parametrize(
    "text",
    [
        b"[]",
        b'{"state": "great", "device": "d", "since": 1, "resources": []}',
        b'{"state": "in_sync", "since": 1, "resources": []}',
        b'{"state": "in_sync", "device": "d", "since": "x", "resources": []}',
        b'{"state": "in_sync", "device": "d", "since": 1, "resources": [{"id": "m"}]}',
        b'{"state": "in_sync", "device": "d", "since": 1, "resources": 5}',
    ],
)
def test_bad_drift_status(text: bytes) -> None:
    with pytest.raises(SchemaError):
        status.drift_from_json(text)


def test_drift_status_duplicate_keys() -> None:
    with pytest.raises(DecodeError):
        status.drift_from_json(b'{"state": "in_sync", "state": "drifted"}')


def test_group_status_round_trip() -> None:
    summary = GroupStatus(
        group="kiosks", version=3, commit="c0ffee", mode="enforce", devices=4,
        counts={s: 1 if s in ("in_sync", "drifted", "pending", "offline") else 0
                for s in DRIFT_STATES},
        converged_pct=25.0, oldest_pending=1_700_000_000.0, time=1_700_000_100.0,
    )  # fmt: skip
    assert status.group_status_from_json(summary.to_json()) == summary


@pytest.mark.parametrize("text", [b"[]", b'{"group": "kiosks"}', b'{"bogus": 1}'])
def test_bad_group_status(text: bytes) -> None:
    with pytest.raises(SchemaError):
        status.group_status_from_json(text)


def test_event_round_trip() -> None:
    data = status.event("drift", 1.5, device="kiosk-01", previous="in_sync", state="drifted")
    assert json.loads(data) == {
        "type": "drift", "time": 1.5, "device": "kiosk-01", "previous": "in_sync",
        "state": "drifted",
    }  # fmt: skip
    assert status.event_from_json(data)["type"] == "drift"


@pytest.mark.parametrize("text", [b"[]", b"{}", b'{"type": 1}', b"NaN", b"{"])
def test_bad_event(text: bytes) -> None:
    with pytest.raises(ProtocolError):
        status.event_from_json(text)
