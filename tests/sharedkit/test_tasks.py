"""A cancellation that a TaskGroup turned into its child's error is not lost."""

from __future__ import annotations

import asyncio

import pytest

from setpoint.kit.tasks import raise_if_cancelled


class Lost(Exception):
    pass


async def failing_group(victim: list[asyncio.Task[object]]) -> None:
    """A TaskGroup whose child cancels the group's task and fails at once: Python 3.11
    raises the child's error from the group, not the cancellation."""
    async with asyncio.TaskGroup() as tg:

        async def child() -> None:
            await asyncio.sleep(0)
            victim[0].cancel()
            raise Lost("connection lost")

        tg.create_task(child())
        await asyncio.sleep(60)


async def reconnect_loop(victim: list[asyncio.Task[object]], check: bool) -> int:
    rounds = 0
    while rounds < 5:
        rounds += 1
        try:
            await failing_group(victim)
        except* Lost:
            if check:
                raise_if_cancelled()
        await asyncio.sleep(0)
    return rounds


async def test_the_group_error_hides_the_cancellation_without_the_check() -> None:
    victim: list[asyncio.Task[object]] = []
    victim.append(asyncio.ensure_future(reconnect_loop(victim, check=False)))
    assert await asyncio.wait_for(victim[0], 10) == 5  # went on, cancelled five times


async def test_raise_if_cancelled_ends_the_loop() -> None:
    victim: list[asyncio.Task[object]] = []
    victim.append(asyncio.ensure_future(reconnect_loop(victim, check=True)))
    done, _ = await asyncio.wait(victim, timeout=10)
    assert done and victim[0].cancelled()


async def test_nothing_is_raised_without_a_cancellation() -> None:
    raise_if_cancelled()  # the test's own task: not cancelled
    with pytest.raises(asyncio.CancelledError):
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise_if_cancelled()  # still counted: raised again
        finally:
            task.uncancel()
