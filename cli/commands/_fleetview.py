"""What the operator verbs (status, drift, diff, wait, rollout, promote, approve) share: a
paho reader of retained topics, on MQTT 5 or 3.1.1, over the nodes of ``--broker`` in turn.

:class:`Reader` connects with the usual broker flags, subscribes (QoS 0: a retained flood is
never cut by the broker's queue limit), and :meth:`Reader.snapshot` returns once a barrier
message it sent itself has come back, so every retained message has arrived: no guessing
with quiet periods. :meth:`Reader.follow` hands every later message to a callback. With a
:class:`Session` (``drift --follow``) the connection is persistent instead: no clean start,
a session expiry and QoS 1, so the broker queues what arrives while it reconnects.

Also small helpers for printing: colour only on a terminal, times, state colours.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from setpoint.kit.brokers import discovery_of
from setpoint.proto.status import ago
from setpoint.proto.topics import Topics

from ._common import BrokerURL, CommandError, brokers_from_args

__all__ = ["Reader", "ago", "clock", "paint", "state", "table", "use_colour"]

TIMEOUT = 10.0
STATE_COLOURS = {
    "in_sync": "32",
    "pending": "33",
    "drifted": "31",
    "failed": "31;1",
    "rejected": "35",
    "blocked": "36",
    "offline": "2",
    "unknown": "2",
}


@dataclass(frozen=True)
class Session:
    """A persistent MQTT session: the broker keeps the subscription and queues QoS 1
    messages for ``client_id`` while it is disconnected, up to ``expiry`` seconds."""

    client_id: str
    expiry: int


def session_client_id(role: str, args: argparse.Namespace) -> str:
    """A client id that stays the same for this process's life (so each reconnect finds
    the session again) and differs between processes (two followers on one host must not
    take each other's session): the user, host, broker and prefix, then the process id."""
    seed = "\0".join([getpass.getuser(), socket.gethostname(), str(args.broker), args.prefix])
    return f"setpoint-{role}-{hashlib.sha256(seed.encode()).hexdigest()[:8]}-{os.getpid()}"


PROTOCOLS = ("auto", "5", "3.1.1")
_REFUSED_VERSION = 132  # CONNACK "unsupported protocol version" (3.1.1's code 1, as paho maps it)


def add_protocol_argument(parser: argparse.ArgumentParser) -> None:
    """``--mqtt-version``, for the operator verbs that read through :class:`Reader`."""
    parser.add_argument(
        "--mqtt-version",
        choices=PROTOCOLS,
        default="auto",
        help="MQTT protocol: auto (default) tries 5, then 3.1.1 on an engine that refuses 5",
    )


class Reader:
    """One paho connection that reads retained topics, then (optionally) follows them.

    It tries each URL of ``--broker`` in turn, and on each MQTT 5 then 3.1.1
    (``--mqtt-version auto``; ``5`` or ``3.1.1`` try only that one). Nothing an operator
    verb needs is MQTT-5-only; a :class:`Session` degrades on 3.1.1: the session is kept by
    a clean-session-false connection, with no expiry the broker enforces (the broker's own
    limit applies), and ``close(end_session=True)`` ends it with a clean reconnect.

    With a :class:`Session` it connects without a clean start, subscribes at QoS 1 and
    calls ``on_session(connects, session_present)`` on every connection, and
    ``on_session(connects, None)`` when the connection is lost.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        filters: list[str],
        role: str,
        *,
        session: Session | None = None,
        on_session: Callable[[int, bool | None], None] | None = None,
        follow: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self._args = args
        self.topics = Topics(args.prefix)
        self.client_id = session.client_id if session else f"setpoint-{role}-{secrets.token_hex(4)}"
        self._barrier = self.topics.barrier(self.client_id)
        self._filters = filters
        self._qos = 1 if session else 0
        self._session = session
        self._on_session = on_session
        self.connects = 0
        self._cond = threading.Condition()
        self._marks: set[bytes] = set()
        # Set before connecting: a resumed session delivers its queue right after CONNACK.
        self._callback: Callable[[str, bytes], None] | None = follow
        self.messages: dict[str, bytes] = {}
        self._refused: str | None = None  # a SUBACK failure code, with its topic
        self.url: BrokerURL | None = None
        self.protocol = ""
        wanted = getattr(args, "mqtt_version", "auto")
        protocols = ["5", "3.1.1"] if wanted == "auto" else [wanted]
        failures: list[str] = []
        urls = brokers_from_args(args)
        for url in urls:
            for protocol in protocols:
                error = self._connect(url, protocol)
                if error is None:
                    return
                # One node: its URL is already at the head of the message (unless DNS
                # gave it).
                where = "" if len(urls) == 1 and not discovery_of(args.broker) else f"{url.url} "
                failures.append(f"{where}(MQTT {protocol}): {error}")
                if not error.startswith("Unsupported protocol version"):
                    break
        raise CommandError(
            f"cannot connect to {args.broker}: "
            + "; ".join(failures)
            + "; check that the broker runs there, and --broker, SETPOINT_BROKER or the"
            " context (setpoint config view)"
        )

    def _connect(self, url: BrokerURL, protocol: str) -> str | None:
        """One attempt: None once connected, else why not."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        v5 = protocol == "5"
        self._connected = threading.Event()
        self._error: str | None = None
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else self._session is None,
        )
        client.reconnect_delay_set(1, 10)
        properties = None
        if self._session is not None and v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._session.expiry
        client.on_disconnect = self._on_disconnect
        if url.username:
            client.username_pw_set(url.username, url.password)
        if url.tls:
            args = self._args
            client.tls_set(ca_certs=args.ca, certfile=args.cert, keyfile=args.client_key)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client
        try:
            if v5:
                client.connect(
                    url.host,
                    url.port,
                    keepalive=30,
                    clean_start=self._session is None,
                    properties=properties,
                )
            else:
                client.connect(url.host, url.port, keepalive=30)
        except OSError as exc:
            return str(exc)
        client.loop_start()
        if not self._connected.wait(TIMEOUT) or self._error:
            error = self._error or "timed out"
            client.loop_stop()
            client.disconnect()
            return error
        self.url = url
        self.protocol = protocol
        return None

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._error = str(reason)
        else:
            self.connects += 1
            qos = self._qos
            client.subscribe([(f, qos) for f in self._filters] + [(self._barrier, qos)])
            if self._on_session is not None:
                self._on_session(self.connects, bool(flags.session_present))
        self._connected.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self._on_session is not None and self._connected.is_set():
            self._on_session(self.connects, None)
        with self._cond:
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, reasons: Any, props: Any) -> None:
        refused = [
            f"{topic!r}: {reason}"
            for topic, reason in zip([*self._filters, self._barrier], reasons, strict=False)
            if reason.is_failure
        ]
        if refused:
            with self._cond:
                self._refused = "the broker refused the subscription to " + ", ".join(refused)
                self._cond.notify_all()

    @property
    def error(self) -> str | None:
        """Why the broker refused a (re)connection (then a follower must stop), or None."""
        return self._error

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        payload = bytes(message.payload)
        with self._cond:
            if message.topic == self._barrier:
                self._marks.add(payload)
            else:
                if payload:
                    self.messages[message.topic] = payload
                else:
                    self.messages.pop(message.topic, None)
                if self._callback is not None:
                    self._callback(message.topic, payload)
            self._cond.notify_all()

    def snapshot(self, timeout: float = TIMEOUT) -> dict[str, bytes]:
        """Every retained message under the filters, once they have all arrived."""
        mark = secrets.token_hex(8).encode()
        self._client.publish(self._barrier, mark, qos=1)
        with self._cond:
            arrived = self._cond.wait_for(lambda: mark in self._marks or self._refused, timeout)
            if self._refused:
                raise CommandError(f"{self._refused}; check the ACL, or try again later")
            if not arrived:
                raise CommandError(
                    "the broker did not echo our barrier message; check that this client may"
                    f" publish and subscribe to {self._barrier!r}"
                )
            return dict(self.messages)

    def follow(self, callback: Callable[[str, bytes], None]) -> None:
        with self._cond:
            self._callback = callback

    def wait_change(self, timeout: float | None) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def close(self, *, end_session: bool = False) -> None:
        """Disconnect; with ``end_session`` also tell the broker to drop our persistent
        session now instead of keeping it (and queueing for it) until it expires."""
        if end_session and self.protocol == "3.1.1":
            self._client.loop_stop()
            self._client.disconnect()
            self._end_session_311()
            return
        if end_session:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0
            self._client.disconnect(properties=properties)
            self._client.loop_stop()
            return
        self._client.loop_stop()
        self._client.disconnect()

    def _end_session_311(self) -> None:
        """MQTT 3.1.1 has no session expiry: connect once more with a clean session, which
        makes the broker drop the stored one, and leave."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        url = self.url
        if url is None:
            return
        done = threading.Event()
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        client.on_connect = lambda *_a: done.set()
        if url.username:
            client.username_pw_set(url.username, url.password)
        if url.tls:
            args = self._args
            client.tls_set(ca_certs=args.ca, certfile=args.cert, keyfile=args.client_key)
        try:
            client.connect(url.host, url.port, keepalive=30)
        except OSError:
            return  # the broker's own limit ends the session
        client.loop_start()
        done.wait(TIMEOUT)
        client.disconnect()
        client.loop_stop()


def printable(text: str) -> str:
    """``text`` with control characters escaped: repository and device text is shown, never
    obeyed (no terminal escape sequences from a commit message or a report)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def use_colour(args: argparse.Namespace) -> bool:
    no = getattr(args, "no_color", False) or os.environ.get("NO_COLOR")
    return sys.stdout.isatty() and not no


def paint(colour: bool, code: str, text: str) -> str:
    return f"\033[{code}m{text}\033[0m" if colour and code else text


def state(colour: bool, name: str, width: int = 0) -> str:
    return paint(colour, STATE_COLOURS.get(name, ""), name.ljust(width))


def clock(then: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(then)) + f".{int(then * 1000) % 1000:03d}"


def table(rows: list[list[str]], widths_from: list[list[str]] | None = None) -> list[str]:
    """Left-aligned columns (the widths ignore colour codes in ``widths_from``)."""
    plain = widths_from or rows
    if not rows:
        return []
    widths = [max(len(r[i]) for r in plain) for i in range(len(plain[0]))]
    return [
        "  ".join(
            cell + " " * (widths[i] - len(plain[n][i])) for i, cell in enumerate(row)
        ).rstrip()
        for n, row in enumerate(rows)
    ]
