"""Helpers for the attack suite: MQTT clients with client certificates, a TLS stand-in
controller, and a converged shim whose state every refusal must leave untouched."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from shimkit import TIMEOUT, Converged, Fleet, Shims, snapshot

from setpoint.controller.pki import Credentials
from setpoint.device_shim import BrokerSettings
from setpoint.mosquitto import SecureBroker
from setpoint.proto import envelopes
from setpoint.proto.topics import Topics

NOT_AUTHORIZED = 0x87


class Client:
    """A paho MQTT 5 client with a client certificate; records acks and messages."""

    def __init__(
        self,
        broker: SecureBroker,
        creds: Credentials,
        client_id: str,
        *,
        username: str | None = None,
    ) -> None:
        self._cond = threading.Condition()
        self.connected: Any = None
        self.acks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self.client.tls_set(
            ca_certs=str(creds.ca),
            certfile=str(creds.cert),
            keyfile=None if creds.key is None else str(creds.key),
        )
        if username is not None:
            self.client.username_pw_set(username, "ignored")
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.disconnected = threading.Event()
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self.connected is not None, TIMEOUT)
        assert not self.connected.is_failure, f"{client_id}: {self.connected}"

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._cond:
            self.connected = reason
            self._cond.notify_all()

    def _on_publish(self, c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
        with self._cond:
            self.acks[mid] = int(reason.value)
            self._cond.notify_all()

    def _on_subscribe(self, c: Any, u: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._cond:
            self.subacks[mid] = [int(r.value) for r in reasons]
            self._cond.notify_all()

    def _on_message(self, c: Any, u: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (0x87: not authorized)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.acks, TIMEOUT), topic
            return self.acks[info.mid]

    def subscribe(self, *filters: str) -> list[int]:
        result, mid = self.client.subscribe([(f, 1) for f in filters])
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self.subacks, TIMEOUT)
            return self.subacks[mid]

    def barrier(self, topic: str) -> None:
        """Publish a nonce to ``topic`` (which this client reads and writes) and wait for it:
        everything the broker had for this client before has then been delivered."""
        nonce = os.urandom(8)
        self.subscribe(topic)
        assert self.publish(topic, nonce, retain=False) == 0
        with self._cond:
            assert self._cond.wait_for(
                lambda: any(p == nonce for _, p, _ in self.messages), TIMEOUT
            )

    def received(self, topic_prefix: str = "") -> list[tuple[str, bytes, bool]]:
        with self._cond:
            return [m for m in self.messages if m[0].startswith(topic_prefix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def handshake(broker: SecureBroker, ca: Path, creds: Credentials | None) -> str:
    """Open TLS to ``broker`` and send an MQTT CONNECT. Return "connack" if the broker
    answered, or the TLS error it ended with (a refused handshake)."""
    context = ssl.create_default_context(cafile=str(ca))
    if creds is not None:
        context.load_cert_chain(str(creds.cert), None if creds.key is None else str(creds.key))
    with socket.create_connection((broker.host, broker.port), TIMEOUT) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=broker.host) as tls:
                # MQTT 3.1.1 CONNECT, clean session, keepalive 10, client id "x". With TLS
                # 1.3 the server checks the client certificate after the handshake, so the
                # refusal arrives when we read.
                tls.sendall(bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 1]) + b"x")
                answer = tls.recv(4)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
            return type(exc).__name__ + ": " + str(exc)
    return "connack" if answer[:1] == b"\x20" else f"no connack: {answer!r}"


class SecureFleet(Fleet):
    """shimkit's stand-in controller, connected with the controller's client certificate
    (Fleet's own __init__ connects in plain MQTT, so this one repeats it with TLS)."""

    def __init__(
        self,
        broker: SecureBroker,
        creds: Credentials,
        prefix: str,
        directory: Path,
        key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.host, self.port = broker.host, broker.port
        self.topics = Topics(prefix)
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = key or Ed25519PrivateKey.generate()
        self.pub = directory / "signing.pub"
        self.pub.write_bytes(envelopes.public_key_pem(self.key.public_key()))
        self._cond = threading.Condition()
        self.reports = {}
        self.presence = {}
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5,
            client_id=f"fleet-{os.getpid()}-{id(self)}",
        )
        self._client.tls_set(
            ca_certs=str(creds.ca), certfile=str(creds.cert), keyfile=str(creds.key)
        )
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *a: subscribed.set()
        self._client.connect(self.host, self.port)
        self._client.loop_start()
        self._client.subscribe([(self.topics.all_reported(), 1), (self.topics.all_presence(), 1)])
        assert subscribed.wait(TIMEOUT)


def commit(repo: Path, motd: str) -> None:
    """Commit a fleet of one group (kiosk, a motd file) and one device (dev1) to ``repo``
    on branch main (made on first use)."""
    files = {
        "groups/kiosk.yaml": (
            "mode: enforce\nresources:\n  - id: motd\n    kind: file\n    path: etc/motd\n"
            f'    mode: "0644"\n    content: "{motd}"\n'
        ),
        "devices/dev1.yaml": "group: kiosk\n",
    }
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(repo)}
    ident = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    if not (repo / ".git").exists():
        subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True, env=env)
    subprocess.run(["git", *ident, "-C", str(repo), "add", "-A"], check=True, env=env)
    subprocess.run(
        ["git", *ident, "-C", str(repo), "commit", "-q", "-m", motd], check=True, env=env
    )


