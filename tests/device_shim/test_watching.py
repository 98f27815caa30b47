"""The watcher on real files with real inotify, and its pure parts (no broker here)."""

from __future__ import annotations

import os
import queue
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from setpoint.device_shim.watching import (
    Change,
    Debounce,
    PathIndex,
    Watcher,
    WatchUnavailable,
    watched_dirs,
)

TIMEOUT = 10.0
MOTD = "etc/motd"
SETTINGS = ".setpoint/settings.json"

# Pure parts.


def test_watched_dirs_are_every_directory_on_the_way_and_shared() -> None:
    assert watched_dirs(["etc/motd", "etc/hosts", "srv/app/conf.d/a.conf", "top"]) == {
        "",
        "etc",
        "srv",
        "srv/app",
        "srv/app/conf.d",
    }


def test_ten_thousand_files_in_a_few_directories_need_a_few_watches() -> None:
    paths = [f"srv/site{i % 10}/file{i}.conf" for i in range(10_000)]
    assert len(watched_dirs(paths)) == 12  # root, srv, 10 sites: far below the default 8192


def test_path_index_maps_a_changed_directory_to_everything_below_it() -> None:
    index = PathIndex(["etc/motd", "etc/ssh/sshd_config", "srv/app.conf"])
    assert index.affected(["etc/motd"]) == {"etc/motd"}
    assert index.affected(["etc"]) == {"etc/motd", "etc/ssh/sshd_config"}
    assert index.affected(["etc/ssh"]) == {"etc/ssh/sshd_config"}
    assert index.affected([""]) == {"etc/motd", "etc/ssh/sshd_config", "srv/app.conf"}
    assert index.affected(["etc/.motd.setpoint-1-1", "etc/issue", "var"]) == set()


def test_a_burst_of_changes_is_one_observation() -> None:
    debounce = Debounce(settle=0.02, max_delay=0.25)
    for i in range(1000):
        debounce.add(Change(frozenset({MOTD})), 100.0 + i * 0.00001)  # 1,000 writes in 10 ms
        assert debounce.take(100.0 + i * 0.00001) is None
    due = debounce.due()
    assert due == pytest.approx(100.0 + 999 * 0.00001 + 0.02)
    assert debounce.take(due - 0.001) is None
    assert debounce.take(due) == Change(frozenset({MOTD}))
    assert debounce.take(due + 1) is None and debounce.due() is None


def test_a_burst_that_never_settles_is_still_observed_every_max_delay() -> None:
    debounce = Debounce(settle=0.02, max_delay=0.25)
    taken = []
    for step in range(101):  # a write every 10 ms for a second
        now = step / 100
        debounce.add(Change(frozenset({MOTD})), now)
        if (change := debounce.take(now)) is not None:
            taken.append(now)
            assert change.paths == {MOTD}
    # 250 ms after the first write of each round (the write that follows a look starts one).
    assert taken == pytest.approx([0.25, 0.51, 0.77])


def test_debounce_merges_paths_and_everything_and_clear_drops_them() -> None:
    debounce = Debounce(settle=0.02, max_delay=0.25)
    debounce.add(Change(frozenset({"a"})), 0.0)
    debounce.add(Change(frozenset({"b"}), everything=True), 0.01)
    debounce.add(Change(), 0.015)  # nothing in it: does not postpone
    assert debounce.take(0.03) == Change(frozenset({"a", "b"}), everything=True)
    debounce.add(Change(frozenset({"c"})), 1.0)
    debounce.clear()
    assert debounce.due() is None


# The watcher, on real files.


class Seen:
    """The changes a watcher reports, to wait on."""

    def __init__(self) -> None:
        self.changes: queue.Queue[Change] = queue.Queue()

    def __call__(self, change: Change) -> None:
        self.changes.put(change)

    def wait(self, predicate: Callable[[Change], bool], what: str) -> Change:
        try:
            while True:
                change = self.changes.get(timeout=TIMEOUT)
                if predicate(change):
                    return change
        except queue.Empty:
            raise AssertionError(f"no change seen: {what}") from None

    def path(self, path: str) -> Change:
        return self.wait(lambda c: path in c.paths, path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / ".setpoint").mkdir()
    (root / MOTD).write_text("hello\n")
    (root / SETTINGS).write_text("{}")
    return root


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def watcher(root: Path, seen: Seen) -> Iterator[Watcher]:
    watcher = Watcher(str(root), seen)
    watcher.start()
    watcher.watch([MOTD, SETTINGS])
    yield watcher
    watcher.close()


def sentinel(root: Path, seen: Seen) -> list[frozenset[str]]:
    """The paths seen up to a last, known change (inotify keeps the order), but that one.

    The known change is a chmod of the settings file: exactly one event, so none is left
    over to be taken for the next sentinel.
    """
    os.chmod(root / SETTINGS, 0o644)
    before = []
    while True:
        change = seen.changes.get(timeout=TIMEOUT)
        if change.paths - {SETTINGS}:
            before.append(change.paths - {SETTINGS})
        if SETTINGS in change.paths:
            return before


def changed(root: Path, seen: Seen) -> set[str]:
    """Every watched path that changed since the last look (a write makes several events)."""
    return set().union(*sentinel(root, seen))


def test_in_place_edit(root: Path, seen: Seen, watcher: Watcher) -> None:
    with open(root / MOTD, "a") as fh:
        fh.write("edited in place\n")
    assert seen.path(MOTD).paths == {MOTD}  # at once, without a sentinel


def test_replace_by_rename(root: Path, seen: Seen, watcher: Watcher) -> None:
    (root / "etc" / "motd.new").write_text("replaced\n")
    assert changed(root, seen) == set()  # another name in the directory
    os.rename(root / "etc" / "motd.new", root / MOTD)
    assert changed(root, seen) == {MOTD}


