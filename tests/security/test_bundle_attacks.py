"""Attacks by someone who controls the broker (here: holds the controller's broker
identity) but not the fleet signing key, against a real shim over mutual TLS. Every
refusal is reported, and leaves the device's files and stored trust state untouched."""

from __future__ import annotations

import pytest
from conftest import MOTD, TZ
from kit import Client, Converged

from setpoint.controller.pki import Pki
from setpoint.mosquitto import SecureBroker
from setpoint.proto import codec, envelopes
from setpoint.proto.bundles import FileResource

pytestmark = pytest.mark.broker

PWNED = FileResource("motd", "etc/motd", b"pwned\n", 0o644)


def test_forged_signature(converged: Converged) -> None:
    fleet = converged.fleet
    data = codec.unpack(fleet.sign(fleet.group("kiosk", 3, [PWNED])), max_size=1 << 20)
    data["signatures"][0]["sig"] = bytes(64)
    fleet.publish(fleet.topics.group_desired("kiosk"), codec.pack(data))
    converged.refused("signature")


def test_replay_of_an_old_bundle(converged: Converged) -> None:
    # A genuine, validly signed v1, captured earlier and published again over v2.
    fleet = converged.fleet
    old = fleet.sign(fleet.group("kiosk", 1, [PWNED]))
    fleet.publish(fleet.topics.group_desired("kiosk"), old)
    report = converged.refused("rollback")
    assert report.refusals[-1].version == 1


def test_bundle_moved_from_one_groups_topic_to_another(converged: Converged) -> None:
    # A genuine bundle of group "lobby" (newer version, validly signed), re-published on
    # group "kiosk"'s topic: the signed target names lobby.
    fleet = converged.fleet
    lobby = fleet.sign(fleet.group("lobby", 50, [PWNED]))
    fleet.publish(fleet.topics.group_desired("kiosk"), lobby)
    report = converged.refused("wrong-target")
    assert report.refusals[-1].target == "lobby"


def test_device_bundle_moved_to_another_device(converged: Converged) -> None:
    fleet = converged.fleet
    other = fleet.sign(fleet.device("dev2", 50, "lobby"))
    fleet.publish(fleet.topics.device_desired("dev1"), other)
    converged.refused("wrong-target", kind="device")


def test_expired_bundle_freezes_on_the_last_good_state(converged: Converged) -> None:
    # A genuine v3 whose lifetime is over (held back by the attacker, then released): the
    # device refuses it and keeps enforcing v2.
    fleet = converged.fleet
    fleet.publish_bundle(fleet.group("kiosk", 3, [PWNED], expires_in=-3600))
    converged.refused("expired")
    (converged.root / "etc" / "motd").write_bytes(b"hand edit\n")
    converged.shim.wait_event("healed")
    assert (converged.root / "etc" / "motd").read_bytes() == b"hello dev1\n"


def test_wrong_payload_type(converged: Converged) -> None:
    # A genuine device-bundle signature cannot be replayed as a group bundle.
    fleet = converged.fleet
    bundle = fleet.group("kiosk", 3, [PWNED])
    fleet.publish_bundle(bundle, payload_type=envelopes.DEVICE_BUNDLE_TYPE)
    converged.refused("payload-type")


def test_oversized_payload_refused_by_the_shim(converged: Converged) -> None:
    # Under the broker's max_packet_size (2 MiB), over the protocol's 1 MiB envelope cap.
    fleet = converged.fleet
    fleet.publish(fleet.topics.group_desired("kiosk"), b"\x00" * (envelopes.MAX_ENVELOPE_BYTES + 1))
    converged.refused("too-large")


def test_oversized_payload_refused_by_the_broker(
    converged: Converged, secure_broker: SecureBroker, pki: Pki
) -> None:
    # Over max_packet_size (2 MiB): mosquitto drops the connection and stores nothing.
    fleet = converged.fleet
    topic = fleet.topics.group_desired("kiosk")
    sender = Client(secure_broker, pki.controller, "big-sender")
    sender.client.publish(topic, b"\x00" * (3 * 1024 * 1024), qos=1, retain=True)
    assert sender.disconnected.wait(10)
    assert "big-sender disconnected due to oversize packet" in secure_broker.tail_log(50)
    view = Client(secure_broker, pki.controller, "view")
    view.subscribe(topic)
    view.barrier(fleet.topics.barrier("view"))
    retained = [p for _, p, r in view.received(topic) if r]
    assert len(retained) == 1 and len(retained[0]) < 4096
    converged.unchanged()


def _nested(depth: int) -> bytes:
    # msgpack: depth nested one-element arrays around nil, built by hand (no recursion).
    return b"\x91" * depth + b"\xc0"


def test_deeply_nested_envelope(converged: Converged) -> None:
    fleet = converged.fleet
    fleet.publish(fleet.topics.group_desired("kiosk"), _nested(100_000))
    report = fleet.wait_report("dev1", lambda r: any(x.kind == "group" for x in r.refusals))
    assert report.refusals[-1].reason in ("malformed", "schema")
    converged.unchanged()


def test_deeply_nested_signed_payload(converged: Converged) -> None:
    # Validly signed (the attacker would need the key; this checks the decoder's bound).
    fleet = converged.fleet
    payload = b"\x81\xa9resources" + _nested(10_000)
    fleet.publish(
        fleet.topics.group_desired("kiosk"),
        envelopes.sign(envelopes.GROUP_BUNDLE_TYPE, payload, [fleet.key]),
    )
    report = fleet.wait_report("dev1", lambda r: any(x.kind == "group" for x in r.refusals))
    assert report.refusals[-1].reason in ("malformed", "schema")
    converged.unchanged()


def test_genuine_update_still_applies_after_the_attacks(converged: Converged) -> None:
    # The control: the same shim, same broker, accepts the fleet's real next version.
    fleet = converged.fleet
    fleet.publish_bundle(fleet.group("kiosk", 1, [PWNED]))
    converged.refused("rollback")
    fleet.publish_bundle(fleet.group("kiosk", 3, [MOTD, TZ, FileResource("x", "x", b"3")]))
    fleet.wait_report(
        "dev1", lambda r: r.applied_group is not None and r.applied_group.version == 3
    )
    assert (converged.root / "x").read_bytes() == b"3"
