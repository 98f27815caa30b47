"""Watching: which paths under the device root changed, told by inotify as it happens.

The agent gives the :class:`Watcher` the relative paths it manages (files, and the settings
file); the watcher watches *directories*, never files: every directory on the way from the
root to each path, so a file edited in place, replaced by a rename, deleted, re-created or
chmod'ed is seen, and so is a parent directory removed, re-created or swapped for a symlink.
10,000 files in a few directories cost a few watches, not 10,000.

A reader thread turns inotify events into a :class:`Change` (the relative paths that changed,
or "everything" when the kernel dropped events) and hands it to the agent, which
:class:`Debounce`\\ s them and observes only the resources under those paths. The watcher never
reads a file and never decides anything about drift: an event only wakes the agent, which
re-reads the real state (so the shim's own writes, seen as events too, come out as no drift).

Where inotify cannot be used (not Linux, no ``inotify_simple``, a file system without it,
the watch limit ``fs.inotify.max_user_watches`` reached) :class:`WatchUnavailable` says why
and the agent polls instead. ``max_watches`` lets a caller (tests) set a lower limit.

:func:`watched_dirs`, :class:`PathIndex` and :class:`Debounce` are pure; :class:`Watcher`
does the I/O.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from .errors import ShimError

log = logging.getLogger("setpoint.shim")

SETTLE: Final = 0.02  # seconds without a new event before a burst is observed
MAX_DELAY: Final = 0.25  # a burst that never settles is still observed this often

# inotify(7) masks; the values are the kernel's ABI, the same on every Linux.
IN_MODIFY: Final = 0x00000002
IN_ATTRIB: Final = 0x00000004
IN_CLOSE_WRITE: Final = 0x00000008
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ONLYDIR: Final = 0x01000000
IN_EXCL_UNLINK: Final = 0x04000000

MASK: Final = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_EXCL_UNLINK
)
_ENTRY_CHANGED: Final = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
_SELF_GONE: Final = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED


class WatchUnavailable(ShimError):
    """inotify cannot watch the root (the message says why): the agent polls instead."""


@dataclass(frozen=True, slots=True)
class Change:
    """What the watcher saw: relative paths that changed (a directory stands for all below it),
    ``everything`` when events were lost, ``failed`` when inotify stopped working."""

    paths: frozenset[str] = frozenset()
    everything: bool = False
    failed: str | None = None


def _norm(path: str) -> str:
    rel = os.path.normpath(path)
    return "" if rel == "." else rel


def watched_dirs(paths: Iterable[str]) -> frozenset[str]:
    """Every directory from the root ("") down to each path's parent. Pure."""
    dirs: set[str] = {""}
    for path in paths:
        parent = os.path.dirname(_norm(path))
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    return frozenset(dirs)


class PathIndex:
    """Which of the watched paths lie at or below a changed path (as given). Pure."""

    def __init__(self, paths: Iterable[str]) -> None:
        self._below: dict[str, set[str]] = {}
        self.paths = frozenset(paths)
        for path in self.paths:
            prefix = _norm(path)
            while prefix:
                self._below.setdefault(prefix, set()).add(path)
                prefix = os.path.dirname(prefix)

    def affected(self, changed: Iterable[str]) -> set[str]:
        hit: set[str] = set()
        for prefix in changed:
            prefix = _norm(prefix)
            if not prefix:
                return set(self.paths)
            hit |= self._below.get(prefix, set())
        return hit


class Debounce:
    """Collects changes until they settle: a burst of writes to one file is one observation.

    Ready ``settle`` seconds after the last change, or ``max_delay`` after the first one if
    changes keep coming. Pure: the caller passes the (monotonic) time.
    """

    def __init__(self, settle: float = SETTLE, max_delay: float = MAX_DELAY) -> None:
        self._settle = settle
        self._max_delay = max_delay
        self._paths: set[str] = set()
        self._everything = False
        self._first: float | None = None
        self._last = 0.0

    def add(self, change: Change, now: float) -> None:
        if not change.paths and not change.everything:
            return
        self._paths |= change.paths
        self._everything = self._everything or change.everything
        if self._first is None:
            self._first = now
        self._last = now

    def due(self) -> float | None:
        """When the collected changes are ready (None: nothing pending)."""
        if self._first is None:
            return None
        return min(self._last + self._settle, self._first + self._max_delay)

    def take(self, now: float) -> Change | None:
        """The collected changes if they are ready, and forget them."""
        due = self.due()
        if due is None or now < due:
            return None
        change = Change(frozenset(self._paths), self._everything)
        self.clear()
        return change

    def clear(self) -> None:
        """Drop what is pending (a full observation is about to cover it)."""
        self._paths.clear()
        self._everything = False
        self._first = None


