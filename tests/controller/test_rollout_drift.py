"""The drift engine and the rollouts extension in one controller, as ``setpoint controller``
runs them: devices held back by a batch are ``pending`` (waiting for their batch), never
overdue; the engine's own statuses reach the rollout in-process and release the next batch.

Real controller, real git, real mosquitto; devices are played by a plain MQTT client
publishing real reports (``driftkit``). ``desired_for`` is also tested purely.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from driftkit import Devices, DriftWatch, in_sync_report

from setpoint.controller.broker import Backoff, BrokerSettings
from setpoint.controller.drifting import DriftEngine, DriftSettings, desired_for, refresh
from setpoint.controller.planning import Current
from setpoint.controller.rendering import Target
from setpoint.controller.rolling import Rollouts
from setpoint.controller.service import Controller, ControllerConfig
from setpoint.proto.bundles import Bundle, FileResource

pytestmark = pytest.mark.broker
DEVICES = ("k-1", "k-2")
GROUP = (
    "rollout: {batch: 1, order: [k-1, k-2]}\nresources:\n"
    "  - {id: motd, kind: file, path: etc/motd, content: %s}\n"
)


# --- desired_for, pure ----------------------------------------------------------------


def _bundle(kind: str, target: str, version: int, **kw: Any) -> Bundle:
    return Bundle(kind, target, version, "c" * 40, 0, 1, **kw)  # type: ignore[arg-type]


def test_desired_for_takes_the_pin_as_the_desired_group_version() -> None:
    motd = FileResource("motd", "etc/motd", b"v2", 0o644)
    published = {
        Target("group", "kiosks"): Current(_bundle("group", "kiosks", 5, resources=(motd,))),
        Target("device", "held"): Current(
            _bundle("device", "held", 3, group="kiosks", group_version=4)
        ),
        Target("device", "released"): Current(
            _bundle("device", "released", 3, group="kiosks", group_version=5)
        ),
        Target("device", "free"): Current(_bundle("device", "free", 1, group="kiosks")),
    }
    fleet = desired_for(published)
    held = fleet.desired["held"]
    assert (held.group_version, held.pinned_from, held.group_digest) == (4, 5, "")
    for name in ("released", "free"):
        assert fleet.desired[name].group_version == 5
        assert fleet.desired[name].pinned_from is None
        assert (
            fleet.desired[name].group_digest
            == published[Target("group", "kiosks")].bundle.content_digest()
        )
    assert sorted(fleet.members["kiosks"]) == ["free", "held", "released"]
    # Work proportional to what changed: a device whose entries (its own, its group's)
    # are the same objects keeps its Desired; one whose entry moved gets a new one.
    moved = {
        **published,
        Target("device", "free"): Current(_bundle("device", "free", 2, group="kiosks")),
    }
    again = desired_for(moved, fleet)
    assert again.desired["held"] is fleet.desired["held"]
    assert again.desired["free"] is not fleet.desired["free"]
    assert again.desired["free"].device_version == 2
    assert sorted(again.members["kiosks"]) == ["free", "held", "released"]
    # It names the devices whose Desired changed (no map is compared): one re-published
    # with the same content is not among them; one gone is.
    assert again.changed == {"free"}
    same = {**moved, Target("device", "held"): Current(published[Target("device", "held")].bundle)}
    assert desired_for(same, again).changed == set()
    gone = {t: c for t, c in moved.items() if t != Target("device", "released")}
    assert desired_for(gone, again).changed == {"released"}


def test_refresh_follows_the_changed_targets_to_what_desired_for_gives() -> None:
    """Work proportional to what changed: refreshing a fleet in place from the targets
    that changed gives what working it out whole gives, through a group's new version,
    a device moving groups, a group removed (its members go) and added back (they come
    back though their own bundles did not change), and a device removed."""
    motd = FileResource("motd", "etc/motd", b"v1", 0o644)

    def group(name: str, version: int) -> Current:
        return Current(_bundle("group", name, version, resources=(motd,)))

    def device(name: str, version: int, in_group: str) -> Current:
        return Current(_bundle("device", name, version, group=in_group))

    published: dict[Target, Current] = {
        Target("group", "a"): group("a", 1),
        Target("group", "b"): group("b", 1),
        **{Target("device", f"a{n}"): device(f"a{n}", 1, "a") for n in range(3)},
        Target("device", "b0"): device("b0", 1, "b"),
    }
    fleet = desired_for(published)

    def step(changes: dict[Target, Current | None]) -> tuple[set[str], set[str]]:
        before = desired_for(published)
        for target, current in changes.items():
            if current is None:
                published.pop(target, None)
            else:
                published[target] = current
        changed, groups = refresh(fleet, published, changes)
        whole = desired_for(published, before)
        assert fleet.desired == whole.desired
        assert fleet.members == whole.members
        assert (fleet.groups, fleet.commits) == (whole.groups, whole.commits)
        assert changed == whole.changed
        return changed, groups

    assert step({Target("group", "a"): group("a", 2)}) == ({"a0", "a1", "a2"}, {"a"})
    assert step({Target("device", "a1"): device("a1", 2, "b")}) == ({"a1"}, set())
    assert fleet.members == {"a": {"a0", "a2"}, "b": {"a1", "b0"}}
    assert step({Target("group", "b"): None}) == ({"a1", "b0"}, {"b"})
    assert set(fleet.desired) == {"a0", "a2"}
    assert step({Target("group", "b"): group("b", 2)}) == ({"a1", "b0"}, {"b"})
    assert step({Target("device", "a0"): None}) == ({"a0"}, set())
    assert step({Target("device", "a2"): Current(published[Target("device", "a2")].bundle)}) == (
        set(),
        set(),
    )


# --- In a running controller ------------------------------------------------------------


@contextlib.asynccontextmanager
async def controller(
    broker: Any, prefix: str, repo: Any, key: Path, state: Path
) -> AsyncIterator[tuple[DriftEngine, Rollouts]]:
    config = ControllerConfig(
        repo=str(repo.path),
        broker=BrokerSettings(broker.host, broker.port),
        key_path=key,
        state_dir=state,
        prefix=prefix,
        backoff=Backoff(base=0.05, cap=0.3),
        publish_timeout=5.0,
    )
    # A grace far below the test's length: a held device that were judged against the
    # published version would turn overdue at the first tick.
    async with Controller(config, drift=DriftSettings(grace=0.01, tick=0.05)) as running:
        engine = running.drift
        assert engine is not None
        async with asyncio.timeout(10):
            await engine.ready.wait()
        yield engine, running.rollouts


async def test_held_devices_wait_for_their_batch_and_the_engine_releases_the_next(
    broker: Any, unique_prefix: str, make_repo: Any, signing_key: Path, tmp_path: Path
) -> None:
    repo = make_repo(
        {
            "groups/kiosks.yaml": GROUP % "v1",
            **{f"devices/{d}.yaml": "group: kiosks\n" for d in DEVICES},
        }
    )
    async with (
        DriftWatch(broker.host, broker.port, unique_prefix) as watch,
        Devices(broker.host, broker.port, unique_prefix) as devices,
        controller(broker, unique_prefix, repo, signing_key, tmp_path / "state") as (
            engine,
            rollouts,
        ),
    ):
        seq = iter(range(1, 1000))

        async def report_all(names: tuple[str, ...] = DEVICES) -> None:
            for name in names:
                await devices.report(in_sync_report(engine._fleet.desired[name], next(seq)))

        await report_all()
        await watch.wait(lambda: all(watch.state(d) == "in_sync" for d in DEVICES))

        repo.commit({"groups/kiosks.yaml": GROUP % "v2"}, "motd v2")

        def batch_one_out() -> bool:
            fleet = engine._fleet.desired
            return (
                "k-1" in fleet
                and fleet["k-1"].group_version == 2
                and fleet["k-1"].pinned_from is None
                and fleet["k-2"].pinned_from == 2
            )

        await engine.wait_for(batch_one_out)
        assert engine._fleet.desired["k-2"].group_version == 1
        # k-2 applies its new device bundle (the pin) and stays on group v1: pending for
        # its batch, and still so after many ticks far past the grace.
        await report_all(("k-2",))
        await watch.wait(lambda: "waiting for its batch" in watch.drift["k-2"].reason)
        passes = engine.passes
        await engine.wait_for(lambda: engine.passes >= passes + 10)
        await watch.barrier()
        held = watch.drift["k-2"]
        assert held.state == "pending" and held.desired_version == 1, held
        assert held.reason == (
            "waiting for its batch: group kiosks v2 is rolling out; pinned to v1 (runs v1)"
        )
        assert len(rollouts.ledger.rollouts["kiosks"].released) == 1
        # k-1's in_sync comes from the engine in-process: the rollout completes batch 1 and
        # releases batch 2 by itself; k-2's pin moves and it is asked for v2 like anyone.
        await report_all(("k-1",))
        await watch.wait(lambda: watch.state("k-1") == "in_sync")
        await engine.wait_for(lambda: engine._fleet.desired["k-2"].pinned_from is None)
        ro = rollouts.ledger.rollouts["kiosks"]
        assert len(ro.released) == 2 and len(ro.completed) == 1
        await watch.wait(lambda: watch.drift["k-2"].reason.startswith("overdue: "))
        await report_all(("k-2",))
        await watch.wait(lambda: watch.state("k-2") == "in_sync")
        await engine.wait_for(lambda: rollouts.ledger.rollouts["kiosks"].done_at is not None)
    states = {e["state"] for e in watch.drift_events("k-2")}
    assert states <= {"unknown", "in_sync", "pending"}, states  # never drifted or failed
