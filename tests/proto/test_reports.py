"""Reported state (msgpack) and presence: round trips and refusals of bad fields."""

from __future__ import annotations

from typing import Any

import pytest

from setpoint.proto import DecodeError, InvalidId, ProtocolError, SchemaError, codec, reports
from setpoint.proto.reports import Applied, Failure, Refusal, Report, ResourceReport

FULL = Report(
    device="kiosk-01",
    time=1_700_000_100,
    seq=42,
    shim_version="0.1.0",
    mode="observe",
    group="kiosks",
    applied_group=Applied("kiosks", 3, "c0ffee", "g" * 64),
    applied_device=Applied("kiosk-01", 2, "c0ffee", "d" * 64),
    resources=(
        ResourceReport("motd", "file", "ok", "a" * 64),
        ResourceReport("tz", "setting", "drifted", "b" * 64, "value changed by hand"),
        ResourceReport("ntp", "command", "skipped", "", "commands are not allowed here"),
    ),
    refusals=(Refusal("kiosks", "group", 2, "rollback", "v2 is older than applied v3", 5),),
    failure=Failure("kiosk-01", 2, "disk full", False, 6),
)


def refused(cls: type[ProtocolError], data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        reports.decode(data)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"


def edited(report: Report = FULL, **changes: Any) -> bytes:
    raw = codec.unpack(reports.encode(report), max_size=reports.MAX_REPORT_BYTES)
    for name, value in changes.items():
        if value is None:
            raw.pop(name, None)
        else:
            raw[name] = value
    return codec.pack(raw)


def test_full_round_trip() -> None:
    assert reports.decode(reports.encode(FULL)) == FULL


def test_minimal_round_trip() -> None:
    report = Report("kiosk-01", 1, 0, "0.1.0")
    assert reports.decode(reports.encode(report)) == report


def test_fields_on_the_wire() -> None:
    raw = codec.unpack(reports.encode(FULL), max_size=reports.MAX_REPORT_BYTES)
    assert sorted(raw) == sorted(
        ["schema", "device", "time", "seq", "shim_version", "mode", "group", "applied",
         "resources", "refusals", "failure"]
    )  # fmt: skip
    assert sorted(raw["applied"]) == ["device", "group"]
    assert raw["applied"]["group"] == {
        "target": "kiosks", "version": 3, "commit": "c0ffee", "digest": "g" * 64
    }  # fmt: skip


def test_how_the_device_observes_is_an_optional_field() -> None:
    for method in ("inotify", "poll"):
        with_method = Report("kiosk-01", 1, 0, "0.1.0", observe=method)
        data = reports.encode(with_method)
        assert codec.unpack(data, max_size=reports.MAX_REPORT_BYTES)["observe"] == method
        assert reports.decode(data) == with_method
    # Not said: not on the wire, so a report from an older agent reads as before.
    assert "observe" not in codec.unpack(reports.encode(FULL), max_size=reports.MAX_REPORT_BYTES)
    assert reports.decode(reports.encode(FULL)).observe == ""
    # A newer agent's method is kept, cut short; a wrong type is refused.
    assert reports.decode(edited(observe="fanotify" * 10)).observe == ("fanotify" * 10)[:16]
    refused(SchemaError, edited(observe=1))


def test_long_texts_are_cut_on_encode_and_decode() -> None:
    long = Report(
        "kiosk-01", 1, 0, "0.1.0",
        resources=(ResourceReport("motd", "file", "failed", "", "x" * 5000),),
        refusals=tuple(Refusal("kiosks", "group", i, "r", "e" * 5000, i) for i in range(20)),
    )  # fmt: skip
    decoded = reports.decode(reports.encode(long))
    assert len(decoded.resources[0].detail) == reports.MAX_DETAIL
    assert len(decoded.refusals) == reports.MAX_REFUSALS
    assert [r.version for r in decoded.refusals] == list(range(12, 20))  # the latest kept
    raw = edited(refusals=[
        {"target": "k", "kind": "group", "version": 1, "reason": "r", "error": "e" * 5000, "at": 1}
    ] * 30)  # fmt: skip
    again = reports.decode(raw)
    assert len(again.refusals) == reports.MAX_REFUSALS
    assert len(again.refusals[0].error) == reports.MAX_DETAIL


def test_unknown_top_level_fields_are_ignored() -> None:
    # Reports are forward compatible: a newer shim may add fields.
    assert reports.decode(edited(battery=87)) == FULL


@pytest.mark.parametrize(
    "changes",
    [
        {"schema": 2},
        {"schema": None},
        {"time": None},
        {"time": "now"},
        {"time": True},
        {"seq": 1.5},
        {"shim_version": 1},
        {"mode": None},
        {"applied": None},
        {"applied": []},
        {"applied": {"group": "kiosks", "device": None}},
        {"applied": {"group": {"target": "kiosks", "version": "3", "commit": "c", "digest": "d"}}},
        {"applied": {"group": {"target": "kiosks", "version": 3, "commit": "c"}}},
        {"resources": None},
        {"resources": ["motd"]},
        {"resources": [{"id": "m", "kind": "file", "status": "great", "digest": "", "detail": ""}]},
        {"resources": [{"id": "m", "kind": "file", "status": "ok", "digest": ""}]},
        {"resources": [{"id": 1, "kind": "file", "status": "ok", "digest": "", "detail": ""}]},
        {"refusals": None},
        {"refusals": [1]},
        {"refusals": [{"target": "k", "kind": "group", "version": 1, "reason": "r", "at": 1}]},
        {"failure": "broken"},
        {"failure": {"target": "k", "version": 1, "error": "e", "permanent": 1, "at": 1}},
    ],
    ids=repr,
)
def test_bad_fields(changes: dict[str, Any]) -> None:
    refused(SchemaError, edited(**changes))


@pytest.mark.parametrize(
    "changes",
    [
        {"device": "Kiosk-01"},
        {"device": "a/b"},
        {"group": "a+b"},
        {"applied": {"group": {"target": "#", "version": 3, "commit": "c", "digest": "d"}}},
    ],
    ids=repr,
)
def test_bad_ids(changes: dict[str, Any]) -> None:
    refused(InvalidId, edited(**changes))


def test_device_of_the_wrong_type() -> None:
    refused(SchemaError, edited(device=5))


def test_report_that_is_not_a_map() -> None:
    refused(SchemaError, codec.pack([1, 2]))


def test_malformed_and_oversized_reports() -> None:
    refused(DecodeError, b"\xc1")
    refused(DecodeError, reports.encode(FULL) + b"\x00")
    with pytest.raises(ProtocolError) as info:
        reports.decode(b"\x00" * (reports.MAX_REPORT_BYTES + 1))
    assert type(info.value).__name__ == "PayloadTooLarge"


@pytest.mark.parametrize(("data", "presence"), [(b"online", "online"), (b"offline", "offline")])
def test_presence(data: bytes, presence: str) -> None:
    assert reports.decode_presence(data) == presence


@pytest.mark.parametrize("data", [b"", b"Online", b"online\n", b'"online"', b"\xa6online"])
def test_bad_presence(data: bytes) -> None:
    with pytest.raises(DecodeError):
        reports.decode_presence(data)
