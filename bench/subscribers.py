"""Bare subscribers for the ingest benchmark, one per client library, each in its own process.

    python -m bench.subscribers CLIENT HOST PORT FILTER COUNT

``CLIENT`` is ``aiomqtt`` (MQTT 3.1.1), ``aiomqtt-v5`` (MQTT 5, as the controller's link
connects), ``paho`` (its network loop in a thread, as the shim runs it), ``mqtt5`` (the Rust
sans-I/O MQTT 5 codec under a minimal asyncio protocol), ``gmqtt`` / ``gmqtt-311`` (gmqtt's
client, MQTT 5 / 3.1.1) or ``transport`` / ``transport-311`` (``setpoint.transport`` on
gmqtt, MQTT 5 / 3.1.1; decision 0008). Each prints
``subscribed`` once its SUBSCRIBE is acknowledged, then, after COUNT messages (or 120 s),
one JSON line: ``{"count", "first", "last"}`` with ``time.time()`` stamps. A subscriber
that gets fewer (the broker drops QoS 0 messages for a client that falls too far behind)
stops after ``IDLE`` seconds without a message and says how many it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time

IDLE = 3.0


def done(count: int, first: float, last: float) -> None:
    print(json.dumps({"count": count, "first": first, "last": last}), flush=True)


async def run_aiomqtt(host: str, port: int, topic_filter: str, n: int, v5: bool) -> None:
    import aiomqtt

    protocol = aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(host, port, identifier="bench-aiomqtt", protocol=protocol) as client:
        await client.subscribe(topic_filter, qos=0)
        print("subscribed", flush=True)
        count, first, last = 0, 0.0, 0.0
        messages = aiter(client.messages)
        while count < n:
            try:
                async with asyncio.timeout(120 if count == 0 else IDLE):
                    await anext(messages)
            except TimeoutError:
                break  # messages were lost: the count says how many arrived
            count += 1
            last = time.time()
            if count == 1:
                first = last
        done(count, first, last)


def run_paho(host: str, port: int, topic_filter: str, n: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    state = {"count": 0, "first": 0.0, "last": 0.0}
    finished = threading.Event()
    subscribed = threading.Event()

    def on_message(client: object, userdata: object, message: object) -> None:
        state["count"] += 1
        state["last"] = time.time()
        if state["count"] == 1:
            state["first"] = state["last"]
        if state["count"] >= n:
            finished.set()

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-paho")
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_connect = lambda c, *a: c.subscribe(topic_filter, 0)
    client.connect(host, port)
    client.loop_start()
    subscribed.wait(10)
    print("subscribed", flush=True)
    deadline = time.time() + 120
    while not finished.wait(0.5):
        now = time.time()
        if (state["count"] and now - state["last"] > IDLE) or now > deadline:
            break
    done(int(state["count"]), state["first"], state["last"] or time.time())
    client.loop_stop()


async def _until(finished: asyncio.Event, state: dict[str, float]) -> None:
    deadline = time.time() + 120
    while not finished.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished.wait(), 0.5)
        now = time.time()
        if (state["count"] and now - state["last"] > IDLE) or now > deadline:
            break
    done(int(state["count"]), state["first"], state["last"] or time.time())


async def run_gmqtt(host: str, port: int, topic_filter: str, n: int, v311: bool) -> None:
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv50, MQTTv311

    state = {"count": 0, "first": 0.0, "last": 0.0}
    finished = asyncio.Event()
    subscribed = asyncio.Event()

    def on_message(client: object, topic: str, payload: bytes, qos: int, props: object) -> int:
        state["count"] += 1
        state["last"] = time.time()
        if state["count"] == 1:
            state["first"] = state["last"]
        if state["count"] >= n:
            finished.set()
        return 0

    client = gmqtt.Client("bench-gmqtt")
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    await client.connect(host, port, version=MQTTv311 if v311 else MQTTv50)
    client.subscribe(topic_filter, qos=0)
    await subscribed.wait()
    print("subscribed", flush=True)
    await _until(finished, state)
    await client.disconnect()


async def run_mqtt5(host: str, port: int, topic_filter: str, n: int) -> None:
    import mqtt5

    state = {"count": 0, "first": 0.0, "last": 0.0}
    finished = asyncio.Event()
    ready = asyncio.Event()
    read = mqtt5.read

    class P(asyncio.Protocol):
        def __init__(self) -> None:
            self.buf = bytearray()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            transport.write(mqtt5.ConnectPacket("bench-mqtt5", clean_start=True).write())  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            buf = self.buf
            buf += data
            view = memoryview(buf)
            pos = 0
            acks = []
            while True:
                try:
                    packet, used = read(view[pos:])
                except IndexError:
                    break
                pos += used
                if isinstance(packet, mqtt5.PublishPacket):
                    if packet.packet_id is not None:
                        acks.append(mqtt5.PubAckPacket(packet.packet_id).write())
                    state["count"] += 1
                    state["last"] = time.time()
                    if state["count"] == 1:
                        state["first"] = state["last"]
                    if state["count"] >= n:
                        finished.set()
                else:
                    ready.set()
            view.release()
            del buf[:pos]
            if acks:
                self.t.write(b"".join(acks))  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    transport, _proto = await loop.create_connection(P, host, port)
    await ready.wait()
    ready.clear()
    sub = mqtt5.SubscribePacket(
        1, [mqtt5.TopicFilter(topic_filter, max_qos=mqtt5.QoS.AT_MOST_ONCE)]
    )
    transport.write(sub.write())
    await ready.wait()
    print("subscribed", flush=True)
    await _until(finished, state)
    transport.close()


async def run_transport(host: str, port: int, topic_filter: str, n: int, protocol: str) -> None:
    from setpoint.transport import Session, Settings, Subscription

    state = {"count": 0, "first": 0.0, "last": 0.0}
    session = await Session.open(
        Settings(host, port, "bench-transport", protocol=protocol)  # type: ignore[arg-type]
    )
    await session.subscribe([Subscription(topic_filter, 0)])
    print("subscribed", flush=True)
    deadline = time.time() + 120
    while state["count"] < n:
        try:
            async with asyncio.timeout(120 if not state["count"] else IDLE):
                batch = await session.take(1024)
        except TimeoutError:
            break
        state["count"] += len(batch)
        state["last"] = time.time()
        if not state["first"]:
            state["first"] = state["last"]
        if time.time() > deadline:
            break
    done(int(state["count"]), state["first"], state["last"] or time.time())
    session.close()


def main(argv: list[str]) -> int:
    client, host, port, topic_filter, n = argv[0], argv[1], int(argv[2]), argv[3], int(argv[4])
    if client in ("aiomqtt", "aiomqtt-v5"):
        asyncio.run(run_aiomqtt(host, port, topic_filter, n, client == "aiomqtt-v5"))
    elif client == "paho":
        run_paho(host, port, topic_filter, n)
    elif client in ("gmqtt", "gmqtt-311"):
        asyncio.run(run_gmqtt(host, port, topic_filter, n, client == "gmqtt-311"))
    elif client in ("transport", "transport-311"):
        protocol = "3.1.1" if client == "transport-311" else "5"
        asyncio.run(run_transport(host, port, topic_filter, n, protocol))
    elif client == "mqtt5":
        asyncio.run(run_mqtt5(host, port, topic_filter, n))
    else:
        print(f"unknown client {client!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
