"""Rule 2 against a real mosquitto: a device that keeps reporting an old version gets the
envelope it lacks published again, the same bytes, once per backoff.

The device is a plain MQTT client publishing real reports (``driftkit.Devices``); the
subscriber on the group's desired topic is what a device's shim sees.
"""

from __future__ import annotations

import logging
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from driftkit import Devices, in_sync_report, run_drift
from fleetkit import FLEET
from mqttkit import Subscriber

from setpoint.proto import bundles, envelopes
from setpoint.proto.topics import Topics
from setpoint.proto.trust import PAYLOAD_TYPES

pytestmark = pytest.mark.broker


class Desired(Subscriber):
    """Every message on one group's desired topic, in order (the retained one first)."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        super().__init__(host, port, f"desired-{secrets.token_hex(4)}")
        self.topic = topic
        self.payloads: list[bytes] = []

    def filters(self) -> list[tuple[str, int]]:
        return [(self.topic, 1)]

    async def handle(self, topic: str, payload: bytes) -> None:
        self.payloads.append(payload)


async def test_a_device_that_stays_behind_gets_the_same_envelope_again_once_per_backoff(
    broker: Any,
    unique_prefix: str,
    example_repo: Any,
    signing_key: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "setpoint.controller.service")
    topics = Topics(unique_prefix)
    async with (
        run_drift(
            broker,
            unique_prefix,
            example_repo,
            signing_key,
            tmp_path / "state",
            resend_after=0.5,
            tick=0.1,
        ) as (controller, engine),
        Devices(broker.host, broker.port, unique_prefix) as devices,
    ):
        old = engine._fleet.desired["kiosk-01"]
        await devices.report(in_sync_report(old, seq=1))
        await engine.wait_for(lambda: engine.statuses()["kiosk-01"].state == "in_sync")

        kiosks = FLEET["groups/kiosks.yaml"].replace("value: info", "value: debug")
        example_repo.commit({"groups/kiosks.yaml": kiosks}, "kiosks: debug logs")
        await controller.settle(10)
        await engine.wait_for(lambda: engine._fleet.desired["kiosk-01"].group_version == 2)
        async with Desired(broker.host, broker.port, topics.group_desired("kiosks")) as seen:
            await seen.wait(lambda: len(seen.payloads) >= 1)  # what the broker retains: v2
            published = seen.payloads[0]
            # The device keeps reporting v1: the engine "lost" nothing here, but the device
            # stays behind all the same, which is all the controller can see.
            await devices.report(in_sync_report(old, seq=2))
            await engine.wait_for(lambda: engine.statuses()["kiosk-01"].state == "pending")
            await seen.wait(lambda: len(seen.payloads) >= 2)
            assert seen.payloads[1] == published  # the same bytes: version and signature
            trusted = controller.signer.trusted
            resent = bundles.decode(
                envelopes.verify(seen.payloads[1], trusted, payload_type=PAYLOAD_TYPES["group"])
            )
            assert (resent.target, resent.version) == ("kiosks", 2)

            # It keeps reporting v1; ticks pass; the backoff (60 s) holds the next re-send.
            passes = engine.passes
            for seq in range(3, 8):
                await devices.report(in_sync_report(old, seq=seq))
            await engine.wait_for(lambda: engine.passes >= passes + 20)
            assert len(seen.payloads) == 2
            assert engine.metrics.resent.labels("behind")._value.get() == 1
            [line] = [r.getMessage() for r in caplog.records if "re-sent" in r.getMessage()]
            assert line.startswith("re-sent group kiosks v2: kiosk-01 reports v1 for ")
            assert "the engine may have lost the retained bundle" in line

            # In sync on v2: the backoff starts over (nothing is kept for the target).
            await devices.report(in_sync_report(engine._fleet.desired["kiosk-01"], seq=9))
            await engine.wait_for(lambda: engine.statuses()["kiosk-01"].state == "in_sync")
            await engine.wait_for(lambda: not controller._resent)


async def test_a_device_that_refused_the_version_gets_nothing_again(
    broker: Any,
    unique_prefix: str,
    example_repo: Any,
    signing_key: Path,
    tmp_path: Path,
) -> None:
    from dataclasses import replace

    from setpoint.proto.reports import Refusal

    topics = Topics(unique_prefix)
    async with (
        run_drift(
            broker,
            unique_prefix,
            example_repo,
            signing_key,
            tmp_path / "state",
            resend_after=0.3,
            tick=0.1,
        ) as (_controller, engine),
        Devices(broker.host, broker.port, unique_prefix) as devices,
        Desired(broker.host, broker.port, topics.group_desired("kiosks")) as seen,
    ):
        desired = engine._fleet.desired["kiosk-01"]
        await seen.wait(lambda: len(seen.payloads) >= 1)
        behind = in_sync_report(desired, seq=1, applied_group=None)
        refusal = Refusal("kiosks", "group", desired.group_version, "signature", "bad", 0)
        await devices.report(replace(behind, refusals=(refusal,)))
        await engine.wait_for(lambda: engine.statuses()["kiosk-01"].state == "rejected")
        passes = engine.passes
        await engine.wait_for(lambda: engine.passes >= passes + 20)
        assert len(seen.payloads) == 1
        assert engine.metrics.resent.labels("behind")._value.get() == 0
