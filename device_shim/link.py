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
* **Several nodes.** ``--broker`` may list the nodes of one cluster (the
  :class:`setpoint.kit.brokers.BrokerSettings`' ``others``, tried after the first node:
  ``endpoints``). A failed connection, a refused CONNACK, a connection that dropped
  before it had stayed up ``STABLE_AFTER`` seconds, or a CONNACK that has not
  come within ``connect_timeout`` (15 s, above a clustered engine's election stall: NATS
  held CONNACKs for ~11 s after a node died) moves the link to the next node. The backoff
  exponent grows once per round of the list, so the other nodes are tried quickly and a
  cluster down altogether is not hammered. A connection that had stayed up and then
  dropped is tried again on the same node first. Every such log line names the node and the
  cause.
* **Nodes found in DNS.** With ``--broker mqtt+srv://DOMAIN`` the nodes are those its SRV
  records gave at start (:attr:`BrokerSettings.discovery`); when every node of the list has
  failed in a row the link asks DNS again (a cluster's membership changes), not on every
  reconnect. A failed lookup is logged and the nodes it had are kept.
* **Refused subscriptions are retried.** A SUBACK failure code (``0x87`` not authorized,
  ``0x80`` unspecified: what MQTT 3.1.1 always sends, and what NATS sends while it cannot
  create the subscription's consumer yet) is logged with its cause, and the refused topics
  are subscribed again with backoff (``resubscribe``) on the same connection; what the
  agent already has stays applied meanwhile.
* **Clean start, then resubscribe.** Every connection starts clean and subscribes to the
  current topic set; retained bundles then arrive again, which is all the agent needs to
  converge (it is level-triggered).
* **Presence.** ``offline`` (retained, QoS 1) is the will; ``online`` (retained) is published
  on every connect; :meth:`Link.stop` publishes ``offline`` itself before disconnecting.
* **The device's own topics, watched.** The ``watch`` topics (the device's presence and
  reported topics) are subscribed at QoS 0 on every connection, before ``online`` is
  published (on NATS each QoS 1 subscription is a replicated consumer); a retained copy
  the broker sends in answer to that SUBSCRIBE is from before the connection and is
  dropped, live messages go to the agent (``restating.py`` says what it does with them).
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
  the packet and wakes the loop, which writes it. Everything the link does of its own
  (connect, the CONNACK timeout, subscribing again after a refusal) runs in that thread,
  between two ``loop()`` calls; no timer thread touches paho.
* **No lock held across paho.** The link's lock guards its own bookkeeping only: no thread
  calls paho while holding it (paho runs callbacks under locks of its own, and a callback
  takes the link's lock: holding it around ``subscribe`` deadlocked a shim once). A SUBACK
  can therefore arrive before the subscribing thread has recorded its message id; it is
  kept until the id is recorded.

paho's exceptions stop here: connection errors are logged and retried, publish errors
become a False return.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from setpoint.kit import brokers
from setpoint.kit.brokers import BrokerSettings
from setpoint.proto import reports

from .backoff import Backoff, Random

log = logging.getLogger("setpoint.shim.link")

STABLE_AFTER: Final = 30.0
DEFAULT_BACKOFF: Final = Backoff(1.0, 30.0)
RESUBSCRIBE_BACKOFF: Final = Backoff(1.0, 30.0)
# Above a clustered engine's election stall: NATS held CONNACKs for ~11 s after a node died.
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
        watch: Iterable[str] = (),
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
        self._watch = frozenset(watch)  # subscribed at QoS 0, live messages only
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
        self._connect_timeout = connect_timeout
        self._resubscribe = resubscribe
        # The nodes to try (network thread): broker.endpoints, or what DNS gave last.
        self._endpoints: tuple[tuple[str, int], ...] = broker.endpoints
        self._endpoint = 0  # index into _endpoints of the node in use (network thread)
        # Set by the network thread for the connection in progress: its CONNACK, why it
        # failed or ended (for the log), and whether it ended in a protocol fallback.
        self._connack: Any = None
        self._failure: str | None = None
        self._fallback = False
        # SUBACK bookkeeping, under the lock: SUBSCRIBE mid -> its topics, SUBACKs that
        # arrived before their mid was recorded, topics refused on this connection, refusals
        # in a row, and when the refused topics are next subscribed again.
        self._pending: dict[int, list[str]] = {}
        self._early: dict[int, list[Any]] = {}
        self._refused: set[str] = set()
        self._refusals = 0
        self._resubscribe_at: float | None = None
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
        client.connect_timeout = self._connect_timeout  # TCP connect and TLS handshake
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

    @property
    def current_url(self) -> str:
        """The URL of the node in use (or tried next)."""
        return self._broker.url_of(*self._endpoints[self._endpoint])

    def rotation_delay(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (counted since the last stable
        connection): the backoff exponent grows once per round of the node list, so the
        other nodes are tried quickly and a cluster down altogether is not hammered."""
        rounds = attempt // len(self._endpoints)
        return self._backoff.delay(rounds, self._rng)

    def _rotate(self, failures: int = 0) -> None:
        """Move to the next node; when ``failures`` in a row make whole rounds of a list
        found in DNS, ask DNS again first."""
        self._endpoint = (self._endpoint + 1) % len(self._endpoints)
        if self._broker.discovery and failures and failures % len(self._endpoints) == 0:
            self.rediscover()

    def rediscover(self) -> None:
        """Ask DNS for the nodes again (every node failed); keep the old ones if it fails."""
        try:
            entries = brokers.parse_broker_list(self._broker.discovery)
            nodes = tuple(
                (node.host, node.port) for node in brokers.resolve_brokers(entries, self._rng)
            )
        except brokers.BrokerURLError as exc:
            log.warning("every node failed; DNS gave no new list, keeping %s: %s",
                        self._broker.urls_of(self._endpoints), exc)  # fmt: skip
            return
        if not nodes:
            return
        if nodes != self._endpoints:
            was = self._broker.urls_of(self._endpoints)
            log.warning("every node failed; DNS now gives %s (was %s)",
                        self._broker.urls_of(nodes), was)  # fmt: skip
        self._endpoints = nodes
        self._endpoint = 0

    def _run(self) -> None:
        attempt = 0  # failed attempts since the last connection that stayed up
        while not self._stop.is_set():
            client = self._client  # _on_connect may replace it (protocol fallback)
            url = self.current_url
            host, port = self._endpoints[self._endpoint]
            self._connack = None
            self._failure = None
            self._fallback = False
            try:
                client.connect(
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
                self._rotate(attempt)
                log.warning(
                    "broker %s unreachable (%s); trying %s in %.1fs",
                    url, _cause(exc), self.current_url, delay,
                )  # fmt: skip
                self._stop.wait(delay)
                continue
            self._serve(client, url)
            self._mark_down()
            if self._stop.is_set():
                break
            stable = self._session_was_stable()
            if stable:
                attempt = 0
            elif not self._fallback:
                self._rotate(attempt + 1)  # refused, silent, dropped at once: the next node
            delay = self.last_delay = self.rotation_delay(attempt)
            attempt += 1
            log.warning(
                "%s; %s %s in %.1fs",
                self._failure or f"disconnected from {url}",
                "reconnecting to" if self.current_url == url else "trying",
                self.current_url,
                delay,
            )
            self._stop.wait(delay)

    def _serve(self, client: mqtt.Client, url: str) -> None:
        """Run paho's network loop on this thread until the connection ends.

        Between two ``loop()`` calls: give up on a CONNACK that has not come within
        ``connect_timeout``, subscribe again to refused topics when their retry is due, and
        leave a few seconds after :meth:`stop` for ``offline`` and DISCONNECT (which
        :meth:`stop` queues) to go out.
        """
        connect_by = time.monotonic() + self._connect_timeout
        stop_by: float | None = None
        while True:
            now = time.monotonic()
            tick = 1.0
            if self._connack is None:
                tick = min(tick, max(0.0, connect_by - now))
            with self._lock:
                if self._resubscribe_at is not None:
                    tick = min(tick, max(0.0, self._resubscribe_at - now))
            try:
                rc = client.loop(timeout=tick)
            except (OSError, ValueError) as exc:  # pragma: no cover - paho handles most
                self._failure = f"connection to {url} failed ({_cause(exc)})"
                return
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                if self._failure is None and self._connack is None:
                    self._failure = f"broker {url} closed the connection before its CONNACK"
                return
            now = time.monotonic()
            if self._stop.is_set():
                stop_by = now + 5.0 if stop_by is None else stop_by
                if not self._connected:
                    _close(client)  # still waiting for a CONNACK: nothing to say first
                    return
                if now >= stop_by:
                    return
            if self._connack is None and now >= connect_by:
                self._failure = (
                    f"broker {url} accepted the connection but sent no CONNACK within"
                    f" {self._connect_timeout:g}s (a clustered engine electing leaders, or a"
                    " stuck node)"
                )
                _close(client)
                return
            self._resubscribe_if_due(client, url)

    def _session_was_stable(self) -> bool:
        """Whether the connection that just ended had stayed up ``stable_after`` seconds
        (read once: the next failure is not excused by an old session)."""
        with self._lock:
            up_since, self._up_since = self._up_since, None
        return up_since is not None and self._clock() - up_since >= self._stable_after

    def attempt_after_session(self, attempt: int) -> int:
        """The backoff attempt to use after a connection ended: back to 0 when the
        connection had stayed up ``stable_after`` seconds, else ``attempt`` (a broker that
        accepts and drops at once keeps backing off)."""
        return 0 if self._session_was_stable() else attempt

    def _mark_down(self) -> None:
        with self._lock:
            was = self._connected
            self._connected = False
            self._subscribed.clear()
            self._outstanding.clear()
            self._pending.clear()
            self._early.clear()
            self._refused.clear()
            self._refusals = 0
            self._resubscribe_at = None
        if was:
            self._on_connection(False)

    # Subscriptions and their SUBACKs. paho is called with no lock of the link held; the
    # SUBACK (network thread) and the mid of its SUBSCRIBE (the calling thread, once paho
    # returns it) meet under the lock, whichever comes first.

    def _subscribe(self, client: mqtt.Client, topics: list[str]) -> None:
        rc, mid = client.subscribe([(t, 0 if t in self._watch else 1) for t in topics])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # not connected: the next connection subscribes to everything
        with self._lock:
            reasons = self._early.pop(mid, None)
            if reasons is None:
                self._pending[mid] = topics
                return
            refused, delay = self._note_suback(topics, reasons)
        self._log_refused(refused, delay)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        with self._lock:
            topics = self._pending.pop(mid, None)
            if topics is None:  # the SUBACK beat paho's return to the subscribing thread
                self._early[mid] = list(reasons)
                return
            refused, delay = self._note_suback(topics, reasons)
        self._log_refused(refused, delay)

    def _note_suback(self, topics: list[str], reasons: list[Any]) -> tuple[list[Any], float]:
        """Record a SUBACK (the lock held): the refused topics and their retry delay."""
        refused = [
            (topic, reason)
            for topic, reason in zip(topics, reasons, strict=False)
            if getattr(reason, "is_failure", False)
        ]
        if not refused:
            if not self._refused:
                self._refusals = 0
            return [], 0.0
        self._refused.update(topic for topic, _ in refused)
        now = time.monotonic()
        if self._resubscribe_at is None:
            delay = self._resubscribe.delay(self._refusals, self._rng)
            self._refusals += 1
            self._resubscribe_at = now + delay
        return refused, max(0.0, self._resubscribe_at - now)

    def _log_refused(self, refused: list[Any], delay: float) -> None:
        for topic, reason in refused:
            log.warning(
                "broker %s refused the subscription to %s: %s; retrying in %.1fs on the same"
                " connection",
                self.current_url, topic, _suback_cause(reason, self._protocol), delay,
            )  # fmt: skip

    def _resubscribe_if_due(self, client: mqtt.Client, url: str) -> None:
        with self._lock:
            due = self._resubscribe_at is not None and time.monotonic() >= self._resubscribe_at
            if not due or not self._connected:
                return
            self._resubscribe_at = None
            topics = sorted(self._refused & (self._wanted | self._watch))
            self._refused.clear()
        if topics:
            log.info("subscribing again on %s to %s", url, ", ".join(topics))
            self._subscribe(client, topics)

    # paho callbacks (network thread).

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._connack = reason
        if reason.is_failure:
            value = getattr(reason, "value", None)
            if value in _BAD_PROTOCOL and self._protocol == MQTTProtocolVersion.MQTTv5:
                log.warning(
                    "broker %s does not speak MQTT 5; falling back to 3.1.1", self.current_url
                )
                self._protocol = MQTTProtocolVersion.MQTTv311
                self._client = self._make_client()
                self._fallback = True
            self._failure = f"broker {self.current_url} refused the connection: {reason}"
            return
        self.connects += 1
        with self._lock:
            self._connected = True
            self._up_since = self._clock()
            wanted = sorted(self._wanted)
            self._subscribed = set(wanted)
        if wanted or self._watch:
            self._subscribe(client, [*wanted, *sorted(self._watch - self._subscribed)])
        client.publish(self._presence, reports.PRESENCE_ONLINE, qos=1, retain=True)
        log.info("connected to %s", self.current_url)
        self._on_connection(True)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        log.debug("disconnect: %s", reason)
        if self._connected and self._failure is None:
            with self._lock:
                up_since = self._up_since
            lasted = self._clock() - up_since if up_since is not None else 0.0
            if getattr(flags, "is_disconnect_packet_from_server", False):
                cause = f"the broker sent DISCONNECT: {reason}"
            else:  # paho says only "Unspecified error" for a socket that closed or failed
                cause = "the socket closed without a DISCONNECT: the node stopped, or the network"
            self._failure = f"connection to {self.current_url} lost after {lasted:.1f}s ({cause})"
        self._mark_down()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.retain and message.topic in self._watch:
            return  # the broker's copy from before this connection (see the docstring)
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


def _loop_thread_writes(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's "the socket has something to write" hook: nothing to do, the loop thread
    selects on the socket for writing whenever paho has packets queued."""


def _close(client: mqtt.Client) -> None:
    """End a connection that never got its CONNACK, from the network thread: DISCONNECT is
    queued and written by ``loop()``, which then closes the socket."""
    with contextlib.suppress(OSError, ValueError):
        client.disconnect()
        for _ in range(3):
            if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return


def _cause(exc: BaseException) -> str:
    """An exception as a log line's cause: ``ConnectionRefusedError: [Errno 111] ...``."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _suback_cause(reason: Any, protocol: MQTTProtocolVersion) -> str:
    """Why a subscription was refused, as far as the SUBACK tells."""
    value = getattr(reason, "value", 0x80)
    if protocol != MQTTProtocolVersion.MQTTv5:
        return (
            f"SUBACK 0x{value:02x}: MQTT 3.1.1 carries no cause (the broker's ACL forbids the"
            " topic, or a clustered engine cannot create the subscription yet)"
        )
    hint = _SUBACK_HINTS.get(value, "")
    return f"{reason} (0x{value:02x}){': ' + hint if hint else ''}"


_SUBACK_HINTS: Final = {
    0x80: "a clustered engine that cannot create the subscription yet, or a broker fault",
    0x87: "the broker's ACL does not let this client read the topic",
    0x8F: "the broker does not accept this topic filter",
    0x97: "the broker's quota is exceeded",
}
