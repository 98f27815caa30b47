"""The transport against a real mosquitto: versions, subscriptions, pipelining, backpressure."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from setpoint.kit.backoff import Backoff
from setpoint.mosquitto import Broker
from setpoint.transport import (
    Client,
    ConnectionLost,
    Session,
    Settings,
    Subscription,
)


def settings(broker: Broker, client_id: str, **kw: object) -> Settings:
    return Settings(broker.host, broker.port, client_id, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("protocol", "expected"), [("auto", "5"), ("5", "5"), ("3.1.1", "3.1.1")])
async def test_connects_with_the_version_asked(
    broker_session: Broker, unique_prefix: str, protocol: str, expected: str
) -> None:
    session = await Session.open(settings(broker_session, f"t-{protocol}", protocol=protocol))
    try:
        assert session.protocol == expected
        topic = f"{unique_prefix}/a"
        await session.subscribe([Subscription(topic, qos=1)])
        ack = await session.publish(topic, b"x", qos=1)
        async with asyncio.timeout(30):
            await ack
            [message] = await session.take()
        assert (message.topic, message.payload, message.retain) == (topic, b"x", False)
    finally:
        session.close()


def test_an_unknown_protocol_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"auto, 5, 3\.1\.1"):
        Settings("127.0.0.1", 1883, "x", protocol="4")  # type: ignore[arg-type]


async def test_pipelined_qos1_publishes_are_all_acknowledged_by_packet_id(
    broker_session: Broker, unique_prefix: str
) -> None:
    session = await Session.open(settings(broker_session, "t-pipe", max_inflight=16))
    try:
        acks = [
            await session.publish(f"{unique_prefix}/p/{i}", b"%d" % i, qos=1, retain=True)
            for i in range(500)
        ]
        assert session.inflight <= 16
        async with asyncio.timeout(30):
            await asyncio.gather(*acks)
        assert session.inflight == 0
        for i in range(500):  # clear the retained messages
            await session.publish(f"{unique_prefix}/p/{i}", b"", qos=0, retain=True)
    finally:
        session.close()


async def test_inbound_backpressure_pauses_reading_and_loses_nothing(
    broker_session: Broker, unique_prefix: str
) -> None:
    topic = f"{unique_prefix}/flood"
    reader = await Session.open(settings(broker_session, "t-bp-in", max_inbound_bytes=4096))
    writer = await Session.open(settings(broker_session, "t-bp-out"))
    try:
        await reader.subscribe([Subscription(topic, qos=1)])
        payload = b"x" * 200
        acks = [await writer.publish(topic, payload + b"%d" % i, qos=1) for i in range(2000)]
        async with asyncio.timeout(30):
            await asyncio.gather(*acks)
            while not reader.paused:
                await asyncio.sleep(0.01)
            got: list[bytes] = []
            while len(got) < 2000:
                got += [m.payload for m in await reader.take(64)]
        assert got == [payload + b"%d" % i for i in range(2000)]
        assert not reader.paused
    finally:
        writer.close()
        reader.close()


async def test_a_lost_session_raises_connection_lost_from_take(broker: Broker) -> None:
    session = await Session.open(settings(broker, "t-lost", keepalive=5))
    broker.stop()
    with pytest.raises(ConnectionLost, match="lost"):
        async with asyncio.timeout(30):
            await session.take()


async def test_the_client_reconnects_after_the_broker_comes_back(broker: Broker) -> None:
    sessions: list[Session] = []
    second = asyncio.Event()

    async def on_session(session: Session) -> None:
        sessions.append(session)
        if len(sessions) == 2:
            second.set()
        await session.take()  # until lost

    client = Client(settings(broker, "t-re", keepalive=5), backoff=Backoff(0.05, 0.2))
    task = asyncio.create_task(client.run(on_session))
    try:
        async with asyncio.timeout(30):
            while not sessions:
                await asyncio.sleep(0.01)
            broker.restart()
            await second.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_broker_that_stops_answering_ends_the_session_with_data_unsent(
    broker: Broker,
) -> None:
    """The hang the controller's link once met: QoS 1 publishes written, no PUBACK, no
    PINGRESP, an idle loop, for minutes. gmqtt's heartbeat gave up, but with a graceful
    close, which waits for the write buffer to drain; a broker that stopped reading never
    drains it, so the session never ended. It must end (and the socket be aborted)."""
    # MQTT 3.1.1: no receive maximum bounds the QoS 1 publishes written here.
    session = await Session.open(settings(broker, "t-stall", keepalive=1, protocol="3.1.1"))
    transport = session._client._connection._transport  # type: ignore[union-attr]
    with broker.stalled():
        acks = []
        while transport.get_write_buffer_size() == 0:  # the kernel's buffers are full
            acks.append(session.publish_nowait("t/stall", b"x" * 65536, qos=1))
        with pytest.raises(ConnectionLost, match="stopped answering"):
            async with asyncio.timeout(30):
                await acks[-1]
        assert session.lost.done() and transport.is_closing()
        async with asyncio.timeout(30):  # aborted: the socket is gone, not left draining
            while transport.get_extra_info("socket").fileno() != -1:
                await asyncio.sleep(0.05)


@pytest.mark.engine
async def test_no_local_is_left_out_on_3_1_1_where_the_broker_would_drop_the_connection(
    nats_cluster: Any, unique_prefix: str
) -> None:
    """gmqtt sets the no_local bit on 3.1.1 too, where the options byte must be the QoS
    alone; NATS (3.1.1 only) drops the connection for it. The controller's link subscribes
    with no_local, so on NATS it reconnected in a loop."""
    host, port = nats_cluster.urls[0].removeprefix("mqtt://").rsplit(":", 1)
    session = await Session.open(Settings(host, int(port), "t-nolocal"))
    try:
        assert session.protocol == "3.1.1"
        topic = f"{unique_prefix}/nl"
        async with asyncio.timeout(30):
            assert await session.subscribe([Subscription(topic, qos=0, no_local=True)]) == [0]
            await (await session.publish(topic, b"x", qos=1))
            [message] = await session.take()
        assert message.payload == b"x"  # 3.1.1 has no no_local: our own comes back
    finally:
        session.close()


async def test_nothing_listening_is_one_attempt_not_a_protocol_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A port nobody listens on is unreachable: ``auto`` does not try 3.1.1 after MQTT 5
    (that would double every failed connect and name a refusal that never happened)."""
    from setpoint.mosquitto import free_port
    from setpoint.transport import Unreachable

    caplog.set_level("INFO", "setpoint.transport.client")
    with pytest.raises(Unreachable, match="cannot connect to"):
        await Session.open(Settings("127.0.0.1", free_port(), "t-unreachable"))
    assert "trying 3.1.1" not in caplog.text