def run_controller(
    broker: SecureBroker, pki: Any, repo: Path | str, tmp: Path, *extra: str
) -> subprocess.Popen[str]:
    """The real ``setpoint controller`` on ``repo``, over mutual TLS with the controller's
    certificate, a fresh signing key in ``tmp/keys``; its log in ``tmp/controller.log``."""
    from setpoint.commands import keys

    keys.generate(tmp / "keys")
    creds = pki.controller
    log = (tmp / "controller.log").open("w")
    return subprocess.Popen(
        [
            sys.executable, "-m", "setpoint", "controller", "--repo", str(repo),
            "--broker", broker.url, "--ca", str(creds.ca), "--cert", str(creds.cert),
            "--client-key", str(creds.key), "--key", str(tmp / "keys" / keys.PRIVATE_NAME),
            "--state-dir", str(tmp / "state"), "--prefix", broker.prefix, *extra,
        ],
        stdout=log, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"},
    )  # fmt: skip


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LiveController:
    """The real controller on a fresh one-group repository (``commit``), and a reader of the
    group bundle with the controller's certificate; ``close()`` stops it."""

    def __init__(self, broker: SecureBroker, pki: Any, tmp: Path, *extra: str) -> None:
        self.topics = Topics(broker.prefix)
        self.repo = tmp / "repo"
        self.log = tmp / "controller.log"
        commit(self.repo, "one")
        self.spy = Client(broker, pki.controller, "spy")
        self.spy.subscribe(self.topics.group_desired("kiosk"))
        self.proc = run_controller(broker, pki, self.repo, tmp, *extra)
        self.wait_motd(b"one")

    def bundle(self) -> Any:
        """The group bundle the broker holds now (decoded, not verified), or None."""
        from setpoint.proto import bundles

        got = [p for _, p, _ in self.spy.received(self.topics.group_desired("kiosk")) if p]
        return bundles.decode(envelopes.decode(got[-1]).payload) if got else None

    def motd(self) -> bytes | None:
        bundle = self.bundle()
        return None if bundle is None else bundle.resources[0].content  # type: ignore[no-any-return]

    def wait_motd(self, motd: bytes, timeout: float = 60) -> None:
        with self.spy._cond:
            ok = self.spy._cond.wait_for(lambda: self.motd() == motd, timeout)
        assert ok, f"motd {motd!r} never published; log:\n{self.log.read_text()[-3000:]}"

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmRSS for {self.proc.pid}")

    def close(self) -> None:
        stop(self.proc)


def operator_cli(broker: SecureBroker, pki: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """A ``setpoint`` verb run as the operator (its certificate), output captured."""
    creds = pki.operator
    return subprocess.run(
        [
            sys.executable, "-m", "setpoint", *args, "--broker", broker.url,
            "--ca", str(creds.ca), "--cert", str(creds.cert), "--client-key", str(creds.key),
            "--prefix", broker.prefix,
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def shim_broker(broker: SecureBroker, creds: Credentials) -> BrokerSettings:
    return BrokerSettings(
        broker.host,
        broker.port,
        tls=True,
        ca=str(creds.ca),
        cert=str(creds.cert),
        key=None if creds.key is None else str(creds.key),
    )


__all__ = [
    "NOT_AUTHORIZED",
    "Client",
    "Converged",
    "LiveController",
    "SecureFleet",
    "Shims",
    "Topics",
    "commit",
    "handshake",
    "operator_cli",
    "run_controller",
    "shim_broker",
    "snapshot",
    "stop",
]