class Watcher:
    """inotify watches on the directories that lead to the managed paths; see the module doc.

    ``notify`` is called from the watcher's own thread with each :class:`Change`.
    """

    def __init__(
        self,
        root: str,
        notify: Callable[[Change], None],
        *,
        max_watches: int | None = None,
    ) -> None:
        self.root = os.path.realpath(root)
        self._notify = notify
        self._max_watches = max_watches
        self._lock = threading.Lock()
        self._inotify: Any = None
        self._wanted: frozenset[str] = frozenset()
        self._index = PathIndex(())
        self._wd_dirs: dict[int, set[str]] = {}
        self._dir_wd: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self.failed: str | None = None

    @property
    def watches(self) -> int:
        with self._lock:
            return len(self._wd_dirs)

    def start(self) -> None:
        """Open inotify and start the reader thread. Raises WatchUnavailable."""
        try:
            import inotify_simple  # Linux only; imported here so other systems can poll
        except (ImportError, OSError, AttributeError) as exc:
            raise WatchUnavailable(f"inotify is not available here ({exc})") from exc
        try:
            self._inotify = inotify_simple.INotify()
        except (OSError, AttributeError) as exc:
            raise WatchUnavailable(f"inotify_init failed ({exc})") from exc
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="setpoint-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping = True
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5.0)
        with self._lock:
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def watch(self, paths: Iterable[str]) -> None:
        """Watch the directories leading to ``paths`` (relative); changes name these paths.

        Raises WatchUnavailable.
        """
        index = PathIndex(paths)
        wanted = watched_dirs(index.paths)
        with self._lock:
            self._index = index
            self._wanted = wanted
            self._sync()
        if self.failed is not None:
            raise WatchUnavailable(self.failed)

    # The reader thread.

    def _run(self) -> None:
        try:
            self._read_events()
        except Exception as exc:  # one that died silently would leave the 60 s look alone
            log.exception("the inotify watcher failed")
            self._notify(Change(failed=f"the inotify watcher failed ({exc!r})"))

    def _read_events(self) -> None:
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping:
            ready = poller.poll()
            if self._stopping:
                return
            if not any(fd == self._inotify.fileno() for fd, _ in ready):
                continue
            change = self._interpret(list(self._inotify.read(timeout=0)))
            if change.paths or change.everything or change.failed:
                self._notify(change)
            if change.failed:
                return

    def _interpret(self, events: Iterable[Any]) -> Change:
        paths: set[str] = set()
        everything = False
        resync = False
        with self._lock:
            for event in events:
                if event.mask & IN_Q_OVERFLOW:
                    everything = resync = True
                    continue
                dirs = self._wd_dirs.get(event.wd, set())
                for lexical in dirs:
                    paths.add(os.path.join(lexical, event.name) if event.name else lexical)
                    if event.mask & _ENTRY_CHANGED and event.name:
                        child = os.path.join(lexical, event.name)
                        resync = resync or child in self._wanted
                if event.mask & _SELF_GONE:
                    resync = True
                    if event.mask & IN_IGNORED:
                        for lexical in self._wd_dirs.pop(event.wd, set()):
                            if self._dir_wd.get(lexical) == event.wd:
                                del self._dir_wd[lexical]
            if resync:
                self._sync()
            hit = self._index.affected(paths)
        return Change(frozenset(hit), everything, self.failed)

    # Watches (under the lock).

    def _sync(self) -> None:
        """Make the watches match the wanted directories as they are on disk now."""
        if self._inotify is None or self.failed is not None:
            return
        for lexical in sorted(self._wanted, key=lambda d: d.count("/")):
            absolute = os.path.join(self.root, lexical) if lexical else self.root
            real = os.path.realpath(absolute)
            if real != self.root and not real.startswith(self.root + "/"):
                self._forget(lexical)  # leads out of the root: the resolver refuses it
                continue
            try:
                wd = self._inotify.add_watch(absolute, MASK)
                if (
                    self._max_watches is not None
                    and wd not in self._wd_dirs
                    and len(self._wd_dirs) >= self._max_watches
                ):
                    self._inotify.rm_watch(wd)  # over the caller's limit: as the kernel's
                    raise OSError(errno.ENOSPC, f"over {self._max_watches} watches")
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self._fail(
                        f"the inotify watch limit is reached ({exc.strerror})"
                        "; raise fs.inotify.max_user_watches"
                    )
                    return
                if exc.errno in (errno.ENOMEM, errno.EACCES, errno.EPERM):
                    self._fail(f"inotify cannot watch {absolute} ({exc.strerror})")
                    return
                self._forget(lexical)  # missing or not a directory: its parent's watch waits
                continue
            old = self._dir_wd.get(lexical)
            if old is not None and old != wd:
                self._forget(lexical)
            self._dir_wd[lexical] = wd
            self._wd_dirs.setdefault(wd, set()).add(lexical)
        for lexical in [d for d in self._dir_wd if d not in self._wanted]:
            self._forget(lexical)

    def _forget(self, lexical: str) -> None:
        wd = self._dir_wd.pop(lexical, None)
        if wd is None:
            return
        dirs = self._wd_dirs.get(wd)
        if dirs is not None:
            dirs.discard(lexical)
            if not dirs:
                del self._wd_dirs[wd]
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(wd)

    def _fail(self, why: str) -> None:
        self.failed = why
        for wd in list(self._wd_dirs):
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(wd)
        self._wd_dirs.clear()
        self._dir_wd.clear()
