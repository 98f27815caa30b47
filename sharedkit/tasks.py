"""Stopping a task without swallowing a cancellation.

``task.cancel(); with suppress(CancelledError): await task`` cannot tell the task's
CancelledError from the caller's: a caller cancelled while it waits (a shutdown) takes its
own cancellation for the task's and carries on, and may wait forever for what comes next.

A ``TaskGroup`` (Python 3.11) whose task is cancelled while one of its children fails
raises the child's error, not the cancellation: a loop that catches that error and goes
on (a reconnect loop) never ends, although ``cancelling()`` still counts the request.
:func:`raise_if_cancelled` is called where such an error is caught, after a group whose
body was still waiting when the child failed: a 3.11 group whose body had already ended
cancels its task on a child's failure and leaves that cancellation counted.
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


def raise_if_cancelled() -> None:
    """Raise CancelledError if the current task has a cancellation it did not take back
    (one a TaskGroup turned into its children's errors)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
