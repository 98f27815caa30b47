"""The operator verbs' reader on MQTT 3.1.1: a ``drift --follow`` session degrades to a
clean-session-false connection (the broker queues QoS 1 messages while it is away) and is
ended on exit by a clean reconnect, since 3.1.1 has no session expiry to set to 0."""

from __future__ import annotations

import argparse
import threading
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.commands._fleetview import Reader, Session
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker


def args(broker: Any, prefix: str, version: str) -> argparse.Namespace:
    return argparse.Namespace(
        broker=broker.url, prefix=prefix, username=None, password_file=None,
        ca=None, cert=None, client_key=None, mqtt_version=version,
    )  # fmt: skip


def publish(broker: Any, topic: str, payload: bytes) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_311_follow_session_is_kept_while_away_and_ended_on_exit(
    broker: Any, unique_prefix: str
) -> None:
    topic = Topics(unique_prefix).event("drift")
    session = Session(client_id=f"follow-{unique_prefix.split('/')[1]}", expiry=300)
    seen: list[bool | None] = []
    first = Reader(
        args(broker, unique_prefix, "3.1.1"), [topic], "drift", session=session,
        on_session=lambda _n, present: seen.append(present),
    )  # fmt: skip
    assert first.protocol == "3.1.1"
    first.snapshot()
    first.close()  # away: the broker keeps the session and queues for it
    publish(broker, topic, b'{"queued": true}')

    got = threading.Event()
    again = Reader(
        args(broker, unique_prefix, "3.1.1"), [topic], "drift", session=session,
        on_session=lambda _n, present: seen.append(present),
        follow=lambda _t, payload: got.set() if b"queued" in payload else None,
    )  # fmt: skip
    assert got.wait(30), "the message sent while away was not queued for the session"
    again.close(end_session=True)

    last = Reader(
        args(broker, unique_prefix, "3.1.1"), [topic], "drift", session=session,
        on_session=lambda _n, present: seen.append(present),
    )  # fmt: skip
    last.close(end_session=True)
    assert [present for present in seen if present is not None] == [False, True, False]
