"""Observing real files: stat first, hash only when needed; paths confined to the root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from setpoint.device_shim.config import DevicePolicy
from setpoint.device_shim.observing import Observer, file_digest
from setpoint.device_shim.running import CommandRunner
from setpoint.proto import bundles
from setpoint.proto.bundles import CommandResource, FileResource, SettingResource


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def observer(root: Path, **kw: object) -> Observer:
    return Observer(root, root / ".setpoint" / "state", **kw)  # type: ignore[arg-type]


def age(path: Path, seconds: float = 60) -> None:
    """Make a file look old, so the stat cache may keep it (see RACY_SECONDS)."""
    st = path.stat()
    os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def test_regular_file_digest_matches_the_resource_digest(root: Path) -> None:
    (root / "motd").write_bytes(b"hi\n")
    os.chmod(root / "motd", 0o640)
    fact = observer(root).file_fact("motd")
    assert fact.condition == "regular" and fact.mode == 0o640
    assert fact.digest == bundles.resource_digest(FileResource("m", "motd", b"hi\n", 0o640))


def test_unchanged_file_is_not_hashed_twice(root: Path) -> None:
    path = root / "motd"
    path.write_bytes(b"hi\n")
    age(path)
    obs = observer(root)
    first = obs.file_fact("motd")
    for _ in range(5):
        assert obs.file_fact("motd") == first
    assert obs.hashed == 1


def test_a_changed_file_is_hashed_again(root: Path) -> None:
    path = root / "motd"
    path.write_bytes(b"hi\n")
    age(path)
    obs = observer(root)
    obs.file_fact("motd")
    path.write_bytes(b"ho\n")  # same size: mtime and ctime still differ
    age(path, 30)
    fact = obs.file_fact("motd")
    assert obs.hashed == 2 and fact.digest == file_digest(b"ho\n", fact.mode or 0)


def test_recently_modified_file_is_not_cached(root: Path) -> None:
    # A same-size edit within one timestamp tick would be invisible to a stat cache.
    (root / "motd").write_bytes(b"hi\n")
    obs = observer(root)
    obs.file_fact("motd")
    obs.file_fact("motd")
    assert obs.hashed == 2


def test_cached_entry_expires_once_the_file_is_old_enough(root: Path) -> None:
    path = root / "motd"
    path.write_bytes(b"hi\n")
    clock = Clock(path.stat().st_mtime + 0.5)
    obs = observer(root, clock=clock)
    obs.file_fact("motd")
    clock.now += 10
    obs.file_fact("motd")
    obs.file_fact("motd")
    assert obs.hashed == 2


def test_missing_file_and_missing_parent(root: Path) -> None:
    obs = observer(root)
    assert obs.file_fact("motd").condition == "missing"
    assert obs.file_fact("a/b/c").condition == "missing"
    assert obs.file_fact("a/b/c").real == "a/b/c"


def test_parent_that_is_a_file(root: Path) -> None:
    (root / "a").write_text("x")
    assert observer(root).file_fact("a/b").condition == "not-regular"


def test_directory_at_the_path(root: Path) -> None:
    (root / "d").mkdir()
    assert observer(root).file_fact("d").condition == "not-regular"


def test_symlinked_directory_that_leads_out_escapes(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "etc").symlink_to(outside)
    fact = observer(root).file_fact("etc/motd")
    assert fact.condition == "escapes" and fact.real is None


def test_symlinked_directory_inside_the_root_is_followed(root: Path) -> None:
    (root / "real").mkdir()
    (root / "link").symlink_to("real")
    (root / "real" / "motd").write_text("hi")
    fact = observer(root).file_fact("link/motd")
    assert fact.condition == "regular" and fact.real == "real/motd"


def test_final_symlink_is_refused_wherever_it_points(root: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s")
    (root / "in").write_text("i")
    (root / "out-link").symlink_to(tmp_path / "secret")
    (root / "in-link").symlink_to("in")
    obs = observer(root)
    out, inside = obs.file_fact("out-link"), obs.file_fact("in-link")
    assert out.condition == "symlink" and "outside" in out.detail
    assert inside.condition == "symlink" and "inside" in inside.detail
    assert obs.hashed == 0  # nothing was read through a link


def test_setpoint_directory_and_state_dir_are_reserved(root: Path, tmp_path: Path) -> None:
    obs = observer(root)
    assert obs.file_fact(".setpoint/settings.json").condition == "reserved"
    assert obs.file_fact(".setpoint").condition == "reserved"
    custom = Observer(root, root / "var" / "state")
    assert custom.file_fact("var/state/state.json").condition == "reserved"
    assert custom.file_fact("var/other").condition == "missing"


def test_huge_files_are_never_read(root: Path) -> None:
    path = root / "big"
    with path.open("wb") as fh:
        fh.truncate(bundles.MAX_BUNDLE_BYTES + 1)
    obs = observer(root)
    fact = obs.file_fact("big")
    assert fact.condition == "regular" and obs.hashed == 0 and fact.digest == ""


def test_settings_are_read_from_the_settings_file(root: Path) -> None:
    (root / ".setpoint").mkdir()
    (root / ".setpoint" / "settings.json").write_text(json.dumps({"tz": "UTC", "n": [1]}))
    fact = observer(root).settings_fact()
    assert fact.readable and dict(fact.values) == {"tz": "UTC"}


@pytest.mark.parametrize("content", ["{", "[1, 2]", '"x"'])
def test_corrupt_settings_file_is_unreadable(root: Path, content: str) -> None:
    (root / ".setpoint").mkdir()
    (root / ".setpoint" / "settings.json").write_text(content)
    assert not observer(root).settings_fact().readable


def test_observe_gathers_every_kind(root: Path) -> None:
    (root / "motd").write_text("hi")
    desired = [
        FileResource("motd", "motd", b"hi"),
        SettingResource("tz", "tz", "UTC"),
        CommandResource("svc", "true", "true"),
    ]
    runner = CommandRunner(root, {})
    policy = DevicePolicy(allow_commands=True)
    observed = observer(root, runner=runner, policy=policy).observe(
        desired, managed_files={"x"}, check_commands=True
    )
    assert set(observed.files) == {"motd"}
    assert not observed.settings.readable  # no settings file yet
    assert observed.commands["svc"].passed is True
    assert observed.managed_files == {"x"}


def test_command_checks_run_only_when_asked(root: Path) -> None:
    counter = root / "count"
    resource = CommandResource("svc", f"echo x >> {counter}; false", "true")
    obs = observer(root, runner=CommandRunner(root, {}), policy=DevicePolicy(allow_commands=True))
    assert obs.command_fact(resource, check=False).passed is False  # never checked: run once
    assert obs.command_fact(resource, check=False).passed is False  # cached
    obs.command_fact(resource, check=True)
    assert counter.read_text().count("x") == 2 and obs.checks_run == 2


def test_command_check_is_not_run_where_commands_are_forbidden(root: Path) -> None:
    resource = CommandResource("svc", f"touch {root}/ran", "true")
    obs = observer(root, runner=CommandRunner(root, {}))
    fact = obs.command_fact(resource, check=True)
    assert fact.passed is None and not (root / "ran").exists()
