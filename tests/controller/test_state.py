"""The state directory: atomic saves, floors, damaged files, the lock; the audit log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from setpoint.controller import audit
from setpoint.controller.errors import ConfigError
from setpoint.controller.planning import Current
from setpoint.controller.rendering import Target
from setpoint.controller.state import (
    BUNDLES_DIR,
    STATE_FILE,
    FleetIdentity,
    StateStore,
    default_dir,
)
from setpoint.proto.bundles import Bundle, SettingResource

G = Target("group", "kiosks")


def bundle(version: int = 3) -> Bundle:
    return Bundle("group", "kiosks", version, "c" * 40, 100, 200, (SettingResource("s", "k", "v"),))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.lock()
    store.save({G: Current(bundle(), "Alice", "main")}, {G: 3, Target("device", "gone"): 9})
    current, floors = StateStore(tmp_path).load()
    assert current == {G: Current(bundle(), "Alice", "main")}
    assert floors == {G: 3, Target("device", "gone"): 9}
    assert (tmp_path / STATE_FILE).stat().st_mode & 0o777 == 0o600
    store.unlock()


def test_missing_state_is_empty(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "nothing").load() == ({}, {})


def test_damaged_payload_keeps_the_floor(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.lock()
    store.save({G: Current(bundle(5))}, {G: 5})
    for payload in (tmp_path / BUNDLES_DIR).iterdir():
        payload.write_bytes(b"garbage")
    current, floors = store.load()
    assert current == {} and floors == {G: 5}


def test_unreadable_state_file_starts_empty(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    assert StateStore(tmp_path).load() == ({}, {})


def test_unreferenced_payloads_are_removed(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.lock()
    store.save({G: Current(bundle(1))}, {})
    store.save({G: Current(bundle(2))}, {})
    assert len(list((tmp_path / BUNDLES_DIR).iterdir())) == 1
    assert (
        json.loads((tmp_path / STATE_FILE).read_text())["targets"]["group/kiosks"]["version"] == 2
    )


def test_second_controller_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    first = StateStore(tmp_path)
    first.lock()
    with pytest.raises(ConfigError, match="in use by another controller"):
        StateStore(tmp_path).lock()
    first.unlock()
    StateStore(tmp_path).lock()


def test_audit_log_append_and_filter(tmp_path: Path) -> None:
    log = audit.AuditLog(tmp_path)
    log.append(
        [
            audit.Entry(1.0, "group/kiosks", "group", "kiosks", 1, "c1", "Alice", "d1", "change"),
            audit.Entry(2.0, "device/k1", "device", "k1", 1, "c1", "Alice", "d2", "change"),
        ]
    )
    with (tmp_path / audit.AUDIT_FILE).open("a") as fh:
        fh.write('{"cut short')  # a crash mid-line
    assert [e["id"] for e in audit.read(log.path)] == ["kiosks", "k1"]
    assert [e["id"] for e in audit.read(log.path, "k1")] == ["k1"]
    assert [e["id"] for e in audit.read(log.path, "group/kiosks")] == ["kiosks"]
    assert list(audit.read(tmp_path / "none.jsonl")) == []


def test_a_state_directory_belongs_to_one_fleet(tmp_path: Path) -> None:
    mine = FleetIdentity("/srv/fleet", "mqtt://127.0.0.1:1883", "setpoint/v1")
    other_prefix = FleetIdentity("/srv/fleet", "mqtt://127.0.0.1:1883", "lab/v1")
    assert default_dir(tmp_path, mine) != default_dir(tmp_path, other_prefix)
    assert default_dir(tmp_path, mine).name.startswith("fleet-")
    store = StateStore(tmp_path / "state")
    store.lock()
    try:
        store.claim(mine)
        store.claim(mine)  # the same fleet again: fine
        with pytest.raises(ConfigError) as refused:
            store.claim(other_prefix)
    finally:
        store.unlock()
    message = str(refused.value)
    assert "belongs to another fleet (repository /srv/fleet, broker mqtt://127.0.0.1:1883," in (
        message
    )
    assert "prefix setpoint/v1), not this one (" in message and "prefix lab/v1)" in message
    assert "give this controller its own --state-dir" in message


def test_a_save_encodes_only_the_entries_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from setpoint.controller import state

    encoded: list[str] = []
    real = state.bundles.encode

    def counting(b: Bundle) -> bytes:
        encoded.append(b.target)
        return real(b)

    monkeypatch.setattr(state.bundles, "encode", counting)
    store = StateStore(tmp_path)
    store.lock()
    other = Target("group", "lobby")
    lobby = Current(Bundle("group", "lobby", 1, "c" * 40, 100, 200))
    store.save({G: Current(bundle(1)), other: lobby}, {G: 1, other: 1})
    assert sorted(encoded) == ["kiosks", "lobby"]
    encoded.clear()
    store.save({G: Current(bundle(2)), other: lobby}, {G: 2, other: 1})
    assert encoded == ["kiosks"]  # lobby's entry is the same object: not encoded again
    current, floors = StateStore(tmp_path).load()
    assert current == {G: Current(bundle(2)), other: lobby} and floors == {G: 2, other: 1}
    assert len(list((tmp_path / BUNDLES_DIR).iterdir())) == 2  # kiosks v1's payload is gone
    store.unlock()


def test_a_save_of_a_few_changes_appends_them_to_the_journal(tmp_path: Path) -> None:
    """Work proportional to what changed: after the first save of a run (state.json whole),
    a save of the targets a publication changed appends their lines to the journal, and
    state.json is not written again. Loading replays the journal (a line cut short by a
    crash is skipped); the next run's first save folds it into state.json; a crash between
    writing state.json and removing the journal replays it again to the same state."""
    from setpoint.controller.state import JOURNAL_FILE

    other, gone = Target("group", "lobby"), Target("device", "d1")
    lobby = Current(Bundle("group", "lobby", 1, "c" * 40, 100, 200), "Bob", "main")
    d1 = Current(Bundle("device", "d1", 4, "c" * 40, 100, 200, group="lobby"))
    store = StateStore(tmp_path)
    store.lock()
    store.save({G: Current(bundle(1)), other: lobby, gone: d1}, {G: 1, other: 1, gone: 4}, {G})
    assert not (tmp_path / JOURNAL_FILE).exists()  # the first save of a run: whole
    whole = (tmp_path / STATE_FILE).read_bytes()
    store.save({G: Current(bundle(2)), other: lobby, gone: d1}, {G: 2, other: 1, gone: 4}, {G})
    store.save({G: Current(bundle(2)), other: lobby}, {G: 2, other: 1, gone: 4}, {gone})
    assert (tmp_path / STATE_FILE).read_bytes() == whole  # not written again
    assert len((tmp_path / JOURNAL_FILE).read_text().splitlines()) == 2
    assert len(list((tmp_path / BUNDLES_DIR).iterdir())) == 2  # kiosks v1's and d1's: gone
    with (tmp_path / JOURNAL_FILE).open("a") as fh:
        fh.write('{"target": "group/lobby", "entry": {"vers')  # a crash mid-line
    expected = ({G: Current(bundle(2)), other: lobby}, {G: 2, other: 1, gone: 4})
    assert StateStore(tmp_path).load() == expected
    store.unlock()

    again = StateStore(tmp_path)
    again.lock()
    current, floors = again.load()
    journal = (tmp_path / JOURNAL_FILE).read_bytes()
    again.save(current, floors, {G})  # the first save of this run: folded
    assert not (tmp_path / JOURNAL_FILE).exists()
    assert StateStore(tmp_path).load() == expected
    (tmp_path / JOURNAL_FILE).write_bytes(journal)  # as if the crash came before its removal
    assert StateStore(tmp_path).load() == expected
    again.unlock()
