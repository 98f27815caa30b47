"""Stopping a task without swallowing the caller's own cancellation.

``task.cancel(); with suppress(CancelledError): await task`` cannot tell the task's
CancelledError from the caller's: a caller cancelled while it waits (a shutdown) takes its
own cancellation for the task's and carries on, and may wait forever for what comes next.
"""

from __future__ import annotations

import asyncio


async def stop(task: asyncio.Future[object]) -> None:
    """Cancel ``task`` and wait until it has ended; raise its error, if it ended with one.

    A cancellation of the caller while it waits is raised in the caller, as it should be.
    """
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
