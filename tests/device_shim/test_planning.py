"""plan(desired, observed): every case, without a broker or a file system."""

from __future__ import annotations

import hashlib

import pytest

from setpoint.device_shim.config import DevicePolicy
from setpoint.device_shim.planning import (
    Blocked,
    CommandFact,
    DeleteManaged,
    FileFact,
    Observed,
    RemoveSetting,
    RunCommand,
    SetMode,
    SetSetting,
    SettingsFact,
    Skip,
    WriteFile,
    changes,
    managed_files_after,
    plan,
    same_value,
)
from setpoint.proto.bundles import CommandResource, FileResource, SettingResource
from setpoint.proto.sealed import Sealed

ALLOW = DevicePolicy(allow_commands=True, command_timeout_cap=30)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def regular(path: str, content: bytes, mode: int = 0o644, real: str | None = None) -> FileFact:
    return FileFact(path, "regular", real or path, sha(content), mode, "d")


def missing(path: str) -> FileFact:
    return FileFact(path, "missing", path)


MOTD = FileResource("motd", "etc/motd", b"hello\n", 0o644)


# Files.


def test_nothing_desired_nothing_observed_is_no_steps() -> None:
    assert plan([], Observed()) == []


def test_file_in_sync_is_no_steps() -> None:
    assert plan([MOTD], Observed(files={"etc/motd": regular("etc/motd", b"hello\n")})) == []


def test_missing_file_is_written_and_managed() -> None:
    steps = plan([MOTD], Observed(files={"etc/motd": missing("etc/motd")}))
    assert steps == [WriteFile("motd", "etc/motd", b"hello\n", 0o644, True, "missing")]


def test_unmanaged_file_with_other_content_is_written_but_not_managed() -> None:
    steps = plan([MOTD], Observed(files={"etc/motd": regular("etc/motd", b"old")}))
    assert steps == [WriteFile("motd", "etc/motd", b"hello\n", 0o644, False, "content differs")]


def test_managed_file_with_other_content_stays_managed() -> None:
    observed = Observed(
        files={"etc/motd": regular("etc/motd", b"old")}, managed_files=frozenset({"etc/motd"})
    )
    [step] = plan([MOTD], observed)
    assert isinstance(step, WriteFile) and step.manage


def test_only_the_mode_differs_is_a_chmod_not_a_write() -> None:
    steps = plan([MOTD], Observed(files={"etc/motd": regular("etc/motd", b"hello\n", 0o600)}))
    assert steps == [SetMode("motd", "etc/motd", 0o644, "mode 0600, want 0644")]


def test_content_and_mode_differ_is_one_write() -> None:
    steps = plan([MOTD], Observed(files={"etc/motd": regular("etc/motd", b"x", 0o600)}))
    assert [type(s) for s in steps] == [WriteFile]


def test_writes_go_to_the_resolved_real_path() -> None:
    fact = FileFact("link/motd", "missing", "real/motd")
    resource = FileResource("motd", "link/motd", b"x")
    [step] = plan([resource], Observed(files={"link/motd": fact}))
    assert isinstance(step, WriteFile) and step.path == "real/motd"


@pytest.mark.parametrize("condition", ["symlink", "escapes", "reserved", "not-regular"])
def test_refused_paths_are_blocked_permanently(condition: str) -> None:
    fact = FileFact("etc/motd", condition, None)  # type: ignore[arg-type]
    [step] = plan([MOTD], Observed(files={"etc/motd": fact}))
    assert isinstance(step, Blocked) and step.permanent and step.resource_id == "motd"


def test_unobservable_path_is_blocked_temporarily() -> None:
    fact = FileFact("etc/motd", "error", "etc/motd", detail="lstat: Permission denied")
    [step] = plan([MOTD], Observed(files={"etc/motd": fact}))
    assert isinstance(step, Blocked) and not step.permanent
    assert "Permission denied" in step.why


def test_unobserved_file_is_blocked_not_guessed() -> None:
    [step] = plan([MOTD], Observed())
    assert isinstance(step, Blocked) and not step.permanent


def test_two_resources_on_one_path_block_the_second() -> None:
    other = FileResource("motd2", "etc/motd", b"other")
    steps = plan([MOTD, other], Observed(files={"etc/motd": regular("etc/motd", b"hello\n")}))
    assert steps == [Blocked("motd2", "same path as resource 'motd'")]


def test_blocked_steps_come_before_any_change() -> None:
    bad = FileResource("bad", "bad", b"x")
    observed = Observed(
        files={"etc/motd": missing("etc/motd"), "bad": FileFact("bad", "escapes", None)}
    )
    steps = plan([MOTD, bad], observed)
    assert isinstance(steps[0], Blocked) and isinstance(steps[1], WriteFile)


# Deleting what the shim created, and nothing else.


def test_managed_file_no_longer_desired_is_deleted() -> None:
    observed = Observed(managed_files=frozenset({"etc/old"}))
    assert plan([], observed) == [DeleteManaged("etc/old")]


