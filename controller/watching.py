"""Noticing that the repository changed: inotify on a local repository, polling a remote.

Every watcher only *wakes* the reconcile loop; the loop re-reads every branch itself. So a
burst of file events, a duplicated webhook or a missed poll changes nothing but timing.

* :func:`watch_local`: ``git commit``, ``push``, ``fetch``, ``update-ref`` and ``gc`` all
  change a file under ``refs/`` or ``packed-refs``/``HEAD`` in the git directory. Those are
  watched with inotify (through watchfiles) with a 10 ms step, so a commit is noticed in
  milliseconds, with no polling loop.
* :func:`poll`: the fallback for remotes: wake (and so fetch) every ``interval`` seconds.
* The webhook (see :mod:`webhooks`) and ``setpoint notify`` wake it on a push.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

STEP_MS: Final = 10
DEBOUNCE_MS: Final = 200
# How often the watch thread checks whether it was asked to stop (bounds shutdown time).
STOP_CHECK_MS: Final = 200
_GIT_DIR_FILES: Final = frozenset({"HEAD", "packed-refs"})


async def _watch(
    path: Path,
    recursive: bool,
    accept: Callable[[str], bool],
    wake: Callable[[str], None],
    stop: asyncio.Event,
) -> None:
    from watchfiles import awatch

    async for changes in awatch(
        path,
        watch_filter=None,
        debounce=DEBOUNCE_MS,
        step=STEP_MS,
        rust_timeout=STOP_CHECK_MS,
        recursive=recursive,
        stop_event=stop,
    ):
        if any(accept(changed) for _, changed in changes):
            wake("watch")


async def watch_local(
    refs_dir: Path, git_dir: Path, wake: Callable[[str], None], stop: asyncio.Event
) -> None:
    """Wake on every change of a ref of the local repository, until ``stop`` is set."""
    log.info("watching %s for commits", git_dir)

    def in_git_dir(changed: str) -> bool:
        name = Path(changed).name
        return name in _GIT_DIR_FILES or name.startswith(("packed-refs", "HEAD"))

    async with asyncio.TaskGroup() as tg:
        tg.create_task(_watch(refs_dir, True, lambda _: True, wake, stop), name="watch-refs")
        tg.create_task(_watch(git_dir, False, in_git_dir, wake, stop), name="watch-git-dir")


async def poll(interval: float, wake: Callable[[str], None]) -> None:
    """Wake every ``interval`` seconds (fetching a remote), forever."""
    log.info("polling the repository every %gs", interval)
    while True:
        await asyncio.sleep(interval)
        wake("poll")
