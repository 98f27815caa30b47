"""Rule 1 against a real mosquitto: a slow PUBACK makes the controller read its retained
bundles again through a fresh subscription, and publish again what the broker holds older
than what it published.

What a clustered engine does when it loses a retained bundle (it acknowledged a PUBLISH it
never stored, after its controller's own subscription had received it: docs/scale-out.md)
is made here with mosquitto's ACL file: for a moment the controller's user may not read
device kiosk-01's desired topic, and another client puts an older bundle there (or clears
it), which the controller's live subscription never receives. The broker really holds the
older bundle; the controller's view says v2. The slow PUBACK is real too: mosquitto is
stopped (SIGSTOP) while the controller publishes a commit, for longer than ``slow_ack``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fleetkit import FLEET

from setpoint.controller.broker import (
    Backoff,
    BrokerSettings,
    Connected,
    Fact,
    Link,
    Message,
    Subscription,
)
from setpoint.controller.drifting import DriftSettings
from setpoint.controller.rendering import Target
from setpoint.controller.service import Controller, ControllerConfig
from setpoint.mosquitto import Broker
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker

USER = "controller"  # the controller's user name in the ACL file
SLOW_ACK = 0.5
STALL = 4 * SLOW_ACK  # how long mosquitto stays stopped once the PUBLISH is written
TIMEOUT = 20.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh mosquitto with an ACL file (every client may do anything, for now); the
    ``observe`` fixture's observers connect to it too."""
    directory = tmp_path / "broker"
    broker = Broker(directory)
    broker.conf.write_text(broker.conf.read_text() + f"acl_file {directory / 'test.acl'}\n")
    write_acl(broker, hidden=None)
    with broker:
        yield broker


def write_acl(broker: Broker, hidden: str | None) -> None:
    deny = f"topic deny {hidden}\n" if hidden else ""
    (broker.dir / "test.acl").write_text(
        f"topic readwrite #\n\nuser {USER}\ntopic readwrite #\n{deny}", encoding="utf-8"
    )


async def hide_from_controller(broker: Broker, topic: str | None) -> None:
    """Deny the controller's user ``topic`` (None: deny nothing) and return once mosquitto
    has read its ACL again (it logs that before it reads another packet)."""
    assert broker.proc is not None
    before = broker.log.read_text().count("Reloading config.")
    write_acl(broker, topic)
    broker.proc.send_signal(signal.SIGHUP)
    async with asyncio.timeout(TIMEOUT):
        while broker.log.read_text().count("Reloading config.") <= before:
            await asyncio.sleep(0.02)


