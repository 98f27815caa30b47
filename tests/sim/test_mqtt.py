"""The simulator's MQTT connections (on setpoint.transport) against a real mosquitto.

The codec is gmqtt's and is fuzzed with the transport (``tests/transport/test_fuzz.py``).
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path

import pytest

from setpoint.mosquitto import Broker
from setpoint.sim import mqtt
from setpoint.sim.running import SimConfig, Swarm


async def test_against_mosquitto_subscribe_publish_retain_and_will(broker: Broker) -> None:
    topic = f"sim-test/{secrets.token_hex(4)}"
    got: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()

    def received(t: str, p: bytes, r: bool) -> None:
        got.put_nowait((t, p, r))

    publisher = await mqtt.open_connection(
        broker.host, broker.port, "pub-1", will=(f"{topic}/will", b"gone", 1, True)
    )
    acked = publisher.publish(f"{topic}/kept", b"retained", qos=1, retain=True, wait=True)
    assert acked is not None
    await asyncio.wait_for(acked, 30)
    subscriber = await mqtt.open_connection(broker.host, broker.port, "sub-1", on_message=received)
    codes = await subscriber.subscribe([(f"{topic}/#", 1)])
    assert codes == [1]
    assert await asyncio.wait_for(got.get(), 30) == (f"{topic}/kept", b"retained", True)
    assert publisher.publish(f"{topic}/live", b"q0") is None  # QoS 0: nothing to wait for
    assert await asyncio.wait_for(got.get(), 30) == (f"{topic}/live", b"q0", False)
    assert subscriber.ping()
    publisher.abort()  # no DISCONNECT: the broker publishes the will
    assert await asyncio.wait_for(got.get(), 30) == (f"{topic}/will", b"gone", False)
    subscriber.unsubscribe([f"{topic}/#"])
    subscriber.disconnect()
    assert not subscriber.connected


async def test_a_lost_connection_calls_on_lost_with_the_error(broker: Broker) -> None:
    lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
    await mqtt.open_connection(
        broker.host, broker.port, "lost-1", keepalive=5,
        on_lost=lambda conn, exc: lost.set_result(exc),
    )  # fmt: skip
    broker.stop()
    error = await asyncio.wait_for(lost, 30)
    assert isinstance(error, mqtt.ConnectionLost)


async def test_a_connected_device_gives_back_what_gmqtt_waits_on_only_while_connecting(
    broker: Broker,
) -> None:
    # Three Events of gmqtt's are waited on only during connect(); a connected device drops
    # their waiter deques (~2 KB of its RSS) and must still receive and notice its loss.
    topic = f"sim-test/{secrets.token_hex(4)}"
    got: asyncio.Queue[bytes] = asyncio.Queue()
    lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
    conn = await mqtt.open_connection(
        broker.host, broker.port, "slim-1", keepalive=5,
        on_message=lambda t, p, r: got.put_nowait(p),
        on_lost=lambda conn, exc: lost.set_result(exc),
    )  # fmt: skip
    client = conn.session._client
    assert client is not None
    events = (
        client._connack_received,
        client._connection_lost,
        client._connection._protocol._connected,
    )
    assert [event._waiters for event in events] == [(), (), ()]
    assert await conn.subscribe([(topic, 1)]) == [1]
    conn.publish(topic, b"still here", qos=1)
    assert await asyncio.wait_for(got.get(), 30) == b"still here"
    broker.stop()
    assert isinstance(await asyncio.wait_for(lost, 30), mqtt.ConnectionLost)


async def test_a_refused_connection_is_a_typed_error(broker: Broker) -> None:
    broker.stop()
    with pytest.raises(mqtt.TransportError, match="cannot connect"):
        await mqtt.open_connection(broker.host, broker.port, "nobody", timeout=10)


async def test_a_refused_subscription_is_asked_again_after_a_backoff() -> None:
    """A clustered broker refuses subscriptions while it creates them (NATS: SUBACK 0x80
    under a burst of connects): the device subscribes again, and becomes ready."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "transport"))
    from fakebroker import CONNACK_V5, FakeBroker, read_packet

    subscribes: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_packet(reader)
        writer.write(CONNACK_V5)
        while True:
            first, body = await read_packet(reader)
            if first >> 4 != 8:
                continue  # the device's presence and the like
            subscribes.append(body)
            code = b"\x80" if len(subscribes) == 1 else b"\x01"
            writer.write(b"\x90\x04" + body[:2] + b"\x00" + code)
            await writer.drain()

    async with FakeBroker(script) as broker:
        config = SimConfig("127.0.0.1", broker.port, devices=1, echo=True, connect_rate=0, seed=3)
        ready = asyncio.Event()
        swarm = Swarm(config, lambda info: ready.set())
        stop = asyncio.Event()
        task = asyncio.create_task(swarm.run(stop))
        try:
            async with asyncio.timeout(30):
                await ready.wait()
            assert len(subscribes) == 2 and swarm.refusals == 1
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
