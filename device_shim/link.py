"""The shim's MQTT link: one paho-mqtt 2.x client in a thread of its own.

The link connects, subscribes, publishes and reconnects; it knows nothing of bundles. It
hands every message to a callback (which only queues it and wakes the agent) and tells the
agent when the connection comes and goes.

* **Reconnect with backoff and jitter.** paho's own reconnect loop is switched off
  (``reconnect_on_failure=False``): after a lost or failed connection the thread waits
  :class:`~setpoint.device_shim.backoff.Backoff` delays (exponential, equal jitter), so a
  thousand devices that lose the broker together do not come back together. The attempt
  counter resets after a connection stayed up for ``STABLE_AFTER`` seconds (a broker
  restart costs the first delay again, not a longer one each time), so only a broker that
  accepts and drops at once keeps the delays growing.
* **Clean start, then resubscribe.** Every connection starts clean and subscribes to the
  current topic set; retained bundles then arrive again, which is all the agent needs to
  converge (it is level-triggered).
* **Presence.** ``offline`` (retained, QoS 1) is the will; ``online`` (retained) is published
  on every connect; :meth:`Link.stop` publishes ``offline`` itself before disconnecting.
* **Bounded publishes.** At most ``max_queued`` QoS 1 messages are outstanding (paho stalls
  at 65,535): :meth:`Link.publish` returns False when the cap is reached or the link is down,
  and the agent publishes its newest report later (reports are state: only the last counts).
* **MQTT 5, or 3.1.1.** The link speaks MQTT 5 and falls back to 3.1.1 for good when the
  broker refuses the protocol version.
* **One thread on the socket.** Only the link's thread reads or writes the socket. paho
  writes a packet from the *calling* thread when no loop thread of its own is registered
  (``loop_start``), and two threads on one TLS connection corrupt OpenSSL's state (seen as
  heap corruption in a shim under mutual TLS). So the link drives paho with ``loop()``
  (which gives it the wake-up socket pair) and registers a no-op
  ``on_socket_register_write``: a publish or subscribe from the agent's thread only queues
  the packet and wakes the loop, which writes it.

paho's exceptions stop here: connection errors are logged and retried, publish errors
become a False return.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from setpoint.proto import reports

from .backoff import Backoff, Random
from .config import BrokerSettings

log = logging.getLogger("setpoint.shim.link")

STABLE_AFTER: Final = 30.0
DEFAULT_BACKOFF: Final = Backoff(1.0, 120.0)
_BAD_PROTOCOL: Final = (0x84, 1)  # MQTT 5 "unsupported protocol version"; 3.1.1 CONNACK 1


class Link:
    """A reconnecting MQTT connection for one device."""

    def __init__(
        self,
        broker: BrokerSettings,
        *,
        client_id: str,
        presence_topic: str,
        on_message: Callable[[str, bytes], None],
        on_connection: Callable[[bool], None],
        keepalive: int = 60,
        backoff: Backoff = DEFAULT_BACKOFF,
        max_queued: int = 16,
        rng: Random | None = None,
        mqtt311: bool = False,
        stable_after: float = STABLE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = broker
        self._client_id = client_id
        self._presence = presence_topic
        self._on_message_cb = on_message
        self._on_connection = on_connection
        self._keepalive = keepalive
        self._backoff = backoff
        self._max_queued = max_queued
        self._rng: Random = rng or random.Random()
        self._protocol = MQTTProtocolVersion.MQTTv311 if mqtt311 else MQTTProtocolVersion.MQTTv5
        self._lock = threading.Lock()
        self._wanted: set[str] = set()
        self._subscribed: set[str] = set()
        self._outstanding: list[mqtt.MQTTMessageInfo] = []
        self._connected = False
        # When the current (or last) connection came up: set on CONNACK, read and cleared
        # only by the network loop, which decides the backoff after the connection ends
        # (the disconnect callback runs first and must not erase it).
        self._up_since: float | None = None
        self._stable_after = stable_after
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = self._make_client()
        self.connects = 0  # successful connections so far (tests, logs)
        self.last_delay: float | None = None  # the last reconnect delay chosen (tests, logs)

    # Set up.

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=self._protocol,
            reconnect_on_failure=False,
        )
        client.max_queued_messages_set(self._max_queued)
        client.max_inflight_messages_set(min(self._max_queued, 8))
        client.will_set(self._presence, reports.PRESENCE_OFFLINE, qos=1, retain=True)
        if self._broker.username is not None:
            client.username_pw_set(self._broker.username, self._broker.password)
        if self._broker.tls:
            client.tls_set(
                ca_certs=self._broker.ca, certfile=self._broker.cert, keyfile=self._broker.key
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        # The loop thread writes; other threads only queue (see the module's docstring).
        client.on_socket_register_write = _loop_thread_writes
        return client

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="setpoint-link", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Publish ``offline``, disconnect cleanly, and end the thread."""
        self._stop.set()
        if self._connected:
            try:
                info = self._client.publish(
                    self._presence, reports.PRESENCE_OFFLINE, qos=1, retain=True
                )
                info.wait_for_publish(timeout)
            except (ValueError, RuntimeError, OSError) as exc:
                log.debug("offline presence not confirmed: %s", exc)
        try:
            self._client.disconnect()
        except (ValueError, OSError) as exc:  # pragma: no cover - best effort
            log.debug("disconnect: %s", exc)
        if self._thread is not None:
            self._thread.join(timeout)

    # The network thread.

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            client = self._client  # _on_connect may replace it (protocol fallback)
            try:
                client.connect(
                    self._broker.host,
                    self._broker.port,
                    self._keepalive,
                    clean_start=True
                    if self._protocol == MQTTProtocolVersion.MQTTv5
                    else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                )
            except (OSError, ValueError) as exc:
                delay = self.last_delay = self._backoff.delay(attempt, self._rng)
                attempt += 1
                log.info(
                    "broker %s unreachable (%s); retrying in %.1fs", self._broker.url, exc, delay
                )
                self._stop.wait(delay)
                continue
            try:
                self._drive(client)
            except (OSError, ValueError) as exc:  # pragma: no cover - paho handles most
                log.info("connection to %s failed: %s", self._broker.url, exc)
            self._mark_down()
            if self._stop.is_set():
                break
            attempt = self.attempt_after_session(attempt)
            delay = self.last_delay = self._backoff.delay(attempt, self._rng)
            attempt += 1
            log.info("disconnected from %s; reconnecting in %.1fs", self._broker.url, delay)
            self._stop.wait(delay)

    @staticmethod
    def _drive(client: mqtt.Client) -> None:
        """Run paho's network loop on this thread until the connection ends."""
        while client.loop(timeout=1.0) == MQTTErrorCode.MQTT_ERR_SUCCESS:
            pass

    def attempt_after_session(self, attempt: int) -> int:
        """The backoff attempt to use after a connection ended: back to 0 when the
        connection had stayed up ``stable_after`` seconds, else ``attempt`` (a broker that
        accepts and drops at once keeps backing off)."""
        with self._lock:
            up_since, self._up_since = self._up_since, None
        if up_since is not None and self._clock() - up_since >= self._stable_after:
            return 0
        return attempt

    def _mark_down(self) -> None:
        with self._lock:
            was = self._connected
            self._connected = False
            self._subscribed.clear()
            self._outstanding.clear()
        if was:
            self._on_connection(False)

    # paho callbacks (network thread).

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            value = getattr(reason, "value", None)
            if value in _BAD_PROTOCOL and self._protocol == MQTTProtocolVersion.MQTTv5:
                log.warning("broker does not speak MQTT 5; falling back to 3.1.1")
                self._protocol = MQTTProtocolVersion.MQTTv311
                self._client = self._make_client()
            else:
                log.warning("broker %s refused the connection: %s", self._broker.url, reason)
            return
        self.connects += 1
        with self._lock:
            self._connected = True
            self._up_since = self._clock()
            wanted = sorted(self._wanted)
            self._subscribed = set(wanted)
        if wanted:
            client.subscribe([(topic, 1) for topic in wanted])
        client.publish(self._presence, reports.PRESENCE_ONLINE, qos=1, retain=True)
        log.info("connected to %s", self._broker.url)
        self._on_connection(True)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        log.debug("disconnect: %s", reason)
        self._mark_down()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._on_message_cb(message.topic, bytes(message.payload))

    # Used by the agent (its own thread).

    def subscribe_to(self, topics: Iterable[str]) -> None:
        """Make ``topics`` the subscription set (now if connected, else on connect)."""
        wanted = set(topics)
        with self._lock:
            self._wanted = wanted
            if not self._connected:
                return
            add = sorted(wanted - self._subscribed)
            remove = sorted(self._subscribed - wanted)
            self._subscribed = set(wanted)
        try:
            if remove:
                self._client.unsubscribe(remove)
            if add:
                self._client.subscribe([(topic, 1) for topic in add])
        except (ValueError, OSError) as exc:
            log.info("subscription change failed (%s); redone on reconnect", exc)

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> bool:
        """Publish at QoS 1; False if the link is down or too many are outstanding."""
        with self._lock:
            self._outstanding = [i for i in self._outstanding if not i.is_published()]
            if not self._connected or len(self._outstanding) >= self._max_queued:
                return False
        try:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
        except (ValueError, OSError) as exc:
            log.warning("publish to %s failed: %s", topic, exc)
            return False
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        with self._lock:
            self._outstanding.append(info)
        return True

    @property
    def outstanding(self) -> int:
        with self._lock:
            return sum(1 for i in self._outstanding if not i.is_published())


def _loop_thread_writes(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's "the socket has something to write" hook: nothing to do, the loop thread
    selects on the socket for writing whenever paho has packets queued."""
