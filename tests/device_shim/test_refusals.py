"""Bad input, against a real mosquitto: one test per attack or fault, each proving that
nothing changed on disk or in the stored trust state and that the refusal was reported."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from shimkit import Converged, Fleet, Shims, on_versions, snapshot, statuses

from setpoint.device_shim import DevicePolicy
from setpoint.proto import codec, envelopes
from setpoint.proto.bundles import CommandResource, FileResource, SettingResource

pytestmark = pytest.mark.broker

MOTD = FileResource("motd", "etc/motd", b"hello ${name}\n", 0o644)
TZ = SettingResource("tz", "tz", "UTC")


@pytest.fixture
def converged(fleet: Fleet, shims: Shims) -> Iterator[Converged]:
    fleet.publish_bundle(fleet.group("kiosk", 2, [MOTD, TZ]))
    fleet.publish_bundle(fleet.device("dev1", 2, "kiosk", vars={"name": "dev1"}))
    shim = shims.start("dev1")
    fleet.wait_report("dev1", on_versions(2, 2))
    root = shim.config.root
    assert (root / "etc" / "motd").read_bytes() == b"hello dev1\n"
    c = Converged(shim, fleet, root, snapshot(root), {})
    c.trust = c.state_trust()
    yield c


def test_forged_signature(converged: Converged) -> None:
    fleet = converged.fleet
    data = codec.unpack(
        fleet.sign(fleet.group("kiosk", 3, [FileResource("motd", "etc/motd", b"pwned")])),
        max_size=1 << 20,
    )
    data["signatures"][0]["sig"] = bytes(64)
    fleet.publish(fleet.topics.group_desired("kiosk"), codec.pack(data))
    report = converged.refused("signature")
    assert report.refusals[-1].version == 3  # which bundle (as it claimed to be)


def test_tampered_payload(converged: Converged) -> None:
    fleet = converged.fleet
    good = codec.unpack(fleet.sign(fleet.group("kiosk", 3, [MOTD])), max_size=1 << 20)
    other = fleet.group("kiosk", 3, [FileResource("motd", "etc/motd", b"pwned")])
    from setpoint.proto import bundles

    good["payload"] = bundles.encode(other)  # signature of the real v3 on other content
    fleet.publish(fleet.topics.group_desired("kiosk"), codec.pack(good))
    converged.refused("signature")


def test_unknown_key(converged: Converged) -> None:
    fleet = converged.fleet
    stranger = Ed25519PrivateKey.generate()
    fleet.publish_bundle(fleet.group("kiosk", 3, [MOTD]), keys=[stranger])
    report = converged.refused("signature")
    assert "no signature by a trusted key" in report.refusals[-1].error


def test_bundle_for_another_device(converged: Converged) -> None:
    fleet = converged.fleet
    data = fleet.sign(fleet.device("dev2", 3, "kiosk", vars={"name": "x"}))
    fleet.publish(fleet.topics.device_desired("dev1"), data)
    report = converged.refused("wrong-target", kind="device")
    assert report.refusals[-1].target == "dev2"


def test_bundle_for_another_group(converged: Converged) -> None:
    # A validly signed bundle of group "lobby", moved onto this device's group topic.
    fleet = converged.fleet
    data = fleet.sign(fleet.group("lobby", 9, [FileResource("motd", "etc/motd", b"lobby")]))
    fleet.publish(fleet.topics.group_desired("kiosk"), data)
    report = converged.refused("wrong-target")
    assert report.refusals[-1].target == "lobby"


def test_replayed_older_version(converged: Converged) -> None:
    fleet = converged.fleet
    fleet.publish_bundle(fleet.group("kiosk", 1, [FileResource("motd", "etc/motd", b"v1")]))
    report = converged.refused("rollback")
    assert report.refusals[-1].version == 1


def test_same_version_with_other_content(converged: Converged) -> None:
    fleet = converged.fleet
    fleet.publish_bundle(fleet.group("kiosk", 2, [FileResource("motd", "etc/motd", b"other")]))
    report = converged.refused("rollback")
    assert "other content" in report.refusals[-1].error


def test_same_version_same_content_resigned_is_not_a_refusal(converged: Converged) -> None:
    # A refresh (new issued_at/expires_at, same content) is accepted, and applies nothing.
    fleet = converged.fleet
    mark = converged.shim.mark()
    fleet.publish_bundle(fleet.group("kiosk", 2, [MOTD, TZ], expires_in=7200))
    fleet.publish_bundle(fleet.group("kiosk", 3, [MOTD, TZ]))
    converged.shim.wait_event("applied", after=mark)
    applied = [d for n, d in converged.shim.events[mark:] if n == "applied"]
    assert len(applied) == 1 and "v3" in applied[0]["label"]
    assert not converged.fleet.latest("dev1").refusals  # type: ignore[union-attr]


def test_expired_bundle(converged: Converged) -> None:
    fleet = converged.fleet
    fleet.publish_bundle(fleet.group("kiosk", 3, [MOTD], expires_in=-3600))
    converged.refused("expired")


def test_wrong_payload_type(converged: Converged) -> None:
    fleet = converged.fleet
    bundle = fleet.group("kiosk", 3, [FileResource("motd", "etc/motd", b"x")])
    fleet.publish_bundle(bundle, payload_type=envelopes.DEVICE_BUNDLE_TYPE)
    converged.refused("payload-type")


def test_command_envelope_on_a_bundle_topic(converged: Converged) -> None:
    fleet = converged.fleet
    fleet.publish(fleet.topics.device_desired("dev1"), fleet.command("dev1", 1))
    converged.refused("payload-type", kind="device")


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never-used msgpack byte
        b"not msgpack at all",
        b"\x83\xa1a\x01",  # a map that is cut short
        codec.pack({"payloadType": "x", "payload": b""}),  # no signatures field
        codec.pack([1, 2, 3]),
        codec.pack({"payloadType": envelopes.GROUP_BUNDLE_TYPE, "payload": b"", "signatures": []}),
    ],
    ids=["bad-byte", "text", "truncated", "missing-field", "array", "no-signatures"],
)
def test_malformed_payloads(converged: Converged, payload: bytes) -> None:
    fleet = converged.fleet
    fleet.publish(fleet.topics.group_desired("kiosk"), payload)
    report = fleet.wait_report("dev1", lambda r: any(x.kind == "group" for x in r.refusals))
    assert report.refusals[-1].reason in ("malformed", "schema", "signature")
    converged.unchanged()


def test_signed_but_malformed_bundle(converged: Converged) -> None:
    fleet = converged.fleet
    payload = codec.pack({"schema": 1, "kind": "group", "target": "kiosk", "version": "three"})
    data = envelopes.sign(envelopes.GROUP_BUNDLE_TYPE, payload, [fleet.key])
    fleet.publish(fleet.topics.group_desired("kiosk"), data)
    converged.refused("schema")


def test_oversized_payload(converged: Converged) -> None:
    fleet = converged.fleet
    fleet.publish(fleet.topics.group_desired("kiosk"), b"\x00" * (envelopes.MAX_ENVELOPE_BYTES + 1))
    report = converged.refused("too-large")
    assert "limit" in report.refusals[-1].error


@pytest.mark.parametrize("path", ["../outside", "/etc/passwd", "a/../../b", "etc//motd"])
def test_file_resource_outside_the_root(converged: Converged, path: str) -> None:
    fleet = converged.fleet
    bundle = fleet.group("kiosk", 3, [MOTD])
    body = codec.unpack(bundle_bytes(bundle), max_size=1 << 20)
    body["resources"].append(
        {"id": "evil", "kind": "file", "path": path, "content": b"x", "mode": 0o644}
    )
    data = envelopes.sign(envelopes.GROUP_BUNDLE_TYPE, codec.pack(body), [fleet.key])
    fleet.publish(fleet.topics.group_desired("kiosk"), data)
    converged.refused("schema")
    assert not (converged.root.parent / "outside").exists()


def bundle_bytes(bundle: Any) -> bytes:
    from setpoint.proto import bundles

    return bundles.encode(bundle)


def test_file_resource_through_a_symlink(converged: Converged, tmp_path: Path) -> None:
    # Accepted by trust (it is validly signed), but the apply is refused before it touches
    # anything, and not retried until a new version: the path is permanently wrong.
    fleet, root = converged.fleet, converged.root
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "www").symlink_to(outside)
    converged.before = snapshot(root)
    bundle = fleet.group("kiosk", 3, [MOTD, TZ, FileResource("index", "www/index.html", b"pwned")])
    fleet.publish_bundle(bundle)
    report = fleet.wait_report("dev1", lambda r: r.failure is not None)
    assert report.failure is not None and report.failure.permanent
    assert report.failure.version == 3 and "outside the device root" in report.failure.error
    assert list(outside.iterdir()) == []
    converged.unchanged()
    assert converged.shim.count("apply-failed") == 1


def test_command_resource_on_a_device_that_forbids_commands(converged: Converged) -> None:
    fleet, root = converged.fleet, converged.root
    marker = root.parent / "command-ran"
    cmd = CommandResource("restart", f"test -e {marker}", f"touch {marker}", 10)
    fleet.publish_bundle(fleet.group("kiosk", 3, [MOTD, TZ, cmd]))
    report = fleet.wait_report("dev1", on_versions(3, 2))
    assert statuses(report)["restart"] == "blocked"
    assert next(r.detail for r in report.resources if r.id == "restart").startswith(
        "device policy forbids commands"
    )
    assert not marker.exists()
    assert converged.shim.agent.observer.checks_run == 0  # not even its check ran


def test_threshold_two_needs_two_keys(fleet: Fleet, shims: Shims, tmp_path: Path) -> None:
    second = Ed25519PrivateKey.generate()
    second_pub = tmp_path / "second.pub"
    second_pub.write_bytes(envelopes.public_key_pem(second.public_key()))
    shim = shims.start("dev1", trust_files=(fleet.pub, second_pub), threshold=2)
    fleet.publish_bundle(fleet.group("kiosk", 1, [MOTD]), keys=[fleet.key, second])
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk"), keys=[fleet.key, fleet.key])
    report = fleet.wait_report("dev1", lambda r: bool(r.refusals))
    assert report.refusals[-1].reason == "signature" and report.applied_device is None
    assert shim.agent.state.trust.floors == {}
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk"), keys=[second, fleet.key])
    fleet.wait_report("dev1", on_versions(1, 1))


def test_refusing_keeps_enforcing_the_last_good_state(converged: Converged) -> None:
    fleet, root = converged.fleet, converged.root
    fleet.publish_bundle(fleet.group("kiosk", 3, [MOTD]), keys=[Ed25519PrivateKey.generate()])
    converged.refused("signature")
    (root / "etc" / "motd").write_text("hand edit")
    fleet.wait_report("dev1", lambda r: statuses(r).get("motd") == "healed")
    assert (root / "etc" / "motd").read_bytes() == b"hello dev1\n"


def test_refusals_are_reported_once_not_on_every_redelivery(converged: Converged) -> None:
    fleet = converged.fleet
    forged = fleet.sign(fleet.group("kiosk", 3, [MOTD]), keys=[Ed25519PrivateKey.generate()])
    for _ in range(3):
        fleet.publish(fleet.topics.group_desired("kiosk"), forged)
    report = converged.refused("signature")
    # Mark the end of the deliveries with a second, different refusal.
    fleet.publish_bundle(fleet.group("kiosk", 1, [MOTD]))
    report = converged.refused("rollback")
    assert [r.reason for r in report.refusals] == ["signature", "rollback"]


def test_policy_allow_list(fleet: Fleet, shims: Shims) -> None:
    policy = DevicePolicy(allow_commands=True, allowed_commands=frozenset({"true"}))
    shim = shims.start("dev1", policy=policy)
    marker = shim.config.root / "ran"
    fleet.publish_bundle(
        fleet.group(
            "kiosk",
            1,
            [
                CommandResource("ok", "true", "true"),
                CommandResource("no", "false", f"touch {marker}"),
            ],
        )
    )
    fleet.publish_bundle(fleet.device("dev1", 1, "kiosk"))
    report = fleet.wait_report("dev1", on_versions(1, 1))
    assert statuses(report) == {"ok": "ok", "no": "blocked"}
    assert not marker.exists()


def test_adding_a_key_does_not_reset_floors(fleet: Fleet, shims: Shims, tmp_path: Path) -> None:
    # Adding a key (step 1 of a rotation) keeps the floors: old bundles stay refused.
    shim = shims.start("dev1")
    fleet.publish_bundle(fleet.group("kiosk", 5, [MOTD]))
    fleet.publish_bundle(fleet.device("dev1", 5, "kiosk"))
    fleet.wait_report("dev1", on_versions(5, 5))
    new = Ed25519PrivateKey.generate()
    new_pub = tmp_path / "new.pub"
    new_pub.write_bytes(envelopes.public_key_pem(new.public_key()))
    shim = shims.restart(shim, trust_files=(fleet.pub, new_pub))
    fleet.publish_bundle(fleet.group("kiosk", 4, [MOTD]), keys=[new])
    report = fleet.wait_report("dev1", lambda r: any(x.reason == "rollback" for x in r.refusals))
    assert report.applied_group is not None and report.applied_group.version == 5
    # Step 3: only the new key. Floors stay (one key is still the same set's member)...
    shim = shims.restart(shim, trust_files=(new_pub,))
    shim.wait_event("reported")
    assert shim.agent.state.trust.floor("group", "kiosk") is not None


def test_replacing_every_trusted_key_resets_floors(
    fleet: Fleet, shims: Shims, tmp_path: Path
) -> None:
    # Recovery from a compromised key that pushed the floor absurdly high.
    shim = shims.start("dev1")
    fleet.publish_bundle(fleet.group("kiosk", 1_000_000, [MOTD]))
    fleet.publish_bundle(fleet.device("dev1", 1_000_000, "kiosk"))
    fleet.wait_report("dev1", on_versions(1_000_000, 1_000_000))
    new = Ed25519PrivateKey.generate()
    new_pub = tmp_path / "new.pub"
    new_pub.write_bytes(envelopes.public_key_pem(new.public_key()))
    shim = shims.restart(shim, trust_files=(new_pub,))
    fleet.publish_bundle(
        fleet.group("kiosk", 7, [FileResource("motd", "etc/motd", b"fixed")]), keys=[new]
    )
    fleet.publish_bundle(fleet.device("dev1", 7, "kiosk"), keys=[new])
    fleet.wait_report("dev1", on_versions(7, 7))
    assert (shim.config.root / "etc" / "motd").read_bytes() == b"fixed"
