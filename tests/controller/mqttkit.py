"""A plain aiomqtt subscriber for tests: subscribe, pump messages, notify waiters.

Subclasses say what to subscribe to (:meth:`filters`) and what a message means
(:meth:`handle`, called with the condition held); :meth:`wait` waits for a predicate.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Self

import aiomqtt

TIMEOUT = 10.0


class Subscriber:
    def __init__(self, host: str, port: int, identifier: str) -> None:
        self.host, self.port = host, port
        self._id = identifier
        self._changed = asyncio.Condition()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    def filters(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    async def handle(self, topic: str, payload: bytes) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._client = aiomqtt.Client(self.host, self.port, identifier=self._id)
        await self._client.__aenter__()
        await self._client.subscribe(self.filters())
        self._task = asyncio.create_task(self._pump())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None and self._client is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)

    async def _pump(self) -> None:
        assert self._client is not None
        async for message in self._client.messages:
            payload = bytes(message.payload)  # type: ignore[arg-type]
            async with self._changed:
                await self.handle(str(message.topic), payload)
                self._changed.notify_all()

    async def wait(self, predicate: Callable[[], Any], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)
