"""A scripted broker on a loopback socket: it answers what a test tells it to, byte for byte.

For the transport's unit and fuzz tests only (a real mosquitto never sends malformed bytes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

CONNACK_V5 = b"\x20\x03\x00\x00\x00"
CONNACK_V311 = b"\x20\x02\x00\x00"


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One packet from the client: (first byte, body)."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


class FakeBroker:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FakeBroker:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await self.script(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
