"""A shard owner and the leader's controller in one process, on a real mosquitto: the owner
decides the devices from the leader's retained bundles and publishes their statuses,
events and reconcile commands; the leader takes no report and summarises the groups from
those statuses. Owning the shards again (a handoff to a new engine) tells nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from driftkit import TIMEOUT, Devices, DriftWatch, drifted_report, in_sync_report

from setpoint.controller.broker import Backoff, BrokerSettings
from setpoint.controller.drifting import DriftSettings
from setpoint.controller.owning import ShardOwner
from setpoint.controller.service import Controller, ControllerConfig
from setpoint.controller.signing import load_signer
from setpoint.proto.topics import SHARDS, Topics, shard_of

pytestmark = pytest.mark.broker
DEVICES = ("gw-01", "kiosk-01", "kiosk-02")


async def until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait for a condition on the owner (not a message: nothing wakes a waiter)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def leader_and_owner(
    broker: Any, prefix: str, repo: Any, key: Path, tmp_path: Path
) -> AsyncIterator[tuple[Controller, ShardOwner]]:
    settings = DriftSettings(grace=60.0, tick=0.2)
    owner = ShardOwner(
        BrokerSettings(broker.host, broker.port),
        Topics(prefix),
        load_signer(key),
        settings,
        tmp_path / "owner",
        publish_timeout=5.0,
        backoff=Backoff(base=0.05, cap=0.3),
    )
    config = ControllerConfig(
        repo=str(repo.path),
        broker=BrokerSettings(broker.host, broker.port),
        key_path=key,
        state_dir=tmp_path / "leader",
        prefix=prefix,
        backoff=Backoff(base=0.05, cap=0.3),
        publish_timeout=5.0,
    )
    leading = dataclasses.replace(settings, shards=frozenset())
    running = asyncio.create_task(owner.run())
    try:
        async with Controller(config, drift=leading, metrics=owner.metrics) as controller:
            await controller.settle(TIMEOUT)
            owner.own(frozenset(SHARDS))
            yield controller, owner
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_the_owner_decides_and_the_leader_summarises(
    broker: Any, unique_prefix: str, example_repo: Any, signing_key: Path, tmp_path: Path
) -> None:
    async with (
        leader_and_owner(broker, unique_prefix, example_repo, signing_key, tmp_path) as (
            controller,
            owner,
        ),
        DriftWatch(broker.host, broker.port, unique_prefix) as watch,
        Devices(broker.host, broker.port, unique_prefix) as devices,
    ):
        leader = controller.drift
        assert leader is not None
        desired = leader._fleet.desired  # the leader's desired side: the same bundles
        await until(lambda: owner.engine is not None and owner.engine.session_synced)
        for n, name in enumerate(DEVICES):
            await devices.report(in_sync_report(desired[name], seq=n + 1))
        await watch.wait(lambda: all(watch.state(d) == "in_sync" for d in DEVICES))
        await watch.wait(
            lambda: (g := watch.groups.get("kiosks")) is not None and g.counts["in_sync"] == 2
        )
        # The leader took no report; the owner took them all, on the metrics they share.
        assert leader.metrics is owner.metrics
        text = owner.metrics.render().decode()
        assert f"setpoint_reports_received_total {float(len(DEVICES))}" in text
        assert leader.decoded == 0

        # A hand edit on an enforce device: one event, one reconcile command, by the owner.
        await devices.report(drifted_report(desired["kiosk-01"], 10, "motd"))
        await watch.wait(watch.is_("kiosk-01", "drifted"))
        await watch.wait(lambda: [c for c, _ in watch.commands] == ["kiosk-01"])
        await watch.wait(lambda: watch.groups["kiosks"].counts["drifted"] == 1)
        await watch.barrier()
        told = len(watch.drift_events())

        # A handoff (the shards given up, then owned again by a new engine): nothing is
        # decided before the retained picture is whole; nothing equal is told again.
        owner.own(frozenset())
        await until(lambda: owner.owned == frozenset())
        owner.own(frozenset(SHARDS) - {shard_of("gw-01")})
        await until(
            lambda: (
                owner.engine is not None
                and owner.owned != frozenset()
                and owner.engine.session_synced
                and owner.engine.passes >= 1
            )
        )
        assert owner.changes == 3
        engine = owner.engine
        assert engine is not None
        # A device of a shard not owned is not decided: its edit waits for an owner.
        await devices.report(drifted_report(desired["gw-01"], 11, "uplink-interval"))
        before = engine.decoded
        await devices.report(in_sync_report(desired["kiosk-02"], 12))  # one it decides
        await until(lambda: engine.decoded > before)
        passes = engine.passes
        await until(lambda: engine.passes > passes)
        await watch.barrier()
        assert watch.state("gw-01") == "in_sync"
        assert len(watch.drift_events()) == told
        owner.own(frozenset(SHARDS))
        await watch.wait(watch.is_("gw-01", "drifted"))
        await watch.barrier()
        assert [e["device"] for e in watch.drift_events()[told:]] == ["gw-01"]


async def test_an_owner_cancelled_while_it_gives_its_shards_up_stops(
    broker: Any, unique_prefix: str, signing_key: Path, tmp_path: Path
) -> None:
    """A replica stopping gives its shards up (``own(frozenset())``), then cancels the
    owner; the owner, still waiting for its old set's link to end, stops too (it once took
    the cancellation for the old set's and waited for the next change forever)."""
    owner = ShardOwner(
        BrokerSettings(broker.host, broker.port),
        Topics(unique_prefix),
        load_signer(signing_key),
        DriftSettings(grace=60.0, tick=0.2),
        tmp_path / "owner",
        publish_timeout=5.0,
        backoff=Backoff(base=0.05, cap=0.3),
    )
    running = asyncio.create_task(owner.run())
    try:
        owner.own(frozenset(SHARDS))
        await until(lambda: owner.owned == frozenset(SHARDS))
        (serving,) = [t for t in asyncio.all_tasks() if t.get_name() == "setpoint-owner"]
        owner.own(frozenset())
        async with asyncio.timeout(TIMEOUT):
            while not serving.cancelling():  # then the owner awaits its end: cancel it now
                await asyncio.sleep(0)
        assert not serving.done()
        running.cancel()
        done, _ = await asyncio.wait({running}, timeout=TIMEOUT)
        assert running in done, "the owner did not stop when cancelled"
        assert running.cancelled()
    finally:
        running.cancel()