def test_unmanaged_files_are_never_deleted() -> None:
    # A file that existed before a bundle named it is not managed: dropping it from the
    # bundle leaves it alone.
    observed = Observed(files={"etc/motd": regular("etc/motd", b"x")})
    assert plan([], observed) == []


def test_managed_file_still_desired_is_not_deleted() -> None:
    observed = Observed(
        files={"etc/motd": regular("etc/motd", b"hello\n")},
        managed_files=frozenset({"etc/motd"}),
    )
    assert plan([MOTD], observed) == []


def test_managed_file_desired_through_another_spelling_is_not_deleted() -> None:
    fact = FileFact("link/motd", "regular", "etc/motd", sha(b"hello\n"), 0o644, "d")
    resource = FileResource("motd", "link/motd", b"hello\n")
    observed = Observed(files={"link/motd": fact}, managed_files=frozenset({"etc/motd"}))
    assert plan([resource], observed) == []


def test_managed_after_deletes_and_creates() -> None:
    steps = [
        WriteFile("a", "a", b"", 0o644, True, "missing"),
        WriteFile("b", "b", b"", 0o644, False, "content differs"),
        DeleteManaged("old"),
    ]
    assert managed_files_after(steps, frozenset({"old", "keep"})) == {"a", "keep"}


# Settings.

TZ = SettingResource("tz", "tz", "UTC")
TOKEN = SettingResource("token", "token", "s3cret", secret=True)


def test_setting_in_sync_is_no_steps() -> None:
    assert plan([TZ], Observed(settings=SettingsFact({"tz": "UTC"}))) == []


def test_missing_setting_is_set() -> None:
    assert plan([TZ], Observed(settings=SettingsFact({}))) == [
        SetSetting("tz", "tz", "UTC", False, "missing")
    ]


def test_changed_setting_is_set() -> None:
    [step] = plan([TZ], Observed(settings=SettingsFact({"tz": "CET"})))
    assert isinstance(step, SetSetting) and step.why == "value differs"


@pytest.mark.parametrize(("have", "want"), [(1, True), (1, 1.0), ("1", 1), (None, "")])
def test_setting_values_compare_with_their_type(have: object, want: object) -> None:
    resource = SettingResource("x", "x", want)  # type: ignore[arg-type]
    [step] = plan([resource], Observed(settings=SettingsFact({"x": have})))  # type: ignore[dict-item]
    assert isinstance(step, SetSetting)
    assert not same_value(have, want)  # type: ignore[arg-type]


def test_unreadable_settings_file_rewrites_every_setting() -> None:
    observed = Observed(settings=SettingsFact({}, readable=False, detail="not valid JSON"))
    steps = plan([TZ, TOKEN], observed)
    assert [s.key for s in steps if isinstance(s, SetSetting)] == ["tz", "token"]
    assert "not valid JSON" in steps[0].why  # type: ignore[union-attr]


def test_secret_value_never_in_a_step_repr() -> None:
    [step] = plan([TOKEN], Observed(settings=SettingsFact({})))
    assert "s3cret" not in repr(step)


def test_managed_setting_no_longer_desired_is_removed() -> None:
    observed = Observed(
        settings=SettingsFact({"tz": "UTC", "old": 1, "handmade": 2}),
        managed_settings=frozenset({"tz", "old"}),
    )
    assert plan([TZ], observed) == [RemoveSetting("old")]


def test_no_removal_when_the_settings_file_is_unreadable() -> None:
    observed = Observed(
        settings=SettingsFact({}, readable=False), managed_settings=frozenset({"old"})
    )
    assert plan([], observed) == []


def test_two_resources_on_one_key_block_the_second() -> None:
    other = SettingResource("tz2", "tz", "CET")
    steps = plan([TZ, other], Observed(settings=SettingsFact({"tz": "UTC"})))
    assert steps == [Blocked("tz2", "same key as resource 'tz'")]


# Commands.

CMD = CommandResource("svc", "test -e done", "touch done", timeout=120)


def test_command_forbidden_by_default_is_skipped_not_run() -> None:
    steps = plan([CMD], Observed(commands={"svc": CommandFact(False)}))
    assert len(steps) == 1 and isinstance(steps[0], Skip)
    assert steps[0].why.startswith("device policy forbids commands (allow them with")
    assert changes(steps) == []


def test_command_not_in_allow_list_is_skipped() -> None:
    policy = DevicePolicy(allow_commands=True, allowed_commands=frozenset({"test -e done"}))
    [step] = plan([CMD], Observed(commands={"svc": CommandFact(False)}), policy)
    assert isinstance(step, Skip) and "allowed_commands" in step.why


def test_command_on_allow_list_runs() -> None:
    policy = DevicePolicy(
        allow_commands=True, allowed_commands=frozenset({"test -e done", "touch done"})
    )
    [step] = plan([CMD], Observed(commands={"svc": CommandFact(False)}), policy)
    assert isinstance(step, RunCommand)


