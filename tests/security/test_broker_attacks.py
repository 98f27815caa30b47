"""Attacks on the broker's access rules, against the real secure mosquitto (mutual TLS,
``mosquitto/secure.conf`` and ``secure.acl``): one test per attack. Each refusal also
checks that the device's applied state and trust state did not change."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kit import NOT_AUTHORIZED, Client, Converged, Shims, snapshot

from setpoint.controller.pki import Pki
from setpoint.mosquitto import Broker, SecureBroker
from setpoint.proto import SHARDS, reports
from setpoint.proto.bundles import FileResource
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker

PWNED = FileResource("motd", "etc/motd", b"pwned\n", 0o644)


def _controller_view(broker: SecureBroker, pki: Pki, topics: Topics, *filters: str) -> Client:
    """A controller-identity subscriber that has received everything retained so far."""
    view = Client(broker, pki.controller, "view")
    view.subscribe(*filters)
    view.barrier(topics.barrier("view"))
    return view


def test_forged_bundle_published_by_a_device_onto_a_group_topic(
    converged: Converged, secure_broker: SecureBroker, pki: Pki
) -> None:
    fleet = converged.fleet
    topic = fleet.topics.group_desired("kiosk")
    attacker = Client(secure_broker, pki.device("dev2"), "setpoint-shim-dev2")
    forged = fleet.sign(fleet.group("kiosk", 99, [PWNED]), keys=[Ed25519PrivateKey.generate()])
    assert attacker.publish(topic, forged) == NOT_AUTHORIZED
    # Even the fleet's own signature does not help a device: it may not write there at all.
    assert attacker.publish(topic, fleet.sign(fleet.group("kiosk", 99, [PWNED]))) == 0x87
    view = _controller_view(secure_broker, pki, fleet.topics, topic)
    retained = [p for t, p, r in view.received(topic) if r]
    assert retained and all(p != forged for p in retained)
    converged.unchanged()


def test_forged_bundle_on_a_permissive_broker_is_refused_by_the_shim(tmp_path: Path) -> None:
    # No ACL at all (setpoint.conf, anonymous): anyone publishes anything retained. The
    # shim's signature check alone must hold.
    from kit import Fleet
    from shimkit import on_versions

    from setpoint.proto.bundles import SettingResource

    with Broker(tmp_path / "plain") as broker:
        fleet = Fleet(broker.host, broker.port, "setpoint-test/permissive/v1", tmp_path / "f")
        shims = Shims(fleet, tmp_path)
        try:
            fleet.publish_bundle(fleet.group("kiosk", 2, [SettingResource("tz", "tz", "UTC")]))
            fleet.publish_bundle(fleet.device("dev1", 2, "kiosk"))
            shim = shims.start("dev1")
            fleet.wait_report("dev1", on_versions(2, 2))
            root = shim.config.root
            before, trust = snapshot(root), shim.agent.state.trust.to_dict()
            forger = Ed25519PrivateKey.generate()
            fleet.publish_bundle(fleet.group("kiosk", 99, [PWNED]), keys=[forger])
            report = fleet.wait_report(
                "dev1", lambda r: any(x.reason == "signature" for x in r.refusals)
            )
            assert report.refusals[-1].version == 99
            assert snapshot(root) == before
            assert shim.agent.state.trust.to_dict() == trust
            assert not (root / "etc" / "motd").exists()
        finally:
            shims.close()
            fleet.close()


def test_device_publishing_another_devices_reported(
    converged: Converged, secure_broker: SecureBroker, pki: Pki
) -> None:
    fleet = converged.fleet
    topics = fleet.topics
    genuine = fleet.latest("dev1")
    assert genuine is not None
    attacker = Client(secure_broker, pki.device("dev2"), "setpoint-shim-dev2")
    # "dev1 is in sync on v9": what a compromised dev2 would like the controller to believe.
    fake = reports.encode(replace(genuine, seq=genuine.seq + 1000, applied_group=None))
    assert attacker.publish(topics.device_reported("dev1"), fake) == NOT_AUTHORIZED
    assert attacker.publish(topics.device_presence("dev1"), b"offline") == NOT_AUTHORIZED
    # Nor under any other report shard: the ACL lets a device write under every shard
    # level, but only its own id (the controller drops a report under a wrong shard).
    for shard in SHARDS:
        for leaf, body in (("reported", fake), ("presence", b"offline")):
            topic = f"{topics.prefix}/shards/{shard}/devices/dev1/{leaf}"
            assert attacker.publish(topic, body) == NOT_AUTHORIZED, topic
    # Its own reported state it may write (the rule is not simply "deny all").
    assert attacker.publish(topics.device_reported("dev2"), fake) in (0x00, 0x10)
    view = _controller_view(
        secure_broker, pki, topics, topics.device_reported("dev1"), topics.device_presence("dev1")
    )
    payloads = [p for _, p, _ in view.received(topics.device_reported("dev1"))]
    assert payloads and fake not in payloads
    assert reports.decode(payloads[-1]).device == "dev1"
    converged.unchanged()


def test_device_subscribing_to_another_devices_topics(
    converged: Converged, secure_broker: SecureBroker, pki: Pki
) -> None:
    topics = converged.fleet.topics
    spy = Client(secure_broker, pki.device("dev2"), "spy")
    filters = [
        topics.device_desired("dev1"),
        topics.device_reported("dev1"),
        topics.device_presence("dev1"),
        topics.device_command("dev1"),
        topics.all_reported(),
        topics.all_device_desired(),
        f"{topics.prefix}/#",
        "#",
    ]
    # mosquitto 2.0 grants the SUBACK and checks read access on every delivery instead.
    spy.subscribe(*filters)
    # Everything retained that dev2 may read has arrived once the controller's next message
    # on dev2's own desired topic is in (one connection keeps the broker's order).
    converged.fleet.publish(topics.device_desired("dev2"), b"marker", retain=False)
    with spy._cond:
        assert spy._cond.wait_for(lambda: any(p == b"marker" for _, p, _ in spy.messages), 10)
    seen = {t for t, _, _ in spy.received()}
    assert not [t for t in seen if "/devices/dev1/" in t], seen
    # What it may read it did receive (the group bundle, retained), so the rules are
    # not simply "deny everything".
    assert topics.group_desired("kiosk") in seen
    # Its own report and presence it may read too (it publishes a stale copy again: SPEC
    # 6.6, 6.7), under its own id only.
    own = {topics.device_reported("dev2"), topics.device_presence("dev2")}
    assert seen <= {topics.group_desired("kiosk"), topics.device_desired("dev2"), *own}
    converged.unchanged()


@pytest.mark.parametrize(
    "client_id",
    ["dev1", "setpoint-shim-dev1/../dev1", "dev1/#", "+", "#", "a/+/b"],
    ids=["other-id", "slash", "slash-hash", "plus", "hash", "slash-plus"],
)
def test_client_id_with_slash_plus_hash(
    converged: Converged, secure_broker: SecureBroker, pki: Pki, client_id: str
) -> None:
    # dev2's certificate, a client id and a user name chosen to look like dev1. The ACL
    # only knows the certificate's CN (%u): the client id and CONNECT user name are inert.
    topics = converged.fleet.topics
    attacker = Client(secure_broker, pki.device("dev2"), client_id, username="dev1")
    assert attacker.publish(topics.device_reported("dev1"), b"\x80") == NOT_AUTHORIZED
    assert attacker.publish(topics.group_desired("kiosk"), b"\x80") == NOT_AUTHORIZED
    attacker.subscribe(topics.device_desired("dev1"), topics.device_command("dev1"))
    converged.fleet.publish(topics.device_command("dev1"), b"c", retain=False)
    converged.fleet.publish(topics.device_desired("dev2"), b"marker", retain=False)
    if "+" in client_id or "#" in client_id:
        # mosquitto denies every ACL check to a client id holding a wildcard.
        assert attacker.publish(topics.device_reported("dev2"), b"\x80") == NOT_AUTHORIZED
    else:
        attacker.subscribe(topics.device_desired("dev2"))
        converged.fleet.publish(topics.device_desired("dev2"), b"marker2", retain=False)
        with attacker._cond:
            assert attacker._cond.wait_for(
                lambda: any(p == b"marker2" for _, p, _ in attacker.messages), 10
            )
    assert not [t for t, _, _ in attacker.received() if "/devices/dev1/" in t]
    converged.unchanged()


def test_operator_reads_drift_status_rollouts_events_and_nothing_else(
    converged: Converged, secure_broker: SecureBroker, pki: Pki
) -> None:
    topics = converged.fleet.topics
    operator = Client(secure_broker, pki.operator, "operator-tool")
    operator.subscribe(f"{topics.prefix}/#")
    readable = {
        topics.device_drift("dev1"),
        topics.group_status("kiosk"),
        topics.group_rollout("kiosk"),
        topics.ring_gate("production"),
        topics.repository_status(),
    }
    for topic in sorted(readable):
        converged.fleet.publish(topic, b'{"state": "in_sync"}')
    # What `setpoint diff` reads (retained by the converged fleet): bundles and reports.
    for_diff = {
        topics.group_desired("kiosk"),
        topics.device_desired("dev1"),
        topics.device_reported("dev1"),
    }
    operator.barrier(topics.barrier("operator-tool"))  # its tools' echo topic works
    seen = {t for t, _, _ in operator.received()}
    assert readable | for_diff <= seen, seen
    assert seen <= readable | for_diff | {topics.barrier("operator-tool")}, seen
    for topic in sorted(readable | for_diff):
        assert operator.publish(topic, b"x") == NOT_AUTHORIZED
    # Signed commands (approve, pause, resume) are the one thing it may send.
    assert (
        operator.publish(topics.operator_commands(), b"signed-command", retain=False)
        != NOT_AUTHORIZED
    )
    device = Client(secure_broker, pki.device("dev2"), "dev2")
    assert device.publish(topics.operator_commands(), b"forged", retain=False) == NOT_AUTHORIZED
    converged.unchanged()


def test_operator_cannot_learn_or_flood_other_clients_barrier_topics(
    converged: Converged, secure_broker: SecureBroker, pki: Pki
) -> None:
    # The controller's client ids used to be readable on clients/+/barrier (take one over,
    # and mosquitto drops the controller's session). Each client now has only its own.
    topics = converged.fleet.topics
    victim = Client(secure_broker, pki.controller, "setpoint-controller-0badc0de")
    operator = Client(secure_broker, pki.operator, "operator-tool")
    operator.subscribe(f"{topics.prefix}/clients/+/barrier", f"{topics.prefix}/#")
    victim.barrier(topics.barrier("setpoint-controller-0badc0de"))
    converged.fleet.publish(topics.device_drift("dev1"), b'{"state": "in_sync"}')
    operator.barrier(topics.barrier("operator-tool"))  # its own echo topic still works
    seen = {t for t, _, _ in operator.received()}
    assert topics.barrier("setpoint-controller-0badc0de") not in seen, seen
    assert [t for t in seen if "/clients/" in t] == [topics.barrier("operator-tool")], seen
    # Nor may it write there (a 1 MiB message to the controller's echo topic, refused).
    big = b"x" * (1 << 20)
    assert operator.publish(topics.barrier("setpoint-controller-0badc0de"), big) == 0x87
    device = Client(secure_broker, pki.device("dev2"), "dev2")
    assert device.publish(topics.barrier("setpoint-controller-0badc0de"), big) == 0x87
    assert not [p for t, p, _ in victim.received() if p == big]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_slow_reader_cannot_make_the_broker_hold_a_flood(
    secure_broker: SecureBroker, pki: Pki, unique_prefix: str
) -> None:
    # An operator's tool subscribes to the events and stops reading (its socket stays
    # open); 160 MiB of events then go out. The broker keeps at most max_inflight_bytes +
    # max_queued_bytes for the stalled client (secure.conf), not the whole flood.
    topics = Topics(unique_prefix)
    assert secure_broker.proc is not None
    pid = secure_broker.proc.pid
    stalled = Client(secure_broker, pki.operator, "stalled-tool")
    stalled.subscribe(topics.all_events())
    stalled.client.loop_stop()
    before = _rss_kib(pid)
    sender = Client(secure_broker, pki.controller, "flooder")
    chunk = b"\x00" * (1 << 20)
    try:
        for _ in range(160):
            assert sender.publish(topics.event("flood"), chunk, retain=False) == 0
        grown = (_rss_kib(pid) - before) // 1024
    finally:
        sender.close()
    assert grown < 110, f"mosquitto grew by {grown} MiB holding messages for a stalled client"


def test_diff_runs_with_the_operator_identity(
    converged: Converged, secure_broker: SecureBroker, pki: Pki
) -> None:
    # `setpoint diff` used to need the controller's certificate, which may write every
    # topic; the operator's read-only identity is enough now.
    from kit import operator_cli

    shown = operator_cli(
        secure_broker, pki, "diff", "dev1", "--trust", str(converged.fleet.pub), "--json"
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    body = json.loads(shown.stdout)
    assert body["device"] == "dev1" and body["verified"] is True, body
    assert {r["id"] for r in body["resources"]} == {"motd", "tz"}, body
    converged.unchanged()
