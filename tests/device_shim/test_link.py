"""The link's reconnect backoff: it starts over after a connection that stayed up.

The unit tests drive the paho callbacks by hand with a fake clock; the broker test restarts
a real mosquitto several times and checks that every reconnect used the first delay
(the clock is faked there too, so "stayed up 30 s" costs no waiting).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from setpoint.device_shim.backoff import Backoff
from setpoint.device_shim.config import BrokerSettings
from setpoint.device_shim.link import STABLE_AFTER, Link
from setpoint.mosquitto import Broker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FixedRandom:
    def random(self) -> float:
        return 1.0  # the longest delay of each attempt: nominal


class Success:
    is_failure = False


class QuietClient:
    def subscribe(self, *args: Any, **kwargs: Any) -> None:
        pass

    def publish(self, *args: Any, **kwargs: Any) -> None:
        pass


def make_link(clock: FakeClock, port: int = 1, **kw: Any) -> Link:
    return Link(
        BrokerSettings("127.0.0.1", port),
        client_id="test-link",
        presence_topic="setpoint-test/link/presence",
        on_message=lambda topic, payload: None,
        on_connection=lambda up: None,
        clock=clock,
        **kw,
    )


def session(link: Link, clock: FakeClock, seconds: float) -> None:
    """A connection that comes up, lasts ``seconds`` and drops (paho's callbacks, in order)."""
    link._on_connect(QuietClient(), None, None, Success(), None)
    clock.advance(seconds)
    link._on_disconnect(QuietClient(), None, None, "gone", None)


def test_a_connection_that_stayed_up_resets_the_backoff() -> None:
    clock = FakeClock()
    link = make_link(clock)
    session(link, clock, STABLE_AFTER + 1)
    # The disconnect callback ran first; the loop's decision must still see the session.
    assert link.attempt_after_session(5) == 0


def test_a_connection_dropped_at_once_keeps_backing_off() -> None:
    clock = FakeClock()
    link = make_link(clock)
    session(link, clock, STABLE_AFTER - 1)
    assert link.attempt_after_session(5) == 5


def test_a_failed_connect_keeps_backing_off() -> None:
    clock = FakeClock()
    link = make_link(clock)
    session(link, clock, STABLE_AFTER + 1)
    assert link.attempt_after_session(3) == 0
    clock.advance(100)
    # No new session since: the next attempt is not reset by the old one.
    assert link.attempt_after_session(3) == 3


@pytest.mark.broker
def test_reconnect_stays_quick_after_several_broker_restarts(tmp_path: Path) -> None:
    clock = FakeClock()
    backoff = Backoff(0.2, 60.0)
    ups = threading.Semaphore(0)
    with Broker(tmp_path / "broker") as broker:
        link = Link(
            BrokerSettings(broker.host, broker.port),
            client_id="test-link-restarts",
            presence_topic="setpoint-test/link-restarts/presence",
            on_message=lambda topic, payload: None,
            on_connection=lambda up: ups.release() if up else None,
            backoff=backoff,
            rng=FixedRandom(),
            clock=clock,
        )
        link.start()
        try:
            assert ups.acquire(timeout=30), "the link never connected"
            delays = []
            for _ in range(5):
                clock.advance(STABLE_AFTER + 1)  # the connection has been up long enough
                broker.restart()
                assert ups.acquire(timeout=30), f"no reconnect: {broker.tail_log()}"
                delays.append(link.last_delay)
            # Each reconnect after a long-lived connection waits the first delay (0.2 s),
            # not 0.4, 0.8, 1.6, 3.2 s as the attempts pile up.
            assert delays == [backoff.nominal(0)] * 5, delays
        finally:
            link.stop()


@pytest.mark.broker
def test_only_the_link_thread_writes_to_the_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paho writes from the calling thread unless told otherwise; two threads on one TLS
    socket corrupted OpenSSL's memory in a shim. Publishes and subscription changes made
    from the agent's thread must be written by the link's thread, and still arrive."""
    import paho.mqtt.client as mqtt

    writers: set[str] = set()
    real_loop_write = mqtt.Client.loop_write

    def recording_loop_write(self: mqtt.Client) -> Any:
        writers.add(threading.current_thread().name)
        return real_loop_write(self)

    monkeypatch.setattr(mqtt.Client, "loop_write", recording_loop_write)
    ups = threading.Semaphore(0)
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        got.append(payload)
        if len(got) == 20:
            arrived.set()

    with Broker(tmp_path / "broker") as broker:
        link = Link(
            BrokerSettings(broker.host, broker.port),
            client_id="test-link-writer",
            presence_topic="setpoint-test/link-writer/presence",
            on_message=on_message,
            on_connection=lambda up: ups.release() if up else None,
        )
        link.start()
        try:
            assert ups.acquire(timeout=30), "the link never connected"
            link.subscribe_to(["setpoint-test/link-writer/echo"])
            sent = 0
            deadline = threading.Event()
            while sent < 20 and not deadline.wait(0.01):
                if link.publish("setpoint-test/link-writer/echo", b"%d" % sent, retain=False):
                    sent += 1
            assert arrived.wait(30), f"only {len(got)} of 20 came back"
        finally:
            link.stop()
    assert writers == {"setpoint-link"}, writers
