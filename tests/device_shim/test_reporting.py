"""Per-resource statuses and when a report is due."""

from __future__ import annotations

from setpoint.device_shim.observing import setting_digest
from setpoint.device_shim.planning import (
    Blocked,
    CommandFact,
    FileFact,
    Observed,
    SetSetting,
    SettingsFact,
    Skip,
    WriteFile,
)
from setpoint.device_shim.reporting import Reporter, resource_reports
from setpoint.proto import bundles, reports
from setpoint.proto.bundles import CommandResource, FileResource, SettingResource
from setpoint.proto.reports import Report

MOTD = FileResource("motd", "motd", b"hi")
TZ = SettingResource("tz", "tz", "UTC")
CMD = CommandResource("svc", "true", "true")


def test_statuses_follow_the_steps() -> None:
    desired = [MOTD, TZ, CMD, FileResource("bad", "bad", b"")]
    observed = Observed(
        files={"motd": FileFact("motd", "regular", "motd", "x", 0o644, "dig")},
        settings=SettingsFact({"tz": "CET"}),
        commands={"svc": CommandFact(None, "not allowed here")},
    )
    steps = [
        Blocked("bad", "path leads outside the device root"),
        WriteFile("motd", "motd", b"hi", 0o644, False, "content differs"),
        SetSetting("tz", "tz", "UTC", False, "value differs"),
        Skip("svc", "commands are not allowed"),
    ]
    result = {r.id: r for r in resource_reports(desired, observed, steps)}
    assert result["motd"].status == "drifted" and result["motd"].digest == "dig"
    assert result["motd"].detail == "content differs"
    assert result["tz"].status == "drifted"
    assert result["tz"].digest == setting_digest("tz", "CET")
    assert result["svc"].status == "blocked"  # the device's own policy: not drift
    assert result["svc"].detail == "commands are not allowed"
    assert result["bad"].status == "failed"
    assert [r.id for r in resource_reports(desired, observed, steps)] == [
        "motd",
        "tz",
        "svc",
        "bad",
    ]


def test_in_sync_digests_equal_the_desired_resource_digests() -> None:
    observed = Observed(settings=SettingsFact({"tz": "UTC"}), commands={"svc": CommandFact(True)})
    result = resource_reports([TZ, CMD], observed, [])
    assert [(r.status, r.digest) for r in result] == [
        ("ok", bundles.resource_digest(TZ)),
        ("ok", bundles.resource_digest(CMD)),
    ]


def test_healed_is_kept_until_it_drifts_again_and_failed_wins() -> None:
    observed = Observed(settings=SettingsFact({"tz": "UTC"}))
    [healed] = resource_reports([TZ], observed, [], healed={"tz": "healed at t"})
    assert healed.status == "healed" and healed.detail == "healed at t"
    step = SetSetting("tz", "tz", "UTC", False, "value differs")
    [again] = resource_reports([TZ], observed, [step], healed={"tz": "healed at t"})
    assert again.status == "drifted"
    [failed] = resource_reports([TZ], observed, [step], failed={"tz": "heal failed: disk"})
    assert failed.status == "failed"


def test_unchecked_command_is_pending() -> None:
    [r] = resource_reports([CMD], Observed(commands={"svc": CommandFact(None)}), [])
    assert r.status == "pending"


def reporter(heartbeat: float = 100.0) -> tuple[Reporter, list[int]]:
    reserved: list[int] = []

    def reserve() -> int:
        reserved.append(1)
        return 10 * (len(reserved) + 1)

    return Reporter(heartbeat=heartbeat, first_seq=1, seq_limit=10, reserve=reserve), reserved


def report(mode: str = "enforce") -> Report:
    return Report(device="dev1", time=0, seq=0, shim_version="t", mode=mode)


def test_report_is_due_on_change_and_on_heartbeat_only() -> None:
    rep, _ = reporter(heartbeat=100.0)
    assert rep.due(report(), 0.0)
    stamped = rep.stamp(report(), 1000.0)
    rep.sent(stamped, 0.0)
    assert stamped.seq == 1 and stamped.time == 1000
    assert not rep.due(report(), 1.0)  # same content: nothing to say
    assert not rep.due(report(), 99.9)
    assert rep.due(report(), 100.0)  # heartbeat
    assert rep.due(report("observe"), 1.0)  # any change
    assert rep.next_due() == 100.0


def test_seq_increases_and_reserves_new_blocks() -> None:
    rep, reserved = reporter()
    seqs = []
    for n in range(25):
        stamped = rep.stamp(report(), float(n))
        rep.sent(stamped, float(n))
        seqs.append(stamped.seq)
    assert seqs == list(range(1, 26)) and len(reserved) == 2


def test_forget_makes_the_next_report_due() -> None:
    rep, _ = reporter()
    rep.sent(rep.stamp(report(), 0.0), 0.0)
    rep.forget()
    assert rep.due(report(), 1.0)


def test_reports_encode() -> None:
    rep, _ = reporter()
    assert reports.decode(reports.encode(rep.stamp(report(), 5.0))).seq == 1
