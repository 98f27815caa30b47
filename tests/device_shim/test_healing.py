"""How long the device says it put a resource back: the pure :class:`Heals`, then a real
shim against a real mosquitto, whose own report comes back to it."""

from __future__ import annotations

import pytest
from shimkit import Fleet, Shims, on_versions, statuses

from setpoint.device_shim.healing import Heals
from setpoint.proto.bundles import FileResource, SettingResource
from setpoint.proto.reports import MAX_DETAIL, Report, ResourceReport

MOTD = FileResource("motd", "etc/motd", b"hello ${name}\n", 0o644)
TZ = SettingResource("tz", "tz", "UTC")


def report(*healed: tuple[str, str]) -> Report:
    return Report(
        device="dev1",
        time=0,
        seq=1,
        shim_version="test",
        mode="enforce",
        resources=tuple(ResourceReport(rid, "file", "healed", "", d) for rid, d in healed),
    )


# --- The decisions (no broker) ------------------------------------------------------------


def test_a_heal_that_came_back_ends_with_the_next_version() -> None:
    heals = Heals()
    heals.echoed(report())  # the broker echoes this device's reports
    heals.healed("motd", "healed at T: was content differs")
    assert heals.details == {"motd": "healed at T: was content differs"}
    assert heals.echoed(report(("motd", "healed at T: was content differs"))) == {"motd"}
    assert heals.untold() == frozenset()
    heals.applied({"motd", "tz"})
    assert heals.details == {}


def test_a_heal_no_report_carried_back_outlives_the_next_version() -> None:
    heals = Heals()
    heals.echoed(report())
    heals.healed("motd", "healed at T: was content differs")
    heals.healed("gone", "healed at T: was missing")
    assert not heals.echoed(report(("motd", "healed at EARLIER: was mode differs")))  # older
    heals.applied({"motd", "tz"})  # the new version no longer has "gone"
    assert heals.details == {"motd": "healed at T: was content differs"}
    heals.echoed(report(("motd", "healed at T: was content differs")))
    heals.applied({"motd", "tz"})
    assert heals.details == {}


def test_a_heal_drifted_again_is_no_longer_healed() -> None:
    heals = Heals()
    heals.echoed(report())
    heals.healed("motd", "healed at T: was content differs")
    heals.drifted("motd")
    assert heals.details == {} and heals.untold() == frozenset()


def test_without_echoes_nothing_outlives_a_version() -> None:
    """A broker that does not let the device read its own topic never echoes: the plain
    rule, or the heal would be carried for ever."""
    heals = Heals()
    heals.healed("motd", "healed at T: was content differs")
    heals.applied({"motd"})
    assert heals.details == {}


def test_a_long_detail_is_told_as_a_report_carries_it() -> None:
    heals = Heals()
    heals.echoed(report())
    long = "healed at T: was " + "x" * (2 * MAX_DETAIL)
    heals.healed("motd", long)
    heals.echoed(report(("motd", long[:MAX_DETAIL])))
    assert heals.untold() == frozenset()


# --- A real shim, a real mosquitto --------------------------------------------------------


@pytest.mark.broker
def test_a_heal_told_through_the_broker_ends_with_the_next_version(
    fleet: Fleet, shims: Shims
) -> None:
    """The shim's own report carrying the heal comes back from mosquitto, so the next
    version ends the heal (if the echo were not matched, ``motd`` would stay healed)."""
    fleet.publish_bundle(fleet.group("kiosk", 1, [MOTD, TZ]))
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk", vars={"name": "dev1"}))
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(1, 1))
    (shim.config.root / "etc" / "motd").write_text("hand edit\n")
    fleet.wait_report("dev1", lambda r: statuses(r)["motd"] == "healed")
    shim.wait_event("heal-told")  # its own report came back
    fleet.publish_bundle(fleet.group("kiosk", 2, [MOTD, TZ]))
    after = fleet.wait_report("dev1", on_versions(2, 1))
    assert statuses(after) == {"motd": "ok", "tz": "ok"}
