"""The kit's MQTT connection: publish as the controller would, and collect what one device says.

One paho-mqtt client on MQTT 3.1.1 (every agent must work there), clean session, its own
client id. It subscribes to the device's ``reported`` and ``presence`` topics only, under
every report shard, and keeps every message it receives, in order, so a check can wait for
the first report (after a mark) that satisfies it; what arrives under a shard that is not
the device's own (SPEC 3.1) is kept apart (``wrong_shard``), not counted as said. Reports
are kept as bytes plus their decoded form, or the error that decoding gave: judging them is
:mod:`running`'s job.

paho's exceptions stop here (:class:`KitError`).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from setpoint.proto import reports
from setpoint.proto.errors import ProtocolError, WrongShardError
from setpoint.proto.reports import Report
from setpoint.proto.topics import Topics

CONNECT_TIMEOUT: Final = 15.0


class KitError(Exception):
    """The kit cannot run (broker unreachable, bad key, bad options); exit status 2."""


@dataclass(frozen=True, slots=True)
class Broker:
    """Where the device's broker is; the password is never part of a repr."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Broker({self.url})"


@dataclass(frozen=True, slots=True)
class Received:
    """One report as it arrived: its bytes, and its decoded form or why it did not decode."""

    raw: bytes
    report: Report | None
    error: str | None
    retained: bool


class Wire:
    """The kit's side of the broker for one device."""

    def __init__(self, broker: Broker, topics: Topics, device: str) -> None:
        self.topics = topics
        self.device = device
        self._broker = broker
        self._cond = threading.Condition()
        self.reports: list[Received] = []
        self.presence: list[bytes] = []
        self.presence_retained: list[bool] = []
        self.wrong_shard: list[str] = []  # topics of messages under another shard
        self._planted: set[bytes] = set()  # reports the kit itself published (stale copies)
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"setpoint-conformance-{secrets.token_hex(4)}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
        )
        if broker.username is not None:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            self._client.tls_set(ca_certs=broker.ca, certfile=broker.cert, keyfile=broker.key)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_a: self._subscribed.set()
        self._client.on_message = self._on_message

    # Life cycle.

    def start(self) -> None:
        try:
            self._client.connect(self._broker.host, self._broker.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise KitError(f"broker {self._broker.url}: cannot connect: {exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT) or self._refused:
            self.stop()
            raise KitError(f"broker {self._broker.url}: {self._refused or 'no answer to CONNECT'}")
        self._client.subscribe([(f, 1) for f in self.topics.device_any_shard(self.device)])
        if not self._subscribed.wait(CONNECT_TIMEOUT):
            self.stop()
            raise KitError(f"broker {self._broker.url}: no answer to SUBSCRIBE")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        if reason.is_failure:
            self._refused = f"connection refused ({reason})"
        self._connected.set()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        with self._cond:
            try:
                self.topics.parse(message.topic)
            except WrongShardError:
                self.wrong_shard.append(message.topic)
                self._cond.notify_all()
                return
            if message.topic == self.topics.device_presence(self.device):
                self.presence.append(payload)
                self.presence_retained.append(bool(message.retain))
            elif payload:
                retained = bool(message.retain)
                try:
                    received = Received(payload, reports.decode(payload), None, retained)
                except ProtocolError as exc:
                    received = Received(payload, None, str(exc), retained)
                self.reports.append(received)
            self._cond.notify_all()

    # Publishing.

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        try:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            info.wait_for_publish(CONNECT_TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            raise KitError(f"publish to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise KitError(f"publish to {topic} was not acknowledged by the broker")

    def plant(self, topic: str, report: bytes) -> None:
        """Publish a report on the device's topic, retained (not the device's own: the
        checks of every report leave it out)."""
        with self._cond:
            self._planted.add(report)
        self.publish(topic, report, retain=True)

    def planted(self, raw: bytes) -> bool:
        with self._cond:
            return raw in self._planted

    def seqs(self) -> list[int]:
        """The seq of every report of the device seen so far."""
        with self._cond:
            return [r.report.seq for r in self.reports if r.report is not None]

    # Waiting.

    def mark(self) -> int:
        """A position in the report stream: later waits look only at reports after it."""
        with self._cond:
            return len(self.reports)

    def wait_report(
        self, check: Callable[[Report], bool], *, since: int, timeout: float
    ) -> Report | None:
        """The first decoded report at or after ``since`` for which ``check`` holds."""
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                while index < len(self.reports):
                    report = self.reports[index].report
                    index += 1
                    if report is not None and check(report):
                        return report
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def resubscribe(self) -> None:
        """Subscribe again: the broker resends the retained report and presence."""
        wanted = self.topics.device_any_shard(self.device)
        self._client.unsubscribe(wanted)
        self._client.subscribe([(topic, 1) for topic in wanted])

    def presence_mark(self) -> int:
        with self._cond:
            return len(self.presence)

    def wait_retained_presence(self, since: int, timeout: float) -> bytes | None:
        """The first presence flagged retained at or after ``since``, if one comes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for payload, kept in zip(
                    self.presence[since:], self.presence_retained[since:], strict=True
                ):
                    if kept:
                        return payload
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def wait_retained(self, since: int, timeout: float) -> bool:
        """Has a report flagged retained arrived at or after ``since`` (within ``timeout``)?"""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(r.retained for r in self.reports[since:]):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_presence_after(self, since: int, first: bytes, then: bytes, timeout: float) -> bool:
        """Has ``first`` arrived at or after ``since``, and ``then`` after it?"""

        def seen() -> bool:
            tail = self.presence[since:]
            return first in tail and then in tail[tail.index(first) + 1 :]

        deadline = time.monotonic() + timeout
        with self._cond:
            while not seen():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_presence(self, value: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.presence or self.presence[-1] != value:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def latest(self) -> Report | None:
        with self._cond:
            for received in reversed(self.reports):
                if received.report is not None:
                    return received.report
        return None

    def strays(self) -> list[str]:
        """The topics of everything that came under a shard not the device's own."""
        with self._cond:
            return list(self.wrong_shard)

    def received(self) -> list[Received]:
        with self._cond:
            return list(self.reports)
