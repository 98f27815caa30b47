"""The simulator's lean MQTT client: the codec alone, then against a real mosquitto."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from setpoint.mosquitto import Broker
from setpoint.sim import mqtt


def test_publish_round_trips_through_the_parser_byte_by_byte() -> None:
    payload = bytes(range(256)) * 3  # remaining length needs two bytes
    packet = mqtt.publish("a/b", payload, qos=1, retain=True, packet_id=513)
    parser = mqtt.Parser()
    packets = []
    for i in range(len(packet)):
        packets += parser.feed(packet[i : i + 1])
    assert len(packets) == 1
    kind, flags, body = packets[0]
    assert kind == mqtt.PUBLISH
    assert mqtt.parse_publish(flags, body) == ("a/b", payload, 1, True, 513)


def test_several_packets_in_one_read_and_a_partial_tail() -> None:
    stream = mqtt.publish("t", b"x") + mqtt.PINGRESP_PACKET + mqtt.publish("u", b"y" * 200)
    parser = mqtt.Parser()
    first = parser.feed(stream[:-10])
    assert [p[0] for p in first] == [mqtt.PUBLISH, mqtt.PINGRESP]
    rest = parser.feed(stream[-10:])
    assert mqtt.parse_publish(rest[0][1], rest[0][2])[:2] == ("u", b"y" * 200)


def test_remaining_length_encoding_at_the_boundaries() -> None:
    for size in (0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152):
        packet = mqtt.publish("t", b"\0" * (size - 3) if size >= 3 else b"")
        (kind, _flags, body), *_ = mqtt.Parser(max_packet=1 << 23).feed(packet)
        assert kind == mqtt.PUBLISH and len(body) == max(size, 3)


def test_oversized_packet_is_refused_from_its_header() -> None:
    with pytest.raises(mqtt.ProtocolError, match="exceeds"):
        mqtt.Parser(max_packet=100).feed(mqtt.publish("t", b"x" * 200)[:4])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="QoS 0 or 1"):
        mqtt.publish("t", b"", qos=2)
    with pytest.raises(ValueError, match="packet id"):
        mqtt.publish("t", b"", qos=1)
    with pytest.raises(ValueError, match="keepalive"):
        mqtt.connect("c", keepalive=70_000)


def test_connect_packet_carries_will_and_credentials() -> None:
    packet = mqtt.connect("dev", keepalive=30, will=("w/t", b"offline", 1, True), username="u",
                          password="p")  # fmt: skip
    (kind, _flags, body), *_ = mqtt.Parser().feed(packet)
    assert kind == mqtt.CONNECT
    assert body[:7] == b"\x00\x04MQTT\x04"
    assert body[7] == 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
    assert body.endswith(b"\x00\x01u\x00\x01p")


async def test_against_mosquitto_subscribe_publish_retain_and_will(broker: Broker) -> None:
    topic = f"sim-test/{secrets.token_hex(4)}"
    got: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()

    def received(t: str, p: bytes, r: bool) -> None:
        got.put_nowait((t, p, r))

    publisher = await mqtt.open_connection(
        broker.host, broker.port, "pub-1", will=(f"{topic}/will", b"gone", 1, True)
    )
    await publisher.publish(f"{topic}/kept", b"retained", qos=1, retain=True, wait=True)
    subscriber = await mqtt.open_connection(broker.host, broker.port, "sub-1", on_message=received)
    codes = await subscriber.subscribe([(f"{topic}/#", 1)])
    assert codes == b"\x01"
    assert await asyncio.wait_for(got.get(), 5) == (f"{topic}/kept", b"retained", True)
    assert publisher.publish(f"{topic}/live", b"q0") is None  # QoS 0: nothing to wait for
    assert await asyncio.wait_for(got.get(), 5) == (f"{topic}/live", b"q0", False)
    assert subscriber.ping()
    publisher.abort()  # no DISCONNECT: the broker publishes the will
    assert await asyncio.wait_for(got.get(), 5) == (f"{topic}/will", b"gone", False)
    await subscriber.unsubscribe([f"{topic}/#"])
    subscriber.disconnect()


async def test_a_refused_connection_is_an_error(broker: Broker) -> None:
    with pytest.raises(mqtt.ProtocolError, match="identifier rejected"):
        # MQTT 3.1.1: an empty client id needs a clean session, else CONNACK code 2.
        await mqtt.open_connection(broker.host, broker.port, "", clean=False)