def test_delete_and_recreate(root: Path, seen: Seen, watcher: Watcher) -> None:
    (root / MOTD).unlink()
    assert changed(root, seen) == {MOTD}
    (root / MOTD).write_text("back\n")
    assert changed(root, seen) == {MOTD}


def test_chmod(root: Path, seen: Seen, watcher: Watcher) -> None:
    os.chmod(root / MOTD, 0o666)
    assert changed(root, seen) == {MOTD}


def test_symlink_swapped_in(root: Path, seen: Seen, watcher: Watcher, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("not ours\n")
    (root / MOTD).unlink()
    assert changed(root, seen) == {MOTD}
    os.symlink(tmp_path / "elsewhere", root / MOTD)
    assert changed(root, seen) == {MOTD}


def test_parent_directory_removed_and_recreated(root: Path, seen: Seen, watcher: Watcher) -> None:
    shutil.rmtree(root / "etc")
    assert changed(root, seen) == {MOTD}
    (root / "etc").mkdir()
    assert changed(root, seen) == {MOTD}
    # The new directory is watched again: an edit inside it is seen.
    (root / MOTD).write_text("in the new directory\n")
    assert changed(root, seen) == {MOTD}
    (root / "etc" / "new-motd").write_text("x")
    os.rename(root / "etc" / "new-motd", root / MOTD)
    assert changed(root, seen) == {MOTD}


def test_parent_directory_swapped_for_a_symlink(root: Path, seen: Seen, watcher: Watcher) -> None:
    (root / "etc2").mkdir()
    (root / "etc2" / "motd").write_text("via a link\n")
    assert changed(root, seen) == set()
    os.rename(root / "etc", root / "old-etc")
    assert changed(root, seen) == {MOTD}
    os.symlink("etc2", root / "etc")  # inside the root: followed, and watched through
    assert changed(root, seen) == {MOTD}
    (root / "etc2" / "motd").write_text("edited through the link\n")
    assert changed(root, seen) == {MOTD}
    # The directory moved away is no longer watched.
    (root / "old-etc" / "motd").write_text("not managed any more\n")
    assert changed(root, seen) == set()


def test_settings_file_written_atomically(root: Path, seen: Seen, watcher: Watcher) -> None:
    (root / ".setpoint" / ".settings.tmp").write_text('{"tz": "CET"}')
    os.rename(root / ".setpoint" / ".settings.tmp", root / SETTINGS)
    seen.path(SETTINGS)


def test_unrelated_files_in_a_watched_directory_are_not_reported(
    root: Path, seen: Seen, watcher: Watcher
) -> None:
    for i in range(20):
        (root / "etc" / f"other-{i}").write_text("x")
    (root / "elsewhere").mkdir()
    assert sentinel(root, seen) == []


def test_a_burst_of_a_thousand_writes_is_a_few_changes_not_a_thousand(
    root: Path, seen: Seen, watcher: Watcher
) -> None:
    fd = os.open(root / MOTD, os.O_WRONLY | os.O_APPEND)
    try:
        for _ in range(1000):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    # The kernel folds identical queued events and the reader takes them in batches; the
    # agent's Debounce folds the rest into one observation (tested above, by the clock).
    before = sentinel(root, seen)
    assert 1 <= len(before) < 1000
    assert all(paths == {MOTD} for paths in before)


def test_ten_thousand_files_use_a_few_watches(root: Path, seen: Seen, watcher: Watcher) -> None:
    paths = [f"srv/site{i % 10}/file{i}.conf" for i in range(10_000)]
    for i in range(10):
        (root / "srv" / f"site{i}").mkdir(parents=True)
    watcher.watch(paths)
    assert watcher.watches == 12
    (root / "srv" / "site3" / "file13.conf").write_text("x")
    assert seen.wait(lambda c: bool(c.paths), "file13").paths == {"srv/site3/file13.conf"}


def test_watch_limit_reached_says_so(root: Path, seen: Seen) -> None:
    watcher = Watcher(str(root), seen, max_watches=1)  # root fits; etc does not
    watcher.start()
    try:
        with pytest.raises(WatchUnavailable, match=r"watch limit is reached.*max_user_watches"):
            watcher.watch([MOTD])
        assert watcher.watches == 0
    finally:
        watcher.close()


def test_watch_limit_reached_later_reports_a_failure(root: Path, seen: Seen) -> None:
    watcher = Watcher(str(root), seen, max_watches=2)  # root and etc fit
    watcher.start()
    try:
        watcher.watch(["etc/motd", "srv/app.conf"])  # srv does not exist yet
        assert watcher.watches == 2
        (root / "srv").mkdir()  # now it would need a third watch
        failed = seen.wait(lambda c: c.failed is not None, "a failure")
        assert failed.failed is not None and "watch limit" in failed.failed
    finally:
        watcher.close()


def test_paths_leading_out_of_the_root_are_not_watched(
    root: Path, seen: Seen, tmp_path: Path
) -> None:
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "out")
    watcher = Watcher(str(root), seen)
    watcher.start()
    try:
        watcher.watch(["out/file"])
        assert watcher.watches == 1  # the root only
    finally:
        watcher.close()


def test_a_watcher_that_fails_says_so(root: Path, seen: Seen, watcher: Watcher) -> None:
    # The inotify descriptor turns into /dev/null under the reader: its next read fails.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, watcher._inotify.fileno())
    os.close(null)
    (root / MOTD).write_text("wakes the reader\n")
    failed = seen.wait(lambda c: c.failed is not None, "a failure")
    assert failed.failed is not None and failed.failed.startswith("the inotify watcher failed")
