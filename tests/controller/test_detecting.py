"""Unit tests of the pure drift detector: one test per rule, and the group summary."""

from __future__ import annotations

from dataclasses import replace

import pytest

from setpoint.controller import detecting
from setpoint.controller.detecting import Desired, detect, summarise
from setpoint.proto import bundles
from setpoint.proto.bundles import FileResource, SettingResource
from setpoint.proto.reports import Applied, Failure, Refusal, Report, ResourceReport

NOW = 1_800_000_000.0
MOTD = FileResource("motd", "etc/motd", b"hello", 0o644)
TZ = SettingResource("tz", "time.zone", "UTC")


def desired(**kw: object) -> Desired:
    base = Desired(
        device="kiosk-01",
        group="kiosks",
        mode="enforce",
        group_version=3,
        group_digest="g3",
        device_version=2,
        device_digest="d2",
        commit="c0ffee",
        resources=(MOTD, TZ),
        published_at=NOW - 10,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def ok(resource: bundles.Resource) -> ResourceReport:
    return ResourceReport(resource.id, resource.kind, "ok", bundles.resource_digest(resource))


def report(**kw: object) -> Report:
    base = Report(
        device="kiosk-01",
        time=int(NOW - 1),
        seq=7,
        shim_version="0.1.0",
        group="kiosks",
        applied_group=Applied("kiosks", 3, "c0ffee", "g3"),
        applied_device=Applied("kiosk-01", 2, "c0ffee", "d2"),
        resources=(ok(MOTD), ok(TZ)),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_in_sync_when_versions_and_resources_match() -> None:
    status = detect(desired(), report(), "online", NOW)
    assert status.state == "in_sync"
    assert status.resources == ()
    assert (status.desired_version, status.applied_version) == (3, 3)


def test_unknown_when_never_reported() -> None:
    assert detect(desired(), None, None, NOW).state == "unknown"


def test_offline_without_any_report() -> None:
    assert detect(desired(), None, "offline", NOW).state == "offline"


def test_offline_keeps_last_known_state_and_age() -> None:
    before = detect(desired(), report(), "online", NOW - 100)
    status = detect(desired(), report(), "offline", NOW, previous=before)
    assert status.state == "offline"
    assert "in_sync" in status.reason
    assert status.last_seen == NOW - 1


def test_offline_is_not_failed_even_with_a_failure_reported() -> None:
    failing = report(failure=Failure("kiosks", 3, "disk full", False, int(NOW)))
    assert detect(desired(), failing, "offline", NOW).state == "offline"


def test_unknown_when_device_not_in_repository() -> None:
    status = detect(None, report(), "online", NOW)
    assert status.state == "unknown"
    assert "not in the fleet repository" in status.reason


def test_failed_when_apply_of_desired_version_failed() -> None:
    failing = report(
        applied_group=Applied("kiosks", 2, "old", "g2"),
        failure=Failure("kiosks", 3, "disk full", True, int(NOW)),
    )
    status = detect(desired(), failing, "online", NOW)
    assert status.state == "failed"
    assert "disk full" in status.reason and "permanent" in status.reason


def test_failure_of_an_older_version_is_not_failed_now() -> None:
    stale = report(failure=Failure("kiosks", 2, "disk full", False, int(NOW)))
    assert detect(desired(), stale, "online", NOW).state == "in_sync"


def test_rejected_when_desired_version_refused() -> None:
    refused = report(
        applied_group=Applied("kiosks", 2, "old", "g2"),
        refusals=(Refusal("kiosks", "group", 3, "expired", "expired at 1", int(NOW)),),
    )
    status = detect(desired(), refused, "online", NOW)
    assert status.state == "rejected"
    assert "expired" in status.reason


def test_refusal_of_a_forgery_with_other_version_does_not_mark_rejected() -> None:
    refused = report(refusals=(Refusal("kiosks", "group", 99, "signature", "bad", int(NOW)),))
    assert detect(desired(), refused, "online", NOW).state == "in_sync"


def test_pending_when_behind_within_grace() -> None:
    behind = report(applied_group=Applied("kiosks", 2, "old", "g2"))
    status = detect(desired(), behind, "online", NOW)
    assert status.state == "pending"
    assert "v2 -> v3" in status.reason and "overdue" not in status.reason


def test_pending_overdue_after_grace() -> None:
    behind = report(applied_group=Applied("kiosks", 2, "old", "g2"))
    status = detect(desired(published_at=NOW - 1000), behind, "online", NOW, grace=300)
    assert status.state == "pending"
    assert status.reason.startswith("overdue")


def test_pending_when_device_still_in_old_group() -> None:
    moved = report(group="gateways", applied_group=Applied("gateways", 5, "x", "gx"))
    assert detect(desired(), moved, "online", NOW).state == "pending"


def test_pending_when_same_version_has_other_content() -> None:
    other = report(applied_group=Applied("kiosks", 3, "c0ffee", "not-g3"))
    assert detect(desired(), other, "online", NOW).state == "pending"


def test_version_never_published_is_not_believed() -> None:
    lying = report(applied_group=Applied("kiosks", 42, "c0ffee", "g42"))
    status = detect(desired(), lying, "online", NOW)
    assert status.state == "unknown"
    assert "never published" in status.reason


@pytest.mark.parametrize(
    ("observed", "why"),
    [
        (ResourceReport("motd", "file", "drifted", "x", "content changed"), "drifted"),
        (ResourceReport("motd", "file", "ok", "other-digest"), "content differs"),
        (ResourceReport("motd", "file", "failed", "", "EACCES"), "failed"),
        # What agents sent before 'blocked' existed: drift, as it always was (SPEC 6.6).
        (ResourceReport("motd", "file", "skipped", "", "no"), "skipped"),
    ],
)
def test_drifted_names_the_resource_and_why(observed: ResourceReport, why: str) -> None:
    status = detect(desired(), report(resources=(observed, ok(TZ))), "online", NOW)
    assert status.state == "drifted"
    assert [r.id for r in status.resources] == ["motd"]
    assert why in status.resources[0].why


def test_a_resource_the_device_policy_refuses_is_blocked_not_drift() -> None:
    refused = ResourceReport("motd", "file", "blocked", "", "device policy forbids commands")
    status = detect(desired(), report(resources=(refused, ok(TZ))), "online", NOW)
    assert status.state == "blocked"
    assert [(r.id, r.why) for r in status.resources] == [
        ("motd", "blocked: device policy forbids commands")
    ]
    assert "allow it on the device or remove it from the repository" in status.reason


def test_real_drift_wins_over_blocked_and_lists_both() -> None:
    refused = ResourceReport("motd", "file", "blocked", "", "device policy forbids commands")
    changed = ResourceReport("tz", "setting", "drifted", "x", "value differs")
    status = detect(desired(), report(resources=(refused, changed)), "online", NOW)
    assert status.state == "drifted"
    assert [r.id for r in status.resources] == ["tz", "motd"]


def test_blocked_devices_are_counted_as_blocked_in_the_group() -> None:
    refused = ResourceReport("motd", "file", "blocked", "", "device policy forbids commands")
    blocked = detect(desired(), report(resources=(refused, ok(TZ))), "online", NOW)
    fine = detect(desired(), report(resources=(ok(MOTD), ok(TZ))), "online", NOW)
    summary = summarise("kiosks", [blocked, fine], version=3, commit="c", mode="enforce", now=NOW)
    assert summary.counts["blocked"] == 1 and summary.counts["in_sync"] == 1
    assert summary.converged_pct == 50.0


def test_drifted_when_a_desired_resource_is_missing_from_the_report() -> None:
    status = detect(desired(), report(resources=(ok(MOTD),)), "online", NOW)
    assert status.state == "drifted"
    assert status.resources[0].id == "tz"


def test_drifted_when_device_has_an_undesired_resource() -> None:
    extra = ResourceReport("old", "file", "ok", "d")
    status = detect(desired(), report(resources=(ok(MOTD), ok(TZ), extra)), "online", NOW)
    assert [r.id for r in status.resources] == ["old"]


def test_healed_resource_counts_as_in_sync() -> None:
    healed = ResourceReport("motd", "file", "healed", bundles.resource_digest(MOTD))
    assert detect(desired(), report(resources=(healed, ok(TZ))), "online", NOW).state == "in_sync"


def test_since_is_kept_while_the_state_lasts_and_reset_on_change() -> None:
    first = detect(desired(), report(), "online", NOW - 50)
    again = detect(desired(), report(), "online", NOW, previous=first)
    assert again.since == NOW - 50
    drifted = detect(desired(), report(resources=(ok(MOTD),)), "online", NOW, previous=again)
    assert drifted.since == NOW


def test_detect_is_level_triggered_same_input_same_answer() -> None:
    a = detect(desired(), report(), "online", NOW)
    b = detect(desired(), report(), "online", NOW, previous=a)
    assert a == b and a.same_condition(b)


def test_summarise_counts_and_convergence() -> None:
    statuses = [
        detect(desired(), report(), "online", NOW),
        detect(
            desired(device="kiosk-02"),
            report(device="kiosk-02", applied_device=Applied("kiosk-02", 2, "c0ffee", "d2")),
            "online",
            NOW,
        ),
        detect(
            desired(device="kiosk-03"),
            report(device="kiosk-03", applied_group=Applied("kiosks", 2, "o", "g2")),
            "online",
            NOW - 5,
        ),
        detect(desired(device="kiosk-04"), None, "offline", NOW),
    ]
    summary = summarise("kiosks", statuses, version=3, commit="c0ffee", mode="enforce", now=NOW)
    assert summary.devices == 4
    assert summary.counts["in_sync"] == 2 and summary.counts["pending"] == 1
    assert summary.counts["offline"] == 1 and summary.counts["drifted"] == 0
    assert summary.converged_pct == 50.0
    assert summary.oldest_pending == NOW - 5


def test_summarise_empty_group_is_converged() -> None:
    summary = summarise("empty", [], version=1, commit="c", mode="observe", now=NOW)
    assert summary.devices == 0 and summary.converged_pct == 100.0


# --- A device held back by a batched rollout (its bundle pins an older group version) ---


def held(**kw: object) -> Desired:
    """kiosk-01 pinned to group v2 while the group's v3 rolls out, published long ago."""
    base = dict(group_version=2, group_digest="", pinned_from=3, published_at=NOW - 86_400)
    return desired(**{**base, **kw})


def on_v2(**kw: object) -> Report:
    return report(applied_group=Applied("kiosks", 2, "c0ffe0", "g2"), **kw)


def test_pinned_device_is_pending_for_its_batch_never_overdue() -> None:
    status = detect(held(), on_v2(), "online", NOW, grace=1.0)
    assert status.state == "pending"
    assert status.reason == (
        "waiting for its batch: group kiosks v3 is rolling out; pinned to v2 (runs v2)"
    )
    assert "overdue" not in status.reason
    assert (status.desired_version, status.applied_version) == (2, 2)


def test_pinned_device_with_changed_resources_is_pending_not_drifted() -> None:
    edited = on_v2(resources=(ResourceReport("motd", "file", "drifted", "x", "edited"),))
    assert detect(held(), edited, "online", NOW).state == "pending"


def test_pinned_device_that_never_applied_its_pin_is_pending() -> None:
    status = detect(held(), report(applied_group=None), "online", NOW, grace=1.0)
    assert status.state == "pending" and "(runs nothing)" in status.reason


def test_pinned_device_failing_its_pinned_version_is_failed() -> None:
    failing = on_v2(failure=Failure("kiosks", 2, "disk full", False, int(NOW)))
    assert detect(held(), failing, "online", NOW).state == "failed"


def test_pinned_device_is_not_blamed_for_the_version_it_was_not_given() -> None:
    failing = on_v2(failure=Failure("kiosks", 3, "disk full", False, int(NOW)))
    assert detect(held(), failing, "online", NOW).state == "pending"
    refused = on_v2(refusals=(Refusal("kiosks", "group", 3, "rollback", "older", int(NOW)),))
    assert detect(held(), refused, "online", NOW).state == "pending"


def test_pinned_device_offline_is_offline() -> None:
    assert detect(held(), on_v2(), "offline", NOW).state == "offline"


def test_released_device_follows_the_group_again() -> None:
    # Its batch released: the pin moved to v3, desired_for gives no pinned_from.
    status = detect(desired(published_at=NOW - 86_400), on_v2(), "online", NOW, grace=1.0)
    assert status.state == "pending" and status.reason.startswith("overdue: ")


def test_an_overdue_heartbeat_is_offline_without_a_will() -> None:
    # The node holding the device's session died: no will, presence still says online.
    wanted, got = desired(published_at=900.0), report(time=1000)
    alive = detect(wanted, got, "online", 1000.0 + 100, reported_at=1000.0)
    assert alive.state == "in_sync"
    gone = detect(wanted, got, "online", 1000.0 + 2701, reported_at=1000.0, previous=alive)
    assert gone.state == "offline"
    assert gone.reason == (
        "offline: no report for over 2700s (heartbeat overdue); last known state in_sync"
    )
    assert gone.last_seen == 1000.0
    # The reason stays put on later passes (nothing is republished every tick).
    again = detect(wanted, got, "online", 1000.0 + 9999, reported_at=1000.0, previous=gone)
    assert again == gone
    # A new report brings it back; silent_after=None trusts presence alone.
    back = detect(wanted, got, "online", 5000.0, reported_at=4999.0, previous=gone)
    assert back.state == "in_sync"
    trusting = detect(wanted, got, "online", 1000.0 + 9999, reported_at=1000.0, silent_after=None)
    assert trusting.state == "in_sync"


def test_is_silent_only_past_the_limit() -> None:
    assert not detecting.is_silent(1000.0, 1000.0 + 2700, 2700)
    assert detecting.is_silent(1000.0, 1000.0 + 2700.5, 2700)
    assert not detecting.is_silent(None, 1e9, 2700)
    assert not detecting.is_silent(0.0, 1e9, None)


def test_a_refused_forgery_of_the_desired_version_is_forgotten_once_it_is_applied() -> None:
    # A badly signed "v3" was refused; then the genuine v3 came and was applied.
    forged = Refusal("kiosks", "group", 3, "signature", "0 valid signature(s)", int(NOW - 5))
    status = detect(desired(), report(refusals=(forged,)), "online", NOW)
    assert status.state == "in_sync", status.reason
    # Still applied on the old version: the refusal is what the device has to say.
    waiting = report(applied_group=Applied("kiosks", 2, "old", "g2"), refusals=(forged,))
    assert detect(desired(), waiting, "online", NOW).state == "rejected"


def test_a_refused_reconcile_command_is_named_in_the_drifted_reason() -> None:
    drifted = ResourceReport("motd", "file", "drifted", "0" * 64, "edited")
    refusal = Refusal("kiosk-01", "command", 42, "signature", "1 valid, 2 needed", int(NOW))
    seen = report(resources=(drifted, ok(TZ)), refusals=(refusal,))
    status = detect(desired(), seen, "online", NOW, command_seq=42)
    assert status.state == "drifted"
    assert "refused reconcile command seq 42: signature" in status.reason
    # Another seq was sent since: that old refusal says nothing about it.
    assert "refused" not in detect(desired(), seen, "online", NOW, command_seq=43).reason
    # Observe mode sends no commands.
    assert "refused" not in detect(desired(mode="observe"), seen, "online", NOW).reason
