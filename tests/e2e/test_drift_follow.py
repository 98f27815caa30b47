"""``setpoint drift --follow`` keeps a persistent session: a broker outage loses no event.

The real command runs in a subprocess against a real mosquitto. To publish an event while
the follower is certainly disconnected, the broker's database (with the follower's
session in it) is moved to a second mosquitto on another port, the event is published
there, and the database is moved back: no race with the follower's reconnect timer.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.mosquitto import Broker
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker
TIMEOUT = 60.0


class Lines:
    """The lines a stream produces, read by a thread, waited for with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line with {text!r} in {timeout:g}s; saw {self.seen}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return line


def publish(host: str, port: int, topic: str, payload: bytes) -> None:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def drift_event(device: str) -> bytes:
    return json.dumps(
        {"type": "drift", "time": time.time(), "device": device, "group": "kiosks",
         "change": "opened", "previous": "in_sync", "state": "drifted", "resources": []}
    ).encode()  # fmt: skip


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")  # no operator config file of ours
    return env


@pytest.fixture
def follower(broker: Broker, unique_prefix: str, tmp_path: Path) -> Iterator[tuple[Lines, Lines]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "setpoint", "drift", "--follow", "--json",
         "--broker", broker.url, "--prefix", unique_prefix,
         "--client-id", f"test-follower-{tmp_path.name}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(tmp_path),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        err.wait_for("following drift events")
        yield out, err
    finally:
        proc.terminate()
        proc.wait(10)


def _settled(lines: Lines, broker: Broker, topic: str) -> None:
    """Publish until the follower prints one (its subscription is in place)."""
    publish(broker.host, broker.port, topic, drift_event("warm-up"))
    lines.wait_for('"warm-up"')


def test_events_published_while_disconnected_arrive_after_reconnect(
    broker: Broker, follower: tuple[Lines, Lines], unique_prefix: str, tmp_path: Path
) -> None:
    out, _err = follower
    topic = Topics(unique_prefix).event("drift")
    _settled(out, broker, topic)

    broker.stop()  # mosquitto saves the follower's session (subscription) on the way out
    elsewhere = Broker(tmp_path / "elsewhere")  # same data, another port: nobody follows
    shutil.copy(broker.db, elsewhere.db)
    with elsewhere:
        publish(elsewhere.host, elsewhere.port, topic, drift_event("kiosk-07"))
    shutil.copy(elsewhere.db, broker.db)  # the queued event goes back with the session
    broker.start()

    line = out.wait_for('"kiosk-07"')
    assert json.loads(line)["change"] == "opened"


@pytest.mark.parametrize(
    ("wipe", "said"),
    [
        (True, "reconnected, but the broker had no session for us: drift events since"),
        (False, "reconnected; the broker kept our session, no event was missed"),
    ],
)
def test_says_whether_events_may_have_been_missed(
    broker: Broker, follower: tuple[Lines, Lines], unique_prefix: str, wipe: bool, said: str
) -> None:
    out, err = follower
    _settled(out, broker, Topics(unique_prefix).event("drift"))
    broker.stop()
    err.wait_for("connection to the broker lost")
    if wipe:
        broker.wipe()  # the broker forgets every session
    broker.start()
    line = err.wait_for("reconnected")
    assert said in line
    assert ("may have been missed" in line) is wipe


def test_session_notice_wording() -> None:
    from setpoint.commands.drift import session_notice

    assert session_notice(1, False, None) is None  # a first, fresh session: nothing to say
    assert "queued while we were away" in str(session_notice(1, True, None))
    assert "may have been missed" in str(session_notice(3, False, 0.0))
    assert "lost" in str(session_notice(2, None, None))


def test_flapping_counts_recent_losses_only() -> None:
    from setpoint.commands.drift import FLAP_WINDOW, flapping

    assert not flapping([100.0, 101.0], 102.0)
    assert flapping([100.0, 101.0, 102.0], 102.0)
    assert not flapping([100.0, 101.0, 102.0], 101.0 + FLAP_WINDOW)


def test_two_followers_sharing_an_id_are_told_so(
    broker: Broker, follower: tuple[Lines, Lines], unique_prefix: str, tmp_path: Path
) -> None:
    _out, err = follower
    second = subprocess.Popen(
        [sys.executable, "-m", "setpoint", "drift", "--follow", "--broker", broker.url,
         "--prefix", unique_prefix, "--client-id", f"test-follower-{tmp_path.name}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=clean_env(tmp_path),
    )  # fmt: skip
    try:
        line = err.wait_for("the connection keeps dropping right after it opens")
        assert f"another client using our client id 'test-follower-{tmp_path.name}'" in line
    finally:
        second.terminate()
        second.wait(10)


def test_a_follower_of_its_own_ends_its_session_when_stopped(
    broker: Broker, unique_prefix: str, tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "setpoint", "drift", "--follow", "--broker", broker.url,
         "--prefix", unique_prefix],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env(tmp_path),
    )  # fmt: skip
    assert proc.stderr is not None
    first = proc.stderr.readline()
    client_id = first.split(" as ", 1)[1].split()[0]
    assert client_id.startswith("setpoint-drift-") and client_id.endswith(f"-{proc.pid}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    # The broker kept nothing for that id: a client taking it finds no session.
    present: list[bool] = []
    connected = threading.Event()
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
        protocol=mqtt.MQTTv5,
    )  # fmt: skip

    def on_connect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        present.append(bool(flags.session_present))
        connected.set()

    client.on_connect = on_connect
    client.connect(broker.host, broker.port, clean_start=False)
    client.loop_start()
    try:
        assert connected.wait(30)
        assert present == [False]
    finally:
        client.disconnect()
        client.loop_stop()


def test_event_lines_show_device_text_escaped() -> None:
    from setpoint.commands.drift import event_line

    event = {"time": 0.0, "device": "kiosk-01", "group": "kiosks", "change": "opened",
             "previous": "in_sync", "state": "drifted",
             "resources": [{"id": "motd", "why": "drifted: \x1b[2J\nwiped"}]}  # fmt: skip
    line = event_line(event, colour=False)
    assert "\x1b" not in line and "\n" not in line
    assert "motd: drifted: \\x1b[2J\\nwiped" in line