def test_failing_check_runs_apply_with_capped_timeout() -> None:
    [step] = plan([CMD], Observed(commands={"svc": CommandFact(False, "exit 1")}), ALLOW)
    assert step == RunCommand("svc", "test -e done", "touch done", 30, "check failed (exit 1)")


def test_passing_check_is_no_step() -> None:
    assert plan([CMD], Observed(commands={"svc": CommandFact(True)}), ALLOW) == []


def test_unchecked_command_is_no_step() -> None:
    assert plan([CMD], Observed(commands={"svc": CommandFact(None)}), ALLOW) == []


# Order and the whole.


def test_step_order_blocked_files_deletes_settings_commands_skips() -> None:
    bad = FileResource("bad", "bad", b"x")
    skipped = CommandResource("other", "false", "true")
    policy = DevicePolicy(
        allow_commands=True, allowed_commands=frozenset({"test -e done", "touch done"})
    )
    observed = Observed(
        files={"etc/motd": missing("etc/motd"), "bad": FileFact("bad", "symlink", "bad")},
        settings=SettingsFact({}),
        commands={"svc": CommandFact(False), "other": CommandFact(False)},
        managed_files=frozenset({"gone"}),
    )
    steps = plan([skipped, CMD, TZ, MOTD, bad], observed, policy)
    assert [type(s) for s in steps] == [
        Blocked,
        WriteFile,
        DeleteManaged,
        SetSetting,
        RunCommand,
        Skip,
    ]


def test_plan_is_idempotent_once_applied() -> None:
    desired = [MOTD, TZ, CMD]
    after = Observed(
        files={"etc/motd": regular("etc/motd", b"hello\n")},
        settings=SettingsFact({"tz": "UTC"}),
        commands={"svc": CommandFact(True)},
        managed_files=frozenset({"etc/motd"}),
        managed_settings=frozenset({"tz"}),
    )
    assert plan(desired, after, ALLOW) == []


def test_plan_does_not_touch_its_inputs() -> None:
    observed = Observed(files={"etc/motd": missing("etc/motd")}, managed_files=frozenset({"x"}))
    desired = [MOTD]
    plan(desired, observed)
    assert desired == [MOTD] and observed.managed_files == {"x"}


# Sealed values: compared by keyed MAC against the ledger, never by content.

SEALED = Sealed("-----BEGIN AGE ENCRYPTED FILE-----\nYWdl\n-----END AGE ENCRYPTED FILE-----\n")
SEALED_FILE = FileResource("token", "etc/token", b"", 0o600, SEALED)
SEALED_SETTING = SettingResource("api", "api_token", None, True, SEALED)


def keyed(path: str, mac: str, mode: int = 0o600) -> FileFact:
    return FileFact(path, "regular", path, mode=mode, mac=mac)


def test_a_sealed_file_never_opened_here_is_written_from_its_ciphertext() -> None:
    observed = Observed(files={"etc/token": keyed("etc/token", "")}, sealed_macs={"token": ""})
    [step] = plan([SEALED_FILE], observed)
    assert isinstance(step, WriteFile) and step.sealed == SEALED and step.content == b""
    assert step.why == "content differs" and step.mode == 0o600


@pytest.mark.parametrize(("mac", "drifted"), [("m1", False), ("m2", True)])
def test_a_sealed_file_drifts_when_its_mac_is_not_the_ledgers(mac: str, drifted: bool) -> None:
    observed = Observed(
        files={"etc/token": keyed("etc/token", mac)},
        sealed_macs={"token": mac},
        ledger={SEALED.digest(): "m1"},
    )
    steps = plan([SEALED_FILE], observed)
    assert [type(s) for s in steps] == ([WriteFile] if drifted else [])


def test_a_sealed_file_with_its_content_but_another_mode_only_gets_its_mode() -> None:
    observed = Observed(
        files={"etc/token": keyed("etc/token", "m1", 0o644)},
        sealed_macs={"token": "m1"},
        ledger={SEALED.digest(): "m1"},
    )
    [step] = plan([SEALED_FILE], observed)
    assert isinstance(step, SetMode) and step.mode == 0o600


def test_a_sealed_setting_compares_macs_and_its_step_carries_no_value() -> None:
    settings = SettingsFact({"api_token": "guessed"})
    same = Observed(settings=settings, sealed_macs={"api": "m1"}, ledger={SEALED.digest(): "m1"})
    assert plan([SEALED_SETTING], same) == []
    other = Observed(settings=settings, sealed_macs={"api": "m9"}, ledger={SEALED.digest(): "m1"})
    [step] = plan([SEALED_SETTING], other)
    assert isinstance(step, SetSetting) and step.sealed == SEALED and step.value is None
    assert "guessed" not in repr(step) and "YWdl" not in repr(step)
