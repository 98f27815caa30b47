"""Executors on a real file system: atomic, confined to the root, all or nothing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from setpoint.device_shim import applying
from setpoint.device_shim.applying import ApplyContext, RootFS
from setpoint.device_shim.config import DevicePolicy
from setpoint.device_shim.errors import PermanentApplyError, TemporaryApplyError
from setpoint.device_shim.observing import Observer
from setpoint.device_shim.planning import (
    Blocked,
    DeleteManaged,
    RemoveSetting,
    RunCommand,
    SetMode,
    SetSetting,
    Skip,
    WriteFile,
    plan,
)
from setpoint.device_shim.running import CommandRunner
from setpoint.device_shim.state import StateStore
from setpoint.proto.bundles import FileResource, SettingResource

ALLOW = DevicePolicy(allow_commands=True, command_timeout_cap=5)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def store(root: Path) -> StateStore:
    s = StateStore(root / ".setpoint" / "state")
    s.open()
    yield s
    s.close()


def ctx(root: Path, policy: DevicePolicy = ALLOW) -> ApplyContext:
    return ApplyContext(
        fs=RootFS(str(root)),
        resolver=Observer(root, root / ".setpoint" / "state").resolver,
        policy=policy,
        runner=CommandRunner(root, {}),
    )


def snapshot(root: Path) -> dict[str, tuple[bytes | str, int]]:
    """Every entry under the root except the state directory: content (or link) and mode."""
    result: dict[str, tuple[bytes | str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir.startswith(".setpoint/state"):
            continue
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel.startswith(".setpoint/state"):
                continue
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                result[rel] = (os.readlink(full), 0)
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("<dir>", stat.S_IMODE(st.st_mode))
            else:
                result[rel] = (Path(full).read_bytes(), stat.S_IMODE(st.st_mode))
    return result


META = {"label": "test", "target": "t", "kind": "apply"}


def test_write_file_creates_parents_and_sets_the_mode(root: Path, store: StateStore) -> None:
    c = ctx(root)
    applying.apply([WriteFile("m", "etc/app/motd", b"hi", 0o600, True, "missing")], c, store, META)
    path = root / "etc" / "app" / "motd"
    assert path.read_bytes() == b"hi" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert c.created_dirs == ["etc", "etc/app"]
    assert store.read_journal() is not None  # the caller commits
    store.clear_journal()
    assert not store.backup_dir.exists()


def test_write_replaces_atomically_and_leaves_no_temp_files(root: Path, store: StateStore) -> None:
    (root / "motd").write_bytes(b"old")
    inode = (root / "motd").stat().st_ino
    applying.apply([WriteFile("m", "motd", b"new", 0o644, False, "x")], ctx(root), store, META)
    assert (root / "motd").read_bytes() == b"new"
    assert (root / "motd").stat().st_ino != inode  # renamed over, never truncated in place
    assert sorted(p.name for p in root.iterdir()) == [".setpoint", "motd"]


def test_set_mode_only_changes_the_mode(root: Path, store: StateStore) -> None:
    (root / "motd").write_bytes(b"same")
    os.chmod(root / "motd", 0o600)
    applying.apply([SetMode("m", "motd", 0o644, "x")], ctx(root), store, META)
    assert stat.S_IMODE((root / "motd").stat().st_mode) == 0o644
    assert (root / "motd").read_bytes() == b"same"


def test_set_mode_on_a_hard_link_never_changes_the_other_name(
    root: Path, store: StateStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside-file"
    outside.write_bytes(b"same")
    os.chmod(outside, 0o600)
    os.link(outside, root / "motd")
    applying.apply([SetMode("m", "motd", 0o644, "x")], ctx(root), store, META)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "motd").stat().st_mode) == 0o644
    assert (root / "motd").read_bytes() == b"same"


def test_settings_are_written_as_one_json_file(root: Path, store: StateStore) -> None:
    c = ctx(root)
    c.settings_mode = 0o600
    steps = [
        SetSetting("tz", "tz", "UTC", False, "missing"),
        SetSetting("n", "n", 3, False, "missing"),
    ]
    applying.apply(steps, c, store, META)
    path = root / ".setpoint" / "settings.json"
    assert json.loads(path.read_text()) == {"n": 3, "tz": "UTC"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    applying.apply([RemoveSetting("n")], ctx(root), store, META)
    assert json.loads(path.read_text()) == {"tz": "UTC"}


def test_delete_managed_removes_only_a_regular_file(root: Path, store: StateStore) -> None:
    (root / "gone").write_text("x")
    (root / "linked").symlink_to("gone")
    applying.apply(
        [DeleteManaged("gone"), DeleteManaged("linked"), DeleteManaged("never-there")],
        ctx(root),
        store,
        META,
    )
    assert not (root / "gone").exists() and (root / "linked").is_symlink()


def test_skip_and_wait_change_nothing_and_write_no_journal(root: Path, store: StateStore) -> None:
    before = snapshot(root)
    applying.apply([Skip("c", "not allowed")], ctx(root), store, META)
    assert snapshot(root) == before and store.read_journal() is None


def test_blocked_step_fails_before_anything_is_touched(root: Path, store: StateStore) -> None:
    before = snapshot(root)
    steps = [WriteFile("a", "a", b"x", 0o644, True, "missing"), Blocked("b", "symlink")]
    with pytest.raises(PermanentApplyError) as info:
        applying.apply(steps, ctx(root), store, META)
    assert info.value.resource_id == "b"
    assert snapshot(root) == before and store.read_journal() is None


def test_failing_step_in_the_middle_puts_everything_back(root: Path, store: StateStore) -> None:
    (root / "existing").write_bytes(b"original")
    os.chmod(root / "existing", 0o640)
    (root / "managed").write_bytes(b"old managed")
    (root / ".setpoint" / "settings.json").write_text('{"tz": "CET"}')
    before = snapshot(root)
    steps = [
        WriteFile("a", "existing", b"changed", 0o644, False, "content differs"),
        WriteFile("b", "new/dir/file", b"new", 0o644, True, "missing"),
        DeleteManaged("managed"),
        SetSetting("tz", "tz", "UTC", False, "value differs"),
        RunCommand("c", "true", "echo boom >&2; exit 3", 5, "check failed"),
    ]
    with pytest.raises(TemporaryApplyError) as info:
        applying.apply(steps, ctx(root), store, META)
    assert info.value.resource_id == "c" and "exit 3" in str(info.value)
    assert "boom" in str(info.value)
    assert snapshot(root) == before  # contents, modes, the settings file, no new dirs
    assert store.read_journal() is None and not store.backup_dir.exists()


def test_symlink_swapped_in_after_planning_is_refused(
    root: Path, store: StateStore, tmp_path: Path
) -> None:
    # Observed as a plain directory; an attacker swaps in a link to outside before the write.
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "etc").mkdir()
    observed = Observer(root, root / ".setpoint" / "state").observe(
        [FileResource("m", "etc/motd", b"x")]
    )
    steps = plan([FileResource("m", "etc/motd", b"x")], observed)
    (root / "etc").rmdir()
    (root / "etc").symlink_to(outside)
    with pytest.raises(PermanentApplyError):
        applying.apply(steps, ctx(root), store, META)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", ".setpoint/x", ""])
def test_executor_refuses_paths_that_are_not_plainly_inside(
    root: Path, store: StateStore, path: str
) -> None:
    with pytest.raises(PermanentApplyError):
        applying.apply([WriteFile("m", path, b"x", 0o644, True, "missing")], ctx(root), store, META)
    assert not (root.parent / "escape").exists()


def test_command_refused_by_policy_even_if_planned(root: Path, store: StateStore) -> None:
    step = RunCommand("c", "true", f"touch {root}/ran", 5, "x")
    with pytest.raises(PermanentApplyError):
        applying.apply([step], ctx(root, DevicePolicy()), store, META)
    assert not (root / "ran").exists()


def test_command_sees_settings_written_before_it(root: Path, store: StateStore) -> None:
    settings = root / ".setpoint" / "settings.json"
    steps = [
        SetSetting("tz", "tz", "UTC", False, "missing"),
        RunCommand("c", f"test -s {root}/copy", f"cp {settings} {root}/copy", 5, "x"),
    ]
    c = ctx(root)
    result = applying.apply(steps, c, store, META)
    assert json.loads((root / "copy").read_text()) == {"tz": "UTC"}
    assert result.checked["c"].passed is True


def test_command_whose_check_still_fails_fails_the_apply(root: Path, store: StateStore) -> None:
    with pytest.raises(TemporaryApplyError, match="check still fails"):
        applying.apply([RunCommand("c", "false", "true", 5, "x")], ctx(root), store, META)


def test_recover_rolls_back_a_journal_left_by_a_crash(root: Path, store: StateStore) -> None:
    (root / "motd").write_bytes(b"before")
    before = snapshot(root)
    steps = [
        WriteFile("a", "motd", b"after", 0o644, False, "x"),
        WriteFile("b", "x/new", b"new", 0o644, True, "missing"),
    ]
    applying.apply(steps, ctx(root), store, META)  # succeeded, but the "crash" came first
    assert (root / "motd").read_bytes() == b"after"
    note = applying.recover(store, RootFS(str(root)), lambda journal: False)
    assert note and "rolled back" in note
    assert snapshot(root) == before and store.read_journal() is None


def test_recover_keeps_a_committed_apply(root: Path, store: StateStore) -> None:
    applying.apply(
        [WriteFile("a", "motd", b"after", 0o644, True, "missing")], ctx(root), store, META
    )
    note = applying.recover(store, RootFS(str(root)), lambda journal: journal["target"] == "t")
    assert note and "committed" in note
    assert (root / "motd").read_bytes() == b"after" and store.read_journal() is None


def test_nothing_to_recover(root: Path, store: StateStore) -> None:
    assert applying.recover(store, RootFS(str(root)), lambda journal: False) is None


# The command runner.


def test_runner_times_out_and_kills_the_whole_group(root: Path) -> None:
    runner = CommandRunner(root, {})
    result = runner.run(f"(sleep 30; touch {root}/late) & sleep 30", timeout=0.3)
    assert result.timed_out and result.returncode is None and not result.ok
    assert "timed out" in result.describe()


def test_runner_keeps_only_the_tail_of_the_output(root: Path) -> None:
    result = CommandRunner(root, {}).run("seq 1 100000; echo the-end", timeout=10)
    assert result.ok and len(result.output) <= 400 and result.output.endswith("the-end")


def test_runner_does_not_pass_the_mqtt_password_on(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SETPOINT_MQTT_PASSWORD", "hunter2")
    runner = CommandRunner(root, {"SETPOINT_DEVICE": "dev1"})
    result = runner.run("env", timeout=5)
    assert "hunter2" not in result.output and "SETPOINT_DEVICE=dev1" in result.output


def test_stopped_runner_kills_and_refuses(root: Path) -> None:
    runner = CommandRunner(root, {})
    runner.stop()
    assert runner.run("true", timeout=5).returncode is None


def test_settings_resource_round_trip_through_plan_and_apply(root: Path, store: StateStore) -> None:
    desired = [SettingResource("tz", "tz", "UTC"), SettingResource("t", "token", "s", secret=True)]
    obs = Observer(root, root / ".setpoint" / "state")
    applying.apply(plan(desired, obs.observe(desired)), ctx(root), store, META)
    store.clear_journal()
    assert plan(desired, obs.observe(desired)) == []
