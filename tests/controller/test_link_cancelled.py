"""The controller's link ends when it is cancelled while its connection fails (the
TaskGroup of its session raises the failure, not the cancellation: a NATS node that
stalled as the test cancelled the link kept ``Link.run`` reconnecting for ever)."""

from __future__ import annotations

import asyncio

from setpoint.controller.broker import Backoff, BrokerSettings, Link
from setpoint.controller.errors import BrokerUnavailable
from setpoint.proto.topics import Topics


async def test_a_link_cancelled_as_its_connection_fails_ends() -> None:
    link = Link(
        BrokerSettings("127.0.0.1", 9), Topics("t/v1"), [], lambda _fact: None,
        backoff=Backoff(0.01, 0.01),
    )  # fmt: skip
    rounds = 0

    async def serve() -> None:  # a session whose connection is lost as the link is cancelled
        nonlocal rounds
        rounds += 1
        async with asyncio.TaskGroup() as tg:

            async def failure() -> None:
                await asyncio.sleep(0)
                running.cancel()
                raise BrokerUnavailable("connection lost")

            tg.create_task(failure())
            await asyncio.sleep(60)

    link._serve = serve  # type: ignore[method-assign]
    running = asyncio.ensure_future(link.run())
    done, _ = await asyncio.wait({running}, timeout=10)
    assert done and running.cancelled(), f"still reconnecting after {rounds} rounds"
    assert rounds == 1
