"""Simulated devices against a real mosquitto and a real controller: they converge, refuse,
fail, drift, heal and come back like shims do on the wire."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from setpoint.commands import keys
from setpoint.controller.broker import Backoff, BrokerSettings
from setpoint.controller.service import Controller, ControllerConfig
from setpoint.mosquitto import Broker
from setpoint.proto import reports
from setpoint.proto.topics import Topics
from setpoint.sim import Faults, SimConfig, Swarm, fleetrepo, mqtt, running

DEVICES = 50
TIMEOUT = 30.0


class Reports:
    """A plain subscriber to every device's reported state and presence."""

    def __init__(self, broker: Broker, prefix: str) -> None:
        self.broker, self.topics = broker, Topics(prefix)
        self.latest: dict[str, reports.Report] = {}
        self.presence: dict[str, list[bytes]] = {}
        self.changed = asyncio.Event()
        self.conn: mqtt.Connection | None = None

    def _message(self, topic: str, payload: bytes, retain: bool) -> None:
        ref = self.topics.parse(topic)
        if ref.kind == "device-reported" and payload:
            report = reports.decode(payload)
            assert report.device == ref.name  # the topic binds the payload
            self.latest[ref.name] = report
        elif ref.kind == "device-presence":
            self.presence.setdefault(ref.name, []).append(payload)
        self.changed.set()

    async def __aenter__(self) -> Reports:
        self.conn = await mqtt.open_connection(
            self.broker.host, self.broker.port, "reports-watcher", on_message=self._message
        )
        await self.conn.subscribe(
            [(self.topics.all_reported(), 1), (self.topics.all_presence(), 1)]
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.conn is not None
        self.conn.disconnect()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not condition():
                await self.changed.wait()
                self.changed.clear()


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    keys.generate(tmp_path / "keys")
    fleetrepo.create(tmp_path / "repo", DEVICES, groups=2)
    return tmp_path


@contextlib.asynccontextmanager
async def controller(broker: Broker, fleet: Path, prefix: str) -> AsyncIterator[Controller]:
    config = ControllerConfig(
        repo=str(fleet / "repo"),
        broker=BrokerSettings(broker.host, broker.port),
        key_path=fleet / "keys" / keys.PRIVATE_NAME,
        state_dir=fleet / "state",
        prefix=prefix,
        backoff=Backoff(base=0.05, cap=0.3),
        publish_timeout=5.0,
    )
    async with Controller(config) as running_controller:
        yield running_controller


@contextlib.asynccontextmanager
async def swarm(
    broker: Broker, fleet: Path, prefix: str, devices: int = DEVICES, **overrides: object
) -> AsyncIterator[Swarm]:
    overrides.setdefault("trust", (fleet / "keys" / keys.PUBLIC_NAME,))
    config = SimConfig(
        host=broker.host, port=broker.port, devices=devices, prefix=prefix, connect_rate=0,
        seed=7, **overrides,  # type: ignore[arg-type]
    )  # fmt: skip
    ready = asyncio.Event()
    sim = Swarm(config, lambda info: ready.set())
    stop = asyncio.Event()
    task = asyncio.create_task(sim.run(stop))
    async with asyncio.timeout(TIMEOUT):
        await ready.wait()
    try:
        yield sim
    finally:
        stop.set()
        await task


def versions(r: reports.Report | None) -> tuple[int, int] | None:
    if r is None or r.applied_group is None or r.applied_device is None:
        return None
    return r.applied_group.version, r.applied_device.version


async def test_fifty_devices_converge_and_follow_a_commit(
    broker: Broker, fleet: Path, unique_prefix: str
) -> None:
    async with Reports(broker, unique_prefix) as seen:
        async with (
            controller(broker, fleet, unique_prefix),
            swarm(broker, fleet, unique_prefix) as sim,
        ):
            await converge(seen, sim, fleet)
        # Stopped cleanly: every device said offline before disconnecting.
        await seen.until(
            lambda: (
                len(seen.presence) == DEVICES
                and all(p[-1] == b"offline" for p in seen.presence.values())
            )
        )


async def converge(seen: Reports, sim: Swarm, fleet: Path) -> None:
    names = [d.id for d in sim.devices]
    await seen.until(lambda: all(versions(seen.latest.get(n)) == (1, 1) for n in names))
    first = seen.latest[names[0]]
    assert first.mode == "enforce" and first.group == "sim-g0"
    assert [r.id for r in first.resources] == ["motd", "log-level", "interval"]
    assert all(r.status == "ok" and len(r.digest) == 64 for r in first.resources)
    assert seen.latest[names[1]].mode == "observe"
    assert all(p[-1] == b"online" for p in seen.presence.values())

    fleetrepo.bump(fleet / "repo", group=0, revision=2)  # the controller watches the repo

    def moved() -> bool:
        return all(
            versions(seen.latest.get(n)) == ((2, 1) if i % 2 == 0 else (1, 1))
            for i, n in enumerate(names)
        )

    await seen.until(moved)
    assert sim.fleet.verifier is not None
    # 50 device bundles + 2 group bundles + the new group bundle: verified once each.
    assert sim.fleet.verifier.verified == DEVICES + 3
    assert sim.fleet.counters.refused == 0


async def test_devices_that_do_not_trust_the_key_refuse_and_apply_nothing(
    broker: Broker, fleet: Path, unique_prefix: str
) -> None:
    keys.generate(fleet / "other")
    async with (
        Reports(broker, unique_prefix) as seen,
        controller(broker, fleet, unique_prefix),
        swarm(broker, fleet, unique_prefix, 4, trust=(fleet / "other" / keys.PUBLIC_NAME,)),
    ):
        await seen.until(lambda: len(seen.latest) == 4)
        for report in seen.latest.values():
            assert versions(report) is None
            assert [(r.kind, r.reason) for r in report.refusals] == [("device", "signature")]


async def test_injected_failures_and_refusals_are_reported(
    broker: Broker, fleet: Path, unique_prefix: str
) -> None:
    async with Reports(broker, unique_prefix) as seen, controller(broker, fleet, unique_prefix):
        async with swarm(broker, fleet, unique_prefix, 2, faults=Faults(fail=1.0)):
            await seen.until(lambda: len(seen.latest) == 2)
            for report in seen.latest.values():
                assert report.failure is not None and "simulated" in report.failure.error
                assert versions(report) is None
        seen.latest.clear()
        async with swarm(broker, fleet, unique_prefix, 2, faults=Faults(refuse=1.0)):
            await seen.until(lambda: len(seen.latest) == 2)
            for report in seen.latest.values():
                assert [r.reason for r in report.refusals] == ["refused"]


async def test_drift_heals_in_enforce_mode_and_churn_brings_the_will(
    broker: Broker, fleet: Path, unique_prefix: str
) -> None:
    faults = Faults(heal_after=0.0, offline_for=(0.05, 0.1))
    async with (
        Reports(broker, unique_prefix) as seen,
        controller(broker, fleet, unique_prefix),
        swarm(broker, fleet, unique_prefix, 2, faults=faults) as sim,
    ):
        enforce = sim.devices[0]
        await seen.until(lambda: versions(seen.latest.get(enforce.id)) == (1, 1))
        assert enforce.drift()
        await seen.until(
            lambda: any(r.status == "drifted" for r in seen.latest[enforce.id].resources)
        )
        enforce.heal()
        await seen.until(
            lambda: any(r.status == "healed" for r in seen.latest[enforce.id].resources)
        )
        assert enforce.conn is not None
        enforce.conn.abort()  # dropped without DISCONNECT: the will says offline
        await seen.until(lambda: seen.presence[enforce.id][-2:] == [b"offline", b"online"])


def test_shards_split_a_fleet_under_the_descriptor_limit() -> None:
    config = SimConfig("127.0.0.1", 1, devices=25, max_per_process=10, seed=1)
    parts = running.shards(config)
    assert [p.devices for p in parts] == [9, 8, 8]
    assert [p.first for p in parts] == [0, 9, 17]
    ids = [i for p in parts for i in p.device_ids()]
    assert ids == config.device_ids() and len(set(ids)) == 25


def test_shards_split_a_fleet_over_source_addresses_then_processes() -> None:
    config = SimConfig("127.0.0.1", 1, devices=25, max_per_process=5, max_per_address=10, seed=1)
    layout = running.plan(config)
    assert [(p.source, p.devices) for p in layout.parts] == [
        (None, 5), (None, 5), ("127.0.0.2", 5), ("127.0.0.2", 5), ("127.0.0.3", 5),
    ]  # fmt: skip
    assert [i for p in layout.parts for i in p.device_ids()] == config.device_ids()
    assert "--max-per-process 5" in layout.why and "--max-per-address 10" in layout.why


def test_a_fleet_needing_more_addresses_than_a_remote_broker_allows_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from setpoint.cli import main

    argv = ["sim", "--broker", "mqtt://192.0.2.1:1883", "--devices", "3", "--echo"]
    assert main([*argv, "--max-per-address", "2"]) == 2
    assert "source addresses" in capsys.readouterr().err


def test_the_descriptor_limit_is_raised_only_as_far_as_allowed() -> None:
    soft, hard = running.resource.getrlimit(running.resource.RLIMIT_NOFILE)
    assert running.raise_fd_limit(soft) == soft  # what is there is enough: unchanged
    assert running.raise_fd_limit(hard) == hard
    beyond = running.raise_fd_limit(hard + 1)  # needs CAP_SYS_RESOURCE: else the hard limit
    assert beyond in (hard, hard + 1)
    running.resource.setrlimit(running.resource.RLIMIT_NOFILE, (soft, max(soft, hard)))


def test_cli_runs_several_processes_on_several_source_addresses(broker: Broker) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "setpoint.cli", "sim", "--broker", broker.url, "--devices", "12",
         "--echo", "--max-per-process", "4", "--max-per-address", "6", "--duration", "0.5",
         "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["event"] == "ready" and events[0]["processes"] == 4
    assert events[0]["addresses"] == ["default", "127.0.0.2"]
    assert "--max-per-address 6" in events[0]["split"]
    assert events[0]["devices"] == 12 and events[-1]["event"] == "stopped"
    log = broker.log.read_text()
    assert log.count("New client connected from 127.0.0.2") == 6, log  # the second address


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "3"], "pass --trust"),
        (["--devices", "3", "--echo", "--fail-rate", "2"], "--fail-rate is a probability"),
        (["--devices", "3", "--echo", "--id-prefix", "Bad/"], "is not valid"),
        (["--devices", "3", "--echo", "--prefix", "a/+/b"], "prefix"),
        (["--devices", "3", "--trust", "/nonexistent.pub"], "no such file"),
    ],
)
def test_cli_refuses_bad_input(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from setpoint.cli import main

    assert main(["sim", "--broker", "mqtt://127.0.0.1:1", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_bad_rate_and_an_unreachable_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from setpoint.cli import main

    with pytest.raises(SystemExit):
        main(["sim", "--broker", "mqtt://127.0.0.1:1", "--devices", "2", "--drift-rate", "-1"])
    assert "a rate must be 0 or more" in capsys.readouterr().err
    from setpoint.mosquitto.broker import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    assert main(["sim", "--broker", url, "--devices", "2", "--echo", "--duration", "1"]) == 1
    assert "cannot connect" in capsys.readouterr().err


async def test_a_batched_rollout_releases_simulated_devices_batch_by_batch(
    broker: Broker, tmp_path: Path, unique_prefix: str
) -> None:
    keys.generate(tmp_path / "keys")
    fleetrepo.create(tmp_path / "repo", 20, rollout="{batch: 5, pause: 1h}")
    async with (
        Reports(broker, unique_prefix) as seen,
        controller(broker, tmp_path, unique_prefix),
        swarm(broker, tmp_path, unique_prefix, 20) as sim,
    ):
        await seen.until(
            lambda: all(versions(seen.latest.get(d.id)) == (1, 1) for d in sim.devices)
        )
        fleetrepo.bump(tmp_path / "repo", group=0, revision=2)

        def holding(d: object) -> int | None:
            want = d.want_group  # type: ignore[attr-defined]
            return None if want is None else want.bundle.version

        # Every device has the new group bundle; one batch is released, the pause is long.
        await seen.until(
            lambda: (
                all(holding(d) == 2 for d in sim.devices)
                and sum(versions(seen.latest.get(d.id)) == (2, 3) for d in sim.devices) == 5
            )
        )
        running = [versions(seen.latest.get(d.id)) for d in sim.devices]
        assert sorted(running) == [(1, 2)] * 15 + [(2, 3)] * 5  # the rest hold v2, pinned
        assert sim.fleet.counters.refused == 0
