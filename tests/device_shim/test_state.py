"""The state directory: atomic saves, a lock, refusing what is corrupt."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from setpoint.device_shim.backoff import RetryGate
from setpoint.device_shim.errors import StateError
from setpoint.device_shim.state import SEQ_BLOCK, ShimState, StateStore, atomic_write
from setpoint.proto.trust import Floor, TrustState


def full_state() -> ShimState:
    return ShimState(
        trust=TrustState(
            "dev1", "kiosk", {"group/kiosk": Floor(3, "ab"), "device/dev1": Floor(2, "cd")}
        ),
        applied_group=b"\x00group",
        applied_device=b"\x01device",
        managed_files=frozenset({"etc/motd"}),
        managed_dirs=frozenset({"etc"}),
        managed_settings=frozenset({"tz"}),
        command_seq=7,
        report_seq=20_000,
        gate=RetryGate("k", True, 1, 5.0, "kiosk", "group", 4, "boom", 1.0, "motd"),
        trusted_keyids=frozenset({"aa", "bb"}),
    )


def test_state_round_trips(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    with store.locked():
        store.save(full_state())
        assert store.load("dev1") == full_state()


def test_state_dir_and_file_are_private(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    with store.locked():
        store.save(full_state())
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE(store.state_path.stat().st_mode) == 0o600


def test_fresh_state_when_there_is_none(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s").locked() as store:
        assert store.load("dev1") == ShimState(TrustState("dev1"))


def test_corrupt_state_is_refused_with_what_to_do(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s")
    with store.locked():
        store.state_path.write_text("{not json")
        with pytest.raises(StateError, match="move it aside"):
            store.load("dev1")


def test_state_of_another_device_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s")
    with store.locked():
        store.save(full_state())
        with pytest.raises(StateError, match="belongs to device 'dev1'"):
            store.load("dev2")


def test_two_shims_cannot_share_a_state_dir(tmp_path: Path) -> None:
    first, second = StateStore(tmp_path / "s"), StateStore(tmp_path / "s")
    first.open()
    try:
        with pytest.raises(StateError, match="in use by another shim"):
            second.open()
    finally:
        first.close()
    second.open()
    second.close()


def test_report_seq_is_reserved_in_blocks(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s")
    with store.locked():
        state, first = store.reserve_report_seq(ShimState(TrustState("dev1")))
        assert first == 1 and state.report_seq == SEQ_BLOCK
        # After a restart (or a crash that used any part of the block) numbering goes on above it.
        state, first = store.reserve_report_seq(store.load("dev1"))
        assert first == SEQ_BLOCK + 1 and state.report_seq == 2 * SEQ_BLOCK


def test_report_seq_keeps_rising_after_the_state_directory_is_lost(tmp_path: Path) -> None:
    # SPEC 6.6: a shim with no saved state starts at the clock in milliseconds, so its
    # reports continue above what it sent before the state was lost.
    before = StateStore(tmp_path / "old")
    with before.locked():
        old, first_old = before.reserve_report_seq(ShimState(TrustState("dev1")), floor=1_000)
    fresh = StateStore(tmp_path / "wiped")
    with fresh.locked():
        state, first = fresh.reserve_report_seq(ShimState(TrustState("dev1")), floor=2_000_000)
    assert first_old == 1_000 and first == 2_000_000 > old.report_seq
    assert state.report_seq == first - 1 + SEQ_BLOCK
    # A saved sequence above the clock wins: the clock never makes numbers go down.
    with fresh.locked():
        _again, next_first = fresh.reserve_report_seq(fresh.load("dev1"), floor=5)
    assert next_first == state.report_seq + 1


def test_atomic_write_never_leaves_a_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two" and os.listdir(tmp_path) == ["f.json"]


def test_journal_round_trip_and_clear(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s")
    with store.locked():
        assert store.read_journal() is None
        store.fresh_backup_dir()
        store.write_journal({"kind": "apply", "files": []})
        assert store.read_journal() == {"kind": "apply", "files": []}
        assert "mac" in json.loads(store.journal_path.read_text())  # authenticated on disk
        store.clear_journal()
        assert store.read_journal() is None and not store.backup_dir.exists()
