"""The simulator follows the group pin (``group_version``, proto/SPEC.md 6.4) as the shim
does, so a batched rollout can be run over simulated devices. Pure logic: bundles are
signed for real and handed to a device without a connection."""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from setpoint.proto import bundles, envelopes
from setpoint.proto.bundles import Bundle, FileResource
from setpoint.proto.topics import Topics
from setpoint.sim import Fleet, SimDevice, Verifier

NOW = 1_700_000_100.0
EXPIRES = int(NOW) + 7 * 24 * 3600
KEY = Ed25519PrivateKey.generate()
TOPICS = Topics("setpoint/v1")


def group(version: int) -> bytes:
    bundle = Bundle(
        "group", "kiosks", version, f"c{version}", int(NOW), EXPIRES,
        resources=(FileResource("motd", "etc/motd", f"v{version}".encode()),),
    )  # fmt: skip
    return envelopes.sign(envelopes.GROUP_BUNDLE_TYPE, bundles.encode(bundle), [KEY])


def device(version: int, pin: int | None) -> bytes:
    bundle = Bundle(
        "device", "k-1", version, f"d{version}", int(NOW), EXPIRES,
        group="kiosks", group_version=pin,
    )  # fmt: skip
    return envelopes.sign(envelopes.DEVICE_BUNDLE_TYPE, bundles.encode(bundle), [KEY])


@pytest.fixture
def sim() -> SimDevice:
    verifier = Verifier(envelopes.trusted_keys([KEY.public_key()]))
    fleet = Fleet(TOPICS, verifier, rng=random.Random(1), clock=lambda: NOW)
    return SimDevice("k-1", fleet)


def send(sim: SimDevice, topic: str, data: bytes) -> None:
    sim.on_message(topic, data, True)


def running(sim: SimDevice) -> tuple[int, int] | None:
    if sim.applied_group is None or sim.applied_device is None:
        return None
    return sim.applied_group.bundle.version, sim.applied_device.bundle.version


def test_a_device_running_its_group_holds_a_bundle_above_the_pin_until_the_pin_moves(
    sim: SimDevice,
) -> None:
    desired, grouped = TOPICS.device_desired("k-1"), TOPICS.group_desired("kiosks")
    send(sim, desired, device(1, pin=1))
    send(sim, grouped, group(1))
    assert running(sim) == (1, 1)
    send(sim, grouped, group(2))  # the rollout publishes v2; this device's batch has not come
    assert running(sim) == (1, 1)
    assert sim.refusals == []
    send(sim, desired, device(2, pin=1))  # a new device bundle, same pin: still held
    assert running(sim) == (1, 2)
    send(sim, desired, device(3, pin=2))  # released: the held v2 applies, not sent again
    assert running(sim) == (2, 3)
    assert sim.build_report().applied_group is not None
    assert sim.build_report().applied_group.version == 2


def test_a_device_that_runs_nothing_of_its_group_takes_the_newest_whatever_the_pin(
    sim: SimDevice,
) -> None:
    send(sim, TOPICS.device_desired("k-1"), device(1, pin=1))
    send(sim, TOPICS.group_desired("kiosks"), group(2))  # first start: nothing runs yet
    assert running(sim) == (2, 1)


def test_the_pin_is_not_a_floor(sim: SimDevice) -> None:
    desired, grouped = TOPICS.device_desired("k-1"), TOPICS.group_desired("kiosks")
    send(sim, desired, device(1, pin=None))
    send(sim, grouped, group(2))
    assert running(sim) == (2, 1)
    send(sim, desired, device(2, pin=1))  # a pin below what runs: no rollback
    assert running(sim) == (2, 2)
    assert sim.refusals == []
