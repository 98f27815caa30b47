"""Attacks on the transport: clients without a good certificate are refused at the TLS
handshake by the real secure mosquitto, before any MQTT packet is read."""

from __future__ import annotations

import datetime as dt
import socket
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import Pkis
from cryptography import x509
from kit import Client, handshake

from setpoint.controller import pki as pki_mod
from setpoint.mosquitto import SecureBroker

pytestmark = pytest.mark.broker


def refused(result: str) -> bool:
    """The broker ended the TLS session (an alert, or a close: which one the client sees
    first depends on timing with TLS 1.3) and never answered the CONNECT."""
    assert result.startswith(("SSL", "ConnectionResetError", "BrokenPipeError")), result
    return True


def test_good_certificate_is_accepted(secure_broker: SecureBroker, pki: pki_mod.Pki) -> None:
    # The control for every refusal below: the same probe with a valid certificate works.
    assert handshake(secure_broker, pki.ca, pki.device("dev1")) == "connack"


def test_missing_client_certificate(secure_broker: SecureBroker, pki: pki_mod.Pki) -> None:
    assert refused(handshake(secure_broker, pki.ca, None))


def test_expired_client_certificate(secure_broker: SecureBroker, pki: pki_mod.Pki) -> None:
    cert = x509.load_pem_x509_certificate(pki.device("stale").cert.read_bytes())
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)  # the premise
    assert refused(handshake(secure_broker, pki.ca, pki.device("stale")))


def test_revoked_client_certificate(secure_broker: SecureBroker, pki: pki_mod.Pki) -> None:
    assert refused(handshake(secure_broker, pki.ca, pki.device("gone")))


def test_revoked_while_the_broker_runs(secure_broker: SecureBroker, pki: pki_mod.Pki) -> None:
    device = f"late-{secure_broker.port}"
    pki.issue_device(device)
    assert handshake(secure_broker, pki.ca, pki.device(device)) == "connack"
    pki.revoke(device)
    secure_broker.reload()  # SIGHUP: mosquitto re-reads the CRL
    # The reload is asynchronous: wait until the broker has taken it (a refusal of the
    # revoked certificate), bounded, while a good certificate keeps working.
    deadline = time.monotonic() + 10
    while handshake(secure_broker, pki.ca, pki.device(device)) == "connack":
        assert time.monotonic() < deadline, "the broker never refused the revoked certificate"
        time.sleep(0.02)
    assert handshake(secure_broker, pki.ca, pki.device("dev1")) == "connack"


def test_foreign_ca_client_certificate(secure_broker: SecureBroker, pkis: Pkis) -> None:
    # Another fleet's dev1, trusting our CA for the server: refused for its issuer.
    foreign = pkis.foreign.device("dev1")
    assert refused(handshake(secure_broker, pkis.fleet.ca, foreign))


def test_client_rejects_a_broker_with_a_foreign_certificate(
    pkis: Pkis, tmp_path: Path, unique_prefix: str
) -> None:
    # The other direction: a broker set up with another fleet's certificates (an attacker
    # in the middle) is refused by a client that pins our CA.
    with SecureBroker(tmp_path / "rogue", pkis.foreign.root, prefix=unique_prefix) as rogue:
        result = handshake(rogue, pkis.fleet.ca, pkis.fleet.device("dev1"))
        assert "CERTIFICATE_VERIFY_FAILED" in result, result
        with pytest.raises(OSError):
            Client(rogue, pkis.fleet.device("dev1"), "dev1")


def test_plain_mqtt_on_the_tls_port(secure_broker: SecureBroker) -> None:
    with socket.create_connection((secure_broker.host, secure_broker.port), 5) as raw:
        raw.sendall(bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 1]) + b"x")
        raw.settimeout(5)
        try:
            answer = raw.recv(4)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"\x20")  # no CONNACK
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plain")
    with pytest.raises(OSError):
        client.connect(secure_broker.host, secure_broker.port, keepalive=5)
        client.loop(timeout=2)
        client.loop(timeout=2)
        raise OSError("no error raised")  # pragma: no cover - paho reports by return code
