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
* **Several nodes.** With :attr:`BrokerSettings.alternates` (``--broker`` with a list), a
  failed or lost connection moves to the next node; the backoff exponent grows once per
  round of the list, so the first tries on the other nodes come quickly. A connection that
  gets no CONNACK within ``connect_timeout`` (above a clustered engine's election stall:
  NATS held CONNACKs for ~11 s after a node died, here) counts as failed.
* **Refusals are checked.** A CONNACK or SUBACK failure code is logged with its cause
  (``Not authorized``, ``Unspecified error``: an engine that cannot create the
  subscription yet) and retried with backoff: refused subscriptions are tried again on the
  same connection (``resubscribe`` delays), a refused connection on the next node.
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
DEFAULT_BACKOFF: Final = Backoff(1.0, 30.0)
RESUBSCRIBE_BACKOFF: Final = Backoff(0.5, 10.0)
CONNECT_TIMEOUT: Final = 15.0
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
        connect_timeout: float = CONNECT_TIMEOUT,
        resubscribe: Backoff = RESUBSCRIBE_BACKOFF,
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
        self._endpoint = 0  # index into broker.endpoints of the node in use
        self._connect_timeout = connect_timeout
        self._resubscribe = resubscribe
        self._pending: dict[int, list[str]] = {}  # SUBSCRIBE mid -> its topics
        self._refused: set[str] = set()  # topics a SUBACK refused on this connection
        self._refusals = 0  # SUBACK refusals in a row on this connection
        self._resubscribe_at: float | None = None
        self._refused_connect = False  # the last CONNACK was a failure
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
        client.on_subscribe = self._on_subscribe
        client.connect_timeout = self._connect_timeout
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

    @property
    def current_url(self) -> str:
        """The URL of the node in use (or tried next)."""
        return self._broker.url_of(*self._broker.endpoints[self._endpoint])

    def rotation_delay(self, attempt: int) -> float:
        """The wait before failed attempt number ``attempt`` is followed by the next: the
        backoff exponent grows once per round of the node list, so a dead node is left for
        the next one quickly, and a cluster that is down altogether is not hammered."""
        rounds = attempt // len(self._broker.endpoints)
        return self._backoff.delay(rounds, self._rng)

    def _rotate(self) -> None:
        self._endpoint = (self._endpoint + 1) % len(self._broker.endpoints)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            url = self.current_url
            host, port = self._broker.endpoints[self._endpoint]
            self._refused_connect = False
            try:
                self._client.connect(
                    host,
                    port,
                    self._keepalive,
                    clean_start=True
                    if self._protocol == MQTTProtocolVersion.MQTTv5
                    else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                )
            except (OSError, ValueError) as exc:
                delay = self.last_delay = self.rotation_delay(attempt)
                attempt += 1
                self._rotate()
                log.info(
                    "broker %s unreachable (%s); trying %s in %.1fs",
                    url, exc, self.current_url, delay,
                )  # fmt: skip
                self._stop.wait(delay)
                continue
            self._serve(url)
            self._mark_down()
            if self._stop.is_set():
                break
            attempt = self.attempt_after_session(attempt)
            if attempt > 0 or self._refused_connect:
                self._rotate()  # a node that refuses or drops at once: try the next
            delay = self.last_delay = self.rotation_delay(attempt)
            attempt += 1
            log.info(
                "disconnected from %s; reconnecting to %s in %.1fs", url, self.current_url, delay
            )
            self._stop.wait(delay)

    def _serve(self, url: str) -> None:
        """Run paho's network loop until the connection ends; give up on a CONNACK that
        does not come within ``connect_timeout``; resubscribe refused topics when due."""
        started = time.monotonic()
        while not self._stop.is_set():
            try:
                rc = self._client.loop(timeout=0.5)
            except (OSError, ValueError) as exc:  # pragma: no cover - paho handles most
                log.info("connection to %s failed: %s", url, exc)
                return
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if not self._connected and time.monotonic() - started > self._connect_timeout:
                log.warning(
                    "broker %s accepted TCP but sent no CONNACK within %.0fs; trying the next",
                    url, self._connect_timeout,
                )  # fmt: skip
                self._refused_connect = True
                self._client.disconnect()
                return
            self._resubscribe_if_due()

    def _resubscribe_if_due(self) -> None:
        with self._lock:
            due = self._resubscribe_at is not None and time.monotonic() >= self._resubscribe_at
            if not due or not self._connected:
                return
            self._resubscribe_at = None
            topics = sorted(self._refused & self._wanted)
            self._refused.clear()
        if topics:
            self._subscribe(self._client, topics)

    def _subscribe(self, client: mqtt.Client, topics: list[str]) -> None:
        # Held across the call: the SUBACK (handled in the network thread) must find the
        # topics of its mid even when the agent's thread subscribes.
        with self._lock:
            result = client.subscribe([(topic, 1) for topic in topics])
            mid = result[1] if result else None
            if mid is not None:
                self._pending[mid] = topics

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
            self._pending.clear()
            self._refused.clear()
            self._refusals = 0
            self._resubscribe_at = None
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
                self._refused_connect = True
                log.warning("broker %s refused the connection: %s", self.current_url, reason)
            return
        self.connects += 1
        with self._lock:
            self._connected = True
            self._up_since = self._clock()
            wanted = sorted(self._wanted)
            self._subscribed = set(wanted)
        if wanted:
            self._subscribe(client, wanted)
        client.publish(self._presence, reports.PRESENCE_ONLINE, qos=1, retain=True)
        log.info("connected to %s", self.current_url)
        self._on_connection(True)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        log.debug("disconnect: %s", reason)
        self._mark_down()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        with self._lock:
            topics = self._pending.pop(mid, [])
            refused = [
                (topic, reason)
                for topic, reason in zip(topics, reasons, strict=False)
                if getattr(reason, "is_failure", False)
            ]
            if not refused:
                if topics:
                    self._refusals = 0
                return
            self._refused.update(topic for topic, _ in refused)
            delay = self._resubscribe.delay(self._refusals, self._rng)
            self._refusals += 1
            self._resubscribe_at = time.monotonic() + delay
        for topic, reason in refused:
            log.warning(
                "broker %s refused the subscription to %s: %s (not authorized: check the"
                " broker's ACL; unspecified error: the engine could not create it yet);"
                " retrying in %.1fs",
                self.current_url, topic, reason, delay,
            )  # fmt: skip

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
                self._subscribe(self._client, add)
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
