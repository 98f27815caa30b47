"""The private broker harness: persistence across crashes, size limits, restarts."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from setpoint.mosquitto import Broker, BrokerNotInstalled
from setpoint.mosquitto import broker as harness

TIMEOUT = 10.0


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def publish_retained(broker: Broker, topic: str, payload: bytes) -> None:
    """Publish retained at QoS 1 and wait for the broker's PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def read_retained(broker: Broker, topic: str) -> bytes | None:
    """What a new subscriber gets on ``topic``: the retained payload, or None."""
    got: list[bytes | None] = []
    done = threading.Event()
    marker = topic + "/__marker"

    def on_connect(client, userdata, flags, reason, props):  # type: ignore[no-untyped-def]
        client.subscribe([(topic, 0), (marker, 0)])

    def on_subscribe(client, userdata, mid, reasons, props):  # type: ignore[no-untyped-def]
        client.publish(marker, b"x")  # arrives after any retained message on `topic`

    def on_message(client, userdata, message):  # type: ignore[no-untyped-def]
        if message.topic == marker:
            done.set()
        elif not got:
            got.append(message.payload)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert done.wait(TIMEOUT), "marker never came back"
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0] if got else None


def test_retained_message_survives_a_clean_restart(broker: Broker, unique_prefix: str) -> None:
    topic = f"{unique_prefix}/groups/kiosks/desired"
    publish_retained(broker, topic, b"bundle-1")
    port = broker.port
    broker.restart()
    assert broker.port == port
    assert read_retained(broker, topic) == b"bundle-1"


def test_retained_message_survives_kill_9(broker: Broker, unique_prefix: str) -> None:
    topic = f"{unique_prefix}/groups/kiosks/desired"
    publish_retained(broker, topic, b"bundle-after-ack")
    # mosquitto 2.0 acknowledges first and saves in the same loop pass, a few ms later;
    # wait for the save itself, then pull the plug.
    wait_until(
        lambda: b"bundle-after-ack" in broker.db.read_bytes() if broker.db.exists() else False
    )
    broker.kill()  # SIGKILL: no shutdown save; only autosave_on_changes keeps it
    broker.start()
    assert read_retained(broker, topic) == b"bundle-after-ack"


def test_wipe_loses_retained_messages(broker: Broker, unique_prefix: str) -> None:
    topic = f"{unique_prefix}/groups/kiosks/desired"
    publish_retained(broker, topic, b"gone")
    broker.stop()
    broker.wipe()
    broker.start()
    assert read_retained(broker, topic) is None


def test_wipe_refuses_while_running(broker: Broker) -> None:
    with pytest.raises(harness.BrokerError, match="stopped"):
        broker.wipe()


def test_oversized_publish_is_refused_by_the_broker(broker: Broker, unique_prefix: str) -> None:
    topic = f"{unique_prefix}/devices/d1/reported"
    disconnected = threading.Event()
    reasons: list[object] = []

    def on_disconnect(client, userdata, flags, reason, props):  # type: ignore[no-untyped-def]
        reasons.append(reason)
        disconnected.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_disconnect = on_disconnect
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, b"\0" * (3 * 1024 * 1024), qos=1, retain=True)
        assert disconnected.wait(TIMEOUT), "broker accepted a 3 MiB packet"
    finally:
        client.loop_stop()
    # The broker dropped the client and kept nothing.
    assert read_retained(broker, topic) is None


def test_a_1_mib_envelope_fits(broker: Broker, unique_prefix: str) -> None:
    topic = f"{unique_prefix}/groups/big/desired"
    payload = os.urandom(1024 * 1024)
    publish_retained(broker, topic, payload)
    assert read_retained(broker, topic) == payload


def test_each_broker_gets_its_own_port_and_directory(tmp_path: Path) -> None:
    with Broker(tmp_path / "a") as a, Broker(tmp_path / "b") as b:
        assert a.port != b.port
        assert a.running and b.running
        assert "127.0.0.1" in a.url
    assert not a.running and not b.running


def test_config_is_rendered_without_placeholders(broker: Broker) -> None:
    text = broker.conf.read_text()
    assert "@" not in "".join(line for line in text.splitlines() if not line.startswith("#"))
    assert f"listener {broker.port} 127.0.0.1" in text
    assert "autosave_on_changes true" in text
    assert "max_packet_size" in text


def test_missing_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SETPOINT_MOSQUITTO", raising=False)
    monkeypatch.setattr(harness.shutil, "which", lambda name: None)
    monkeypatch.setattr(harness, "SEARCH_PATH", ())
    with pytest.raises(BrokerNotInstalled, match="apt-get install -y mosquitto"):
        harness.find_mosquitto()


def test_a_bad_configuration_fails_with_the_brokers_words(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "bad")
    broker.conf.write_text(broker.conf.read_text() + "\nno_such_option 1\n")
    with pytest.raises(harness.BrokerError, match="exited at start"):
        broker.start()


def test_unfilled_placeholder_is_an_error() -> None:
    with pytest.raises(harness.BrokerError, match="unfilled"):
        harness.render("listener @PORT@\nlog @NOPE@\n", {"PORT": 1})


def test_mqtt5_properties_pass_through(broker: Broker, unique_prefix: str) -> None:
    """Message expiry (used for events) is honoured by this broker build."""
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 60
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        info = client.publish(f"{unique_prefix}/x", b"y", qos=1, retain=True, properties=props)
        info.wait_for_publish(TIMEOUT)
    finally:
        client.disconnect()
        client.loop_stop()
    assert read_retained(broker, f"{unique_prefix}/x") == b"y"


def test_the_large_fleet_configuration_saves_within_a_second_and_on_a_clean_stop(
    tmp_path: Path, unique_prefix: str
) -> None:
    topic = f"{unique_prefix}/groups/kiosks/desired"
    with Broker(tmp_path / "large", template="large-fleet.conf") as broker:
        assert "autosave_on_changes false" in broker.conf.read_text()
        publish_retained(broker, topic, b"saved-by-the-timer")
        # Saved by the one-second timer, not by the change: wait for it, then pull the plug.
        wait_until(lambda: broker.db.exists() and b"saved-by-the-timer" in broker.db.read_bytes())
        broker.kill()
        broker.start()
        assert read_retained(broker, topic) == b"saved-by-the-timer"
        publish_retained(broker, topic, b"saved-at-the-stop")
        broker.restart()  # SIGTERM: mosquitto saves before it exits
        assert read_retained(broker, topic) == b"saved-at-the-stop"