async def wait_for(predicate: Any, timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture(params=["mosquitto", pytest.param("nats", marks=pytest.mark.engine)])
def engine(request: pytest.FixtureRequest) -> tuple[str, int]:
    """A real broker's host and port: a fresh mosquitto, or a node of the run's NATS
    cluster (nats-server, MQTT 3.1.1)."""
    if request.param == "mosquitto":
        broker = request.getfixturevalue("broker")
        return broker.host, broker.port
    host, port = request.getfixturevalue("nats_cluster").urls[0].removeprefix("mqtt://").split(":")
    return host, int(port)


async def test_the_link_reads_the_retained_topics_again_on_the_same_connection(
    engine: tuple[str, int], unique_prefix: str
) -> None:
    """``Link.reread``: the SUBSCRIBE of a live filter, sent again, brings what the broker
    retains now (here: what another client put there), behind what came live before it;
    the connection stays, and live messages keep coming once each."""
    topics = Topics(unique_prefix)
    facts: list[Fact] = []
    link = Link(
        BrokerSettings(*engine),
        topics,
        [Subscription(topics.all_group_desired()), Subscription(topics.all_device_desired())],
        facts.append,
        backoff=Backoff(0.1, 1.0),
        publish_timeout=20.0,
    )
    a, b = topics.group_desired("a"), topics.group_desired("b")

    def payloads() -> list[tuple[str, bytes]]:
        return [(f.topic, f.payload) for f in facts if isinstance(f, Message)]

    task = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(60):
            session = await link.wait_connected()
            await link.barrier()
            await link.publish(a, b"a1", retain=True)
            await link.barrier()
            assert payloads() == [(a, b"a1")]
            facts.clear()
            await link.reread([topics.all_group_desired()])
            assert payloads() == [(a, b"a1")]  # what the broker retains, read again
            facts.clear()
            await link.publish(b, b"b1", retain=True)  # live: still arrives, once
            await link.barrier()
            assert payloads() == [(b, b"b1")]
            assert link.connected and await link.wait_connected() is session
            assert not [f for f in facts if isinstance(f, Connected)]
            with pytest.raises(ValueError, match="not subscriptions of this link"):
                await link.reread([topics.all_reported()])
            took = await link.probe()
            assert took >= 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("behind_its_back", ["older", "cleared"])
async def test_a_slow_puback_makes_the_controller_read_again_and_publish_what_was_lost(
    tmp_path: Path,
    broker: Broker,
    example_repo: Any,
    signing_key: Path,
    unique_prefix: str,
    observe: Any,
    caplog: pytest.LogCaptureFixture,
    behind_its_back: str,
) -> None:
    caplog.set_level(logging.INFO, "setpoint.controller.service")
    topics = Topics(unique_prefix)
    hidden, device = topics.device_desired("kiosk-01"), "device/kiosk-01"
    config = ControllerConfig(
        repo=str(example_repo.path),
        broker=BrokerSettings(broker.host, broker.port, username=USER),
        key_path=signing_key,
        state_dir=tmp_path / "state",
        prefix=unique_prefix,
        backoff=Backoff(base=0.05, cap=0.3),
        publish_timeout=5.0,
        slow_ack=SLOW_ACK,
    )
    seen = observe()
    async with (
        Controller(config, drift=DriftSettings(grace=60.0, tick=0.2)) as controller,
        seen,
    ):
        assert controller.drift is not None
        metrics = controller.drift.metrics
        await controller.settle(TIMEOUT)
        await seen.wait(lambda: seen.version(device) == 1)
        v1 = seen.retained[device]
        kiosk = FLEET["devices/kiosk-01.yaml"].replace("site: lobby", "site: hall")
        example_repo.commit({"devices/kiosk-01.yaml": kiosk}, "kiosk-01 moves to the hall")
        await seen.wait(lambda: seen.version(device) == 2)
        await wait_for(lambda: not controller._rereads)  # nothing unconfirmed so far

        # Behind the controller's back: the broker comes to hold an older bundle (or
        # none) on kiosk-01's topic, and the controller's subscription is not told.
        await hide_from_controller(broker, hidden)
        async with aiomqtt.Client(broker.host, broker.port) as writer:
            await writer.publish(hidden, v1 if behind_its_back == "older" else b"", 1, True)
        lost = 1 if behind_its_back == "older" else 0
        await seen.wait(lambda: seen.version(device) == lost)
        await hide_from_controller(broker, None)
        # The live view cannot see it: a pass plans nothing for kiosk-01.
        await controller.settle(TIMEOUT)
        view = controller.retained.entries[Target("device", "kiosk-01")]  # type: ignore[union-attr]
        assert view.bundle is not None and view.bundle.version == 2
        assert seen.version(device) == lost
        assert metrics.rereads._value.get() == 0

        # A commit published while mosquitto is stopped: its PUBACK comes late.
        kiosks = FLEET["groups/kiosks.yaml"].replace("value: info", "value: debug")
        with broker.stalled():
            example_repo.commit({"groups/kiosks.yaml": kiosks}, "kiosks: debug logs")
            await wait_for(lambda: Target("group", "kiosks") in controller._attempted)
            await asyncio.sleep(STALL)
        # It took over SLOW_ACK: a probe comes back promptly, the retained bundles are
        # read again, kiosk-01 is found older than published and published again.
        await seen.wait(lambda: seen.version(device) == 2)
        await seen.wait(lambda: seen.version("group/kiosks") == 2)
        await controller.settle(TIMEOUT)
        assert seen.bundle(device) == controller.desired()[Target("device", "kiosk-01")]

    lines = [r.getMessage() for r in caplog.records]
    slow = [line for line in lines if "to acknowledge v2 of group kiosks" in line]
    assert slow, lines
    assert slow[0].startswith("the broker took ")
    assert f"(over --slow-ack {SLOW_ACK:g}s)" in slow[0]
    assert any(line.startswith("reading the retained bundles again: ") for line in lines)
    assert any(line.startswith("published device/kiosk-01 v2 (restore)") for line in lines)
    assert metrics.slow_acks.labels("group")._value.get() >= 1
    assert metrics.rereads._value.get() >= 1
