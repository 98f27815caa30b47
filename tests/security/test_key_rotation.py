"""Rotating the fleet signing key, and recovering from a compromised one, with the real
controller and real shims over mutual TLS (the procedure of docs/security.md, step by
step)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kit import Client, SecureFleet, Shims, commit, shim_broker, snapshot

from setpoint.commands import keys
from setpoint.controller.broker import Backoff, BrokerSettings
from setpoint.controller.pki import Pki
from setpoint.controller.service import Controller, ControllerConfig
from setpoint.mosquitto import SecureBroker
from setpoint.proto import codec, envelopes
from setpoint.proto.bundles import FileResource

pytestmark = pytest.mark.broker


def publish(broker: SecureBroker, pki: Pki, repo: Path, state: Path, *key_files: Path) -> None:
    """What `setpoint controller --once --key A [--key B]` does, in process."""
    creds = pki.controller
    config = ControllerConfig(
        repo=str(repo),
        broker=BrokerSettings(
            broker.host, broker.port, tls=True, ca=str(creds.ca), cert=str(creds.cert),
            key=str(creds.key),
        ),
        key_path=key_files[0],
        extra_key_paths=tuple(key_files[1:]),
        state_dir=state,
        prefix=broker.prefix,
        follow=False,
        watch=False,
        backoff=Backoff(base=0.05, cap=0.3),
        publish_timeout=5.0,
    )  # fmt: skip

    async def once() -> None:
        async with Controller(config) as controller:
            await controller.settle(timeout=30)

    asyncio.run(once())


def make_key(directory: Path) -> tuple[Path, Path]:
    keys.generate(directory)
    return directory / keys.PRIVATE_NAME, directory / keys.PUBLIC_NAME


def retained_group(broker: SecureBroker, pki: Pki, fleet: SecureFleet) -> bytes:
    view = Client(broker, pki.controller, "view")
    try:
        topic = fleet.topics.group_desired("kiosk")
        view.subscribe(topic)
        view.barrier(fleet.topics.barrier("view"))
        return [p for _, p, r in view.received(topic) if r][-1]
    finally:
        view.close()


def group_version(shim: object) -> int:
    floor = shim.agent.state.trust.floor("group", "kiosk")  # type: ignore[attr-defined]
    assert floor is not None
    return int(floor.version)


def test_key_rotation_with_an_overlap_period(
    secure_broker: SecureBroker, secure_fleet: SecureFleet, secure_shims: Shims, pki: Pki,
    tmp_path: Path,
) -> None:  # fmt: skip
    old_key, old_pub = make_key(tmp_path / "old")
    new_key, new_pub = make_key(tmp_path / "new")
    repo, state, motd = tmp_path / "repo", tmp_path / "state", "etc/motd"
    dev1 = shim_broker(secure_broker, pki.device("dev1"))

    # 0. Before: signed with the old key, devices trust the old key.
    commit(repo, "one")
    publish(secure_broker, pki, repo, state, old_key)
    shim = secure_shims.start("dev1", trust_files=(old_pub,), broker=dev1)
    root = shim.config.root
    shim.wait_event("applied")
    assert (root / motd).read_text() == "one"

    # 1. Overlap: the controller signs with both keys; devices trusting only the old key
    #    still accept (threshold 1), and every envelope carries both signatures.
    commit(repo, "two")
    publish(secure_broker, pki, repo, state, old_key, new_key)
    envelope = envelopes.decode(retained_group(secure_broker, pki, secure_fleet))
    old_id = envelopes.key_id(envelopes.load_public_key(old_pub.read_bytes()))
    new_id = envelopes.key_id(envelopes.load_public_key(new_pub.read_bytes()))
    assert {s.keyid for s in envelope.signatures} == {old_id, new_id}
    secure_fleet.wait_report("dev1", lambda r: (root / motd).read_text() == "two")

    # 2. Devices learn the new key (old + new), then drop the old one. The trust sets
    #    overlap, so the version floors stay: nothing is re-applied, no rollback opens.
    floors = shim.agent.state.trust.to_dict()
    shim = secure_shims.restart(shim, trust_files=(old_pub, new_pub))
    shim.wait_event("reported")
    shim = secure_shims.restart(shim, trust_files=(new_pub,))
    shim.wait_event("reported")
    assert shim.agent.state.trust.to_dict() == floors
    assert shim.count("applied") == 0

    # 3. Retire the old key: the controller signs with the new one only.
    commit(repo, "three")
    publish(secure_broker, pki, repo, state, new_key)
    shim.wait_event("applied")
    assert (root / motd).read_text() == "three"

    # 4. A bundle signed with the retired key alone is refused, and changes nothing.
    before, trust = snapshot(root), shim.agent.state.trust.to_dict()
    retired = envelopes.load_private_key(old_key.read_bytes())
    mark = shim.mark()
    secure_fleet.publish_bundle(
        secure_fleet.group("kiosk", group_version(shim) + 1, [FileResource("motd", motd, b"x")]),
        keys=[retired],
    )
    shim.wait_event("refused", after=mark)
    assert snapshot(root) == before and shim.agent.state.trust.to_dict() == trust


def test_recovery_from_a_compromised_key_that_pushed_the_floor_up(
    secure_broker: SecureBroker, secure_fleet: SecureFleet, secure_shims: Shims, pki: Pki,
    tmp_path: Path,
) -> None:  # fmt: skip
    old_key, old_pub = make_key(tmp_path / "old")
    new_key, new_pub = make_key(tmp_path / "new")
    repo, state, motd = tmp_path / "repo", tmp_path / "state", "etc/motd"
    dev1 = shim_broker(secure_broker, pki.device("dev1"))
    commit(repo, "one")
    publish(secure_broker, pki, repo, state, old_key)
    shim = secure_shims.start("dev1", trust_files=(old_pub,), broker=dev1)
    root = shim.config.root
    shim.wait_event("applied")

    # The attacker has the old signing key and the broker: a validly signed bundle with
    # an absurd version. The device cannot tell it from a real one, and applies it.
    stolen = envelopes.load_private_key(old_key.read_bytes())
    mark = shim.mark()
    secure_fleet.publish_bundle(
        secure_fleet.group("kiosk", 10**15, [FileResource("motd", motd, b"evil", 0o644)]),
        keys=[stolen],
    )
    shim.wait_event("applied", after=mark)
    assert (root / motd).read_bytes() == b"evil"
    assert group_version(shim) == 10**15
    # And a reconcile command with the highest sequence there is: every later one would be
    # refused as a replay.
    mark = shim.mark()
    top = secure_fleet.command("dev1", 2**63 - 1, keys=[stolen])
    secure_fleet.publish(secure_fleet.topics.device_command("dev1"), top, retain=False)
    shim.wait_event("command", after=mark)

    # Recovery: a new key. The controller signs with it alone and restores what git says;
    # the device, told to trust only the new key, sees its trust anchors replaced and
    # resets its version floors (as TUF does on a root key change), then applies.
    publish(secure_broker, pki, repo, state, new_key)
    payload = codec.unpack(retained_group(secure_broker, pki, secure_fleet), max_size=1 << 20)
    assert len(payload["signatures"]) == 1
    shim = secure_shims.restart(shim, trust_files=(new_pub,))
    shim.wait_event("applied")
    assert (root / motd).read_text() == "one"
    assert group_version(shim) < 10**15
    # The command floor was reset with the version floors: a genuine command is obeyed.
    mark = shim.mark()
    fresh = envelopes.load_private_key(new_key.read_bytes())
    genuine = secure_fleet.command("dev1", 1, keys=[fresh])
    secure_fleet.publish(secure_fleet.topics.device_command("dev1"), genuine, retain=False)
    assert shim.wait_event("command", after=mark)["seq"] == 1

    # The stolen key is worthless now: its bundles are refused.
    mark = shim.mark()
    forged = [FileResource("motd", motd, b"evil again", 0o644)]
    secure_fleet.publish_bundle(secure_fleet.group("kiosk", 10**16, forged), keys=[stolen])
    shim.wait_event("refused", after=mark)
    assert (root / motd).read_text() == "one"
