"""The transport's writes against a real mosquitto: the packets of one turn of the event loop
go out in one socket write, in order; a source address the connection leaves from."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from setpoint.mosquitto import Broker
from setpoint.transport import ConnectionLost, Session, Settings, Subscription
from setpoint.transport import client as transport_client


def settings(broker: Broker, client_id: str, **kw: Any) -> Settings:
    return Settings(broker.host, broker.port, client_id, **kw)


def count_writes(session: Session) -> list[int]:
    """The sizes of the socket writes the session makes from now on."""
    transport = session._client._connection._transport  # type: ignore[union-attr]
    sizes: list[int] = []
    write = transport.write

    def counted(data: bytes) -> None:
        sizes.append(len(data))
        write(data)

    transport.write = counted
    return sizes


async def received(session: Session, n: int) -> list[bytes]:
    got: list[bytes] = []
    async with asyncio.timeout(30):
        while len(got) < n:
            got += [m.payload for m in await session.take()]
    return got


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_batch_of_publishes_goes_out_in_one_write_in_order(
    broker_session: Broker, unique_prefix: str, protocol: str
) -> None:
    reader = await Session.open(settings(broker_session, f"w-read-{protocol}", protocol=protocol))
    writer = await Session.open(settings(broker_session, f"w-write-{protocol}", protocol=protocol))
    try:
        await reader.subscribe([Subscription(f"{unique_prefix}/#", qos=1)])
        sizes = count_writes(writer)
        # QoS 0, then as many QoS 1 as the broker lets wait for a PUBACK (its receive
        # maximum), all in one turn of the loop.
        n0, n1 = 200, min(writer._ids, 100)
        acks = [await writer.publish(f"{unique_prefix}/{i % 7}", b"%d" % i) for i in range(n0)]
        acks += [
            await writer.publish(f"{unique_prefix}/{i % 7}", b"%d" % i, qos=1)
            for i in range(n0, n0 + n1)
        ]
        assert sizes == []  # nothing written yet: the batch waits for the end of the turn
        async with asyncio.timeout(30):
            await asyncio.gather(*acks)
        assert len(sizes) == 1, sizes
        assert await received(reader, n0 + n1) == [b"%d" % i for i in range(n0 + n1)]
    finally:
        reader.close()
        writer.close()


async def test_a_batch_past_the_coalescing_bound_is_written_as_it_grows(
    broker_session: Broker, unique_prefix: str
) -> None:
    reader = await Session.open(settings(broker_session, "w-big-read"))
    writer = await Session.open(settings(broker_session, "w-big-write"))
    try:
        await reader.subscribe([Subscription(f"{unique_prefix}/#", qos=1)])
        sizes = count_writes(writer)
        payload = b"x" * 1000
        n = 3 * transport_client.WRITE_COALESCE_BYTES // len(payload)
        acks = [
            writer.publish_nowait(f"{unique_prefix}/big", payload + b"%d" % i) for i in range(n)
        ]
        assert len(sizes) >= 2  # written before the end of the turn: bounded memory
        assert max(sizes) < transport_client.WRITE_COALESCE_BYTES + 2 * len(payload)
        async with asyncio.timeout(30):
            await asyncio.gather(*acks)
        assert await received(reader, n) == [payload + b"%d" % i for i in range(n)]
    finally:
        reader.close()
        writer.close()


async def test_a_publish_just_before_close_is_written_before_the_disconnect(
    broker_session: Broker, unique_prefix: str
) -> None:
    topic = f"{unique_prefix}/last"
    writer = await Session.open(settings(broker_session, "w-close"))
    writer.publish_nowait(topic, b"last words", retain=True)
    writer.close()  # same turn: the PUBLISH still waits to be written
    reader = await Session.open(settings(broker_session, "w-close-read"))
    try:
        await reader.subscribe([Subscription(topic, qos=1)])
        assert await received(reader, 1) == [b"last words"]
    finally:
        reader.close()


async def test_the_connection_leaves_from_the_source_address(broker_session: Broker) -> None:
    session = await Session.open(settings(broker_session, "w-src", source_address="127.0.0.2"))
    try:
        transport = session._client._connection._transport  # type: ignore[union-attr]
        assert transport.get_extra_info("sockname")[0] == "127.0.0.2"
        ack = await session.publish("w-src/x", b"1", qos=1)
        async with asyncio.timeout(30):
            await ack
    finally:
        session.close()


def test_a_source_address_that_is_not_an_address_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValueError, match=r"source_address must be an IP address.*'eth0'"):
        Settings("127.0.0.1", 1883, "x", source_address="eth0")


async def test_a_source_address_not_on_this_machine_is_a_connection_lost(
    broker_session: Broker,
) -> None:
    # 192.0.2.1 (TEST-NET-1, RFC 5737) is on no interface here: bind() fails at once.
    with pytest.raises(ConnectionLost, match=r"cannot connect to .*assign"):
        await Session.open(settings(broker_session, "w-nosrc", source_address="192.0.2.1"))


async def test_the_packet_handler_carries_no_closures_per_session(broker_session: Broker) -> None:
    # Ten thousand simulated devices each have a handler: its strict hooks are methods of
    # its class, not functions held by every instance (~3 KB a device when they were).
    session = await Session.open(settings(broker_session, "w-handler"))
    try:
        handler = session._client._package_handler  # type: ignore[union-attr]
        assert isinstance(handler, transport_client._Handler)
        assert not [k for k, v in vars(handler).items() if callable(v) and k.startswith("_handle")]
        assert "_parse_properties" not in vars(handler)
    finally:
        session.close()
