"""The transport against a broker that misbehaves: a typed error, never a hang or a crash.

A short run here (``make test``); ``python -m bench.transport_fuzz`` runs many more cases.
Random with a fixed seed, so a failure is reproduced by its seed.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from fakebroker import CONNACK_V5, CONNACK_V311, FakeBroker, read_packet

from setpoint.transport import (
    ConnectionLost,
    ConnectRefused,
    Session,
    Settings,
    SubscriptionRefused,
    TransportError,
)

CASES = 60


def garbage(rng: random.Random) -> bytes:
    """Bytes that look a little like MQTT from a broker: valid, truncated or impossible."""
    kind = rng.randrange(6)
    body = rng.randbytes(rng.randrange(0, 40))
    first = rng.choice([0x30, 0x32, 0x34, 0x40, 0x90, 0xB0, 0xD0, 0xE0, 0x00, 0xF0, 0x20])
    if kind == 0:  # remaining length longer than 4 bytes
        return bytes([first, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F])
    if kind == 1:  # a length that claims more than is sent (then the broker closes)
        return bytes([first, len(body) + rng.randrange(1, 50)]) + body
    if kind == 2:  # a length shorter than the fields inside
        return bytes([first, min(len(body), 1)]) + body[:1]
    if kind == 3:  # a PUBLISH whose topic length runs past the packet
        return bytes([0x30, 4, 0xFF, 0xFF]) + body[:2].ljust(2, b"\x00")
    if kind == 4:  # pure noise
        return rng.randbytes(rng.randrange(1, 64))
    return bytes([first, len(body)]) + body  # a well-framed packet with random content


def fuzz_script(seed: int):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, body = await read_packet(reader)  # CONNECT
        assert first == 0x10
        writer.write(CONNACK_V5 if body[6] == 5 else CONNACK_V311)
        for _ in range(rng.randrange(1, 4)):
            writer.write(garbage(rng))
        await writer.drain()
        await asyncio.sleep(0.01)
        # then close mid-stream: the client must never wait for bytes that will not come

    return script


@pytest.mark.parametrize("seed", range(CASES))
async def test_malformed_bytes_end_the_session_with_a_typed_error(seed: int) -> None:
    async with FakeBroker(fuzz_script(seed)) as broker:
        settings = Settings("127.0.0.1", broker.port, f"fuzz-{seed}", keepalive=60)
        async with asyncio.timeout(20):
            try:
                session = await Session.open(settings)
            except TransportError:
                return  # refused while connecting: typed, fine
            try:
                while True:
                    await session.take()  # whatever parsed; then the typed error
            except TransportError as exc:
                assert str(exc)
            finally:
                session.close()


async def test_a_broker_that_closes_mid_packet_gives_connection_lost() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_packet(reader)
        writer.write(CONNACK_V5)
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"\x30\x20\x00\x03a/b")  # a PUBLISH cut short, then the socket closes
        await writer.drain()

    async with FakeBroker(script) as broker:
        session = await Session.open(Settings("127.0.0.1", broker.port, "cut", keepalive=60))
        with pytest.raises(ConnectionLost):
            async with asyncio.timeout(20):
                await session.take()


async def test_a_stream_that_never_frames_ends_at_the_keepalive_deadline() -> None:
    """gmqtt waits for the rest of a packet whose length it cannot meet; its heartbeat
    (nothing parsed for twice the keepalive) ends the session: bounded, and typed."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_packet(reader)
        writer.write(CONNACK_V5 + b"\x30\xff\xff\xff\xff\x7f")
        await writer.drain()
        await asyncio.sleep(60)  # keep the socket open: only the client can end this

    async with FakeBroker(script) as broker:
        session = await Session.open(Settings("127.0.0.1", broker.port, "len", keepalive=1))
        with pytest.raises(TransportError):
            async with asyncio.timeout(20):
                await session.take()


async def test_a_refused_subscription_names_the_filter_and_the_code() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_packet(reader)
        writer.write(CONNACK_V5)
        _, body = await read_packet(reader)  # SUBSCRIBE: packet id first
        writer.write(b"\x90\x05" + body[:2] + b"\x00\x00\x87")  # no properties; 0, 0x87
        await writer.drain()
        await asyncio.sleep(60)

    async with FakeBroker(script) as broker:
        session = await Session.open(Settings("127.0.0.1", broker.port, "sub", keepalive=60))
        try:
            with pytest.raises(SubscriptionRefused) as caught:
                async with asyncio.timeout(20):
                    await session.subscribe(["ok/#", "devices/+/reported"])
            assert caught.value.topic_filter == "devices/+/reported"
            assert caught.value.code == 0x87
            assert "devices/+/reported" in str(caught.value) and "0x87" in str(caught.value)
        finally:
            session.close()


async def test_a_broker_that_refuses_mqtt5_gets_3_1_1_in_auto() -> None:
    versions: list[int] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_packet(reader)
        versions.append(body[6])
        if body[6] == 5:
            writer.write(b"\x20\x02\x00\x01")  # 3.1.1: unacceptable protocol version
        else:
            writer.write(CONNACK_V311)
        await writer.drain()
        await asyncio.sleep(60)

    async with FakeBroker(script) as broker:
        async with asyncio.timeout(20):
            session = await Session.open(Settings("127.0.0.1", broker.port, "old"))
        assert session.protocol == "3.1.1"
        assert versions == [5, 4]
        session.close()
        with pytest.raises(ConnectRefused, match="unacceptable protocol version"):
            async with asyncio.timeout(20):
                await Session.open(Settings("127.0.0.1", broker.port, "old", protocol="5"))


async def test_a_broker_that_drops_an_mqtt5_connect_gets_3_1_1_in_auto() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_packet(reader)
        if body[6] == 5:
            return  # closes without a CONNACK
        writer.write(CONNACK_V311)
        await writer.drain()
        await asyncio.sleep(60)

    async with FakeBroker(script) as broker:
        async with asyncio.timeout(20):
            session = await Session.open(Settings("127.0.0.1", broker.port, "nats-like"))
        assert session.protocol == "3.1.1"
        session.close()


async def test_bad_credentials_are_refused_with_a_hint() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_packet(reader)
        writer.write(b"\x20\x03\x00\x86\x00")
        await writer.drain()
        await asyncio.sleep(60)

    async with FakeBroker(script) as broker:
        with pytest.raises(ConnectRefused, match=r"bad user name or password.*check"):
            async with asyncio.timeout(20):
                await Session.open(
                    Settings("127.0.0.1", broker.port, "who", username="u", password="p")
                )
