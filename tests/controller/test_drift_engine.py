"""The drift engine against a real mosquitto and a real git repository.

Devices are played by a plain MQTT client publishing real msgpack reports on the real
topics (the shim itself is exercised in ``tests/e2e/test_drift_cli.py``), so each test
can say exactly what a device claims, including what a broken or hostile one would.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from driftkit import Devices, DriftWatch, drifted_report, in_sync_report, run_drift

from setpoint.controller.drifting import DriftEngine, change_of
from setpoint.proto import SHARDS, commands, envelopes, reports, shard_of
from setpoint.proto.status import DriftStatus
from setpoint.proto.trust import PAYLOAD_TYPES

pytestmark = pytest.mark.broker
DEVICES = ("gw-01", "kiosk-01", "kiosk-02")


@pytest.fixture
def drift(broker: Any, unique_prefix: str, example_repo: Any, signing_key: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    def start(**settings: Any):  # type: ignore[no-untyped-def]
        settings.setdefault("state_dir", tmp_path / "state")
        state_dir = settings.pop("state_dir")
        return run_drift(broker, unique_prefix, example_repo, signing_key, state_dir, **settings)

    return start


@pytest.fixture
async def watch(broker: Any, unique_prefix: str):  # type: ignore[no-untyped-def]
    async with DriftWatch(broker.host, broker.port, unique_prefix) as w:
        yield w


@pytest.fixture
async def devices(broker: Any, unique_prefix: str):  # type: ignore[no-untyped-def]
    async with Devices(broker.host, broker.port, unique_prefix) as d:
        yield d


async def all_in_sync(engine: DriftEngine, devices: Devices, watch: DriftWatch) -> None:
    for n, name in enumerate(DEVICES):
        await devices.report(in_sync_report(engine._fleet.desired[name], seq=n + 1))
    await watch.wait(lambda: all(watch.state(d) == "in_sync" for d in DEVICES))
    await watch.wait(
        lambda: all(
            watch.drift_events(d) and watch.drift_events(d)[-1]["state"] == "in_sync"
            for d in DEVICES
        )
    )


def rejected(engine: DriftEngine, reason: str) -> float:
    return engine.metrics.reports_rejected.labels(reason)._value.get()


async def test_hand_edit_opens_drift_and_healing_resolves_it(drift, watch, devices) -> None:  # type: ignore[no-untyped-def]
    async with drift() as (_controller, engine):
        await watch.wait(lambda: {"kiosks", "gateways"} <= set(watch.groups))
        assert all(watch.state(d) == "unknown" for d in DEVICES)  # never reported
        await all_in_sync(engine, devices, watch)
        await watch.wait(lambda: watch.groups["kiosks"].converged_pct == 100.0)
        desired = engine._fleet.desired["gw-01"]

        await devices.report(drifted_report(desired, 10, "uplink-interval", "set to 5"))
        await watch.wait(lambda: any(e["state"] == "drifted" for e in watch.drift_events("gw-01")))
        opened = watch.drift_events("gw-01")[-1]
        assert opened["change"] == "opened"
        assert opened["previous"] == "in_sync"
        assert opened["previous_since"] == pytest.approx(opened["since"], abs=60)
        assert opened["resources"] == [{"id": "uplink-interval", "why": "drifted: set to 5"}]
        assert watch.state("gw-01") == "drifted"  # retained
        assert watch.drift["gw-01"].report_seq == 10
        await watch.wait(lambda: watch.groups["gateways"].counts["drifted"] == 1)

        await devices.report(in_sync_report(desired, 11))
        await watch.wait(lambda: watch.drift_events("gw-01")[-1]["change"] == "resolved")
        resolved = watch.drift_events("gw-01")[-1]
        assert (resolved["previous"], resolved["state"]) == ("drifted", "in_sync")
        assert resolved["previous_since"] == opened["since"]
        assert watch.state("gw-01") == "in_sync"
        # The same report again changes nothing: no event, no republication.
        events = len(watch.events)
        await devices.report(in_sync_report(desired, 12))
        await engine.wait_for(lambda: engine._devices["gw-01"].report.seq == 12)
        await watch.barrier()
        assert len(watch.events) == events


async def test_malformed_and_oversized_reports_are_not_believed(drift, watch, devices) -> None:  # type: ignore[no-untyped-def]
    async with drift() as (_controller, engine):
        await all_in_sync(engine, devices, watch)
        events = len(watch.events)
        received = engine.metrics.reports._value.get()
        await devices.raw("kiosk-01", b"\xc1not msgpack")
        await devices.raw("kiosk-01", reports.encode(in_sync_report(
            engine._fleet.desired["kiosk-01"], 5)).replace(b"schema", b"schemo"))  # fmt: skip
        await devices.raw("kiosk-02", b"\x00" * (reports.MAX_REPORT_BYTES + 1))
        # (Two bad reports in a row may be coalesced: only the latest is ever decoded.)
        await engine.wait_for(
            lambda: engine.metrics.reports._value.get() == received + 3 and not engine._dirty
        )
        assert rejected(engine, "malformed") >= 1
        assert rejected(engine, "too-large") == 1
        await watch.barrier()
        assert watch.state("kiosk-01") == "in_sync"  # the last good report still stands
        assert watch.state("kiosk-02") == "in_sync"
        assert len(watch.events) == events

        await devices.raw("stranger", b"garbage")  # never a readable report
        await watch.wait(lambda: watch.state("stranger") == "unknown")
        assert "no readable report (malformed" in watch.drift["stranger"].reason


async def test_unknown_device_is_reported_unknown(drift, watch, devices) -> None:  # type: ignore[no-untyped-def]
    async with drift() as (_controller, engine):
        report = in_sync_report(engine._fleet.desired["kiosk-01"], 1)
        await devices.report(report.__class__(**{**_fields(report), "device": "kiosk-99"}))
        await watch.wait(watch.is_("kiosk-99", "unknown"))
        assert "not in the fleet repository" in watch.drift["kiosk-99"].reason
        assert "kiosk-99" not in {m for ms in engine._fleet.members.values() for m in ms}
        await watch.wait(lambda: watch.groups["kiosks"].devices == 2)


async def test_a_version_never_published_is_not_believed(drift, watch, devices) -> None:  # type: ignore[no-untyped-def]
    async with drift() as (_controller, engine):
        desired = engine._fleet.desired["kiosk-01"]
        report = in_sync_report(desired, 1)
        forged = report.__class__(
            **{
                **_fields(report),
                "applied_group": report.applied_group.__class__(
                    "kiosks", 99, "f" * 40, desired.group_digest
                ),
            }
        )
        await devices.report(forged)
        await watch.wait(
            lambda: "kiosk-01" in watch.drift and "v99" in watch.drift["kiosk-01"].reason
        )
        assert "v99, never published" in watch.drift["kiosk-01"].reason
        assert watch.state("kiosk-01") == "unknown"


async def test_a_report_naming_another_device_is_not_believed(drift, watch, devices) -> None:  # type: ignore[no-untyped-def]
    async with drift() as (_controller, engine):
        await all_in_sync(engine, devices, watch)
        k2 = engine._fleet.desired["kiosk-02"]
        # On kiosk-01's topic, a report that says it is kiosk-02 and that kiosk-02 drifted.
        await devices.report(drifted_report(k2, 50, "motd"), on="kiosk-01")
        await engine.wait_for(lambda: rejected(engine, "wrong-device") >= 1)
        await watch.barrier()
        assert watch.state("kiosk-01") == "in_sync"
        assert watch.state("kiosk-02") == "in_sync"
        assert engine._devices["kiosk-02"].report.seq != 50


async def test_a_report_or_presence_under_another_shard_is_dropped_and_counted(  # type: ignore[no-untyped-def]
    drift, watch, devices
) -> None:
    async with drift() as (_controller, engine):
        await all_in_sync(engine, devices, watch)
        events = len(watch.events)
        desired = engine._fleet.desired["kiosk-01"]
        own = shard_of("kiosk-01")
        other = next(s for s in SHARDS if s != own)
        prefix = devices.topics.prefix
        # The broker's ACL lets a device write its own id under any shard level: the
        # controller must not take a report or presence from the wrong one.
        stray = f"{prefix}/shards/{other}/devices/kiosk-01"
        await devices.to(f"{stray}/reported", reports.encode(drifted_report(desired, 60, "motd")))
        await devices.to(f"{stray}/presence", b"offline")
        await engine.wait_for(lambda: rejected(engine, "wrong-shard") == 2)
        await watch.barrier()
        assert watch.state("kiosk-01") == "in_sync"
        assert engine._devices["kiosk-01"].report.seq != 60
        assert len(watch.events) == events
        # The same report under its own shard is taken.
        await devices.report(drifted_report(desired, 61, "motd"))
        await watch.wait(lambda: watch.state("kiosk-01") == "drifted")
        assert rejected(engine, "wrong-shard") == 2


async def test_a_flood_from_one_device_is_coalesced(drift, watch, devices) -> None:  # type: ignore[no-untyped-def]
    async with drift() as (_controller, engine):
        await all_in_sync(engine, devices, watch)
        desired = engine._fleet.desired["kiosk-01"]
        before = engine.metrics.reports._value.get()
        flood = 3000
        for seq in range(100, 100 + flood):
            await devices.report(drifted_report(desired, seq, "motd", f"edit {seq}"), qos=0)
        last = 100 + flood - 1
        await watch.wait(lambda: watch.drift["kiosk-01"].report_seq == last, timeout=30)
        assert watch.drift["kiosk-01"].resources[0].why == f"drifted: edit {last}"
        received = engine.metrics.reports._value.get() - before
        assert received == flood
        # Only the latest report of a device is decoded: most of the flood was dropped unread.
        assert engine.metrics.coalesced._value.get() > 0
        assert engine.decoded < received


async def test_enforce_sends_a_signed_reconcile_command_observe_does_not(
    drift, watch, devices, signing_key
) -> None:  # type: ignore[no-untyped-def]
    async with drift(reconcile_interval=3600) as (controller, engine):
        await all_in_sync(engine, devices, watch)
        await devices.report(drifted_report(engine._fleet.desired["gw-01"], 20, "uplink-interval"))
        await devices.report(drifted_report(engine._fleet.desired["kiosk-01"], 21, "motd"))
        await watch.wait(lambda: watch.state("kiosk-01") == "drifted")
        await watch.wait(lambda: watch.state("gw-01") == "drifted")
        await watch.wait(lambda: len(watch.commands) >= 1)
        # The event follows the command's PUBACK: wait for it, not only for the command.
        await watch.wait(lambda: any(e["type"] == "reconcile" for e in watch.events))
        await watch.barrier()
        assert [d for d, _ in watch.commands] == ["kiosk-01"]
        _device, envelope = watch.commands[0]
        trusted = controller.signer.trusted
        command = commands.decode(
            envelopes.verify(envelope, trusted, payload_type=envelopes.COMMAND_TYPE)
        )
        assert (command.device, command.action) == ("kiosk-01", "reconcile")
        assert "motd" in command.reason
        assert command.expires_at > command.issued_at
        assert [e["device"] for e in watch.events if e["type"] == "reconcile"] == ["kiosk-01"]
        assert "observe mode" in watch.drift["gw-01"].reason
        # Rate-limited: the same drift again sends no second command within the interval.
        await devices.report(drifted_report(engine._fleet.desired["kiosk-01"], 22, "motd", "x"))
        await watch.wait(lambda: watch.drift["kiosk-01"].report_seq == 22)
        await watch.barrier()
        assert len(watch.commands) == 1
        assert PAYLOAD_TYPES  # the bundle types stay distinct from the command type
        assert envelopes.COMMAND_TYPE not in PAYLOAD_TYPES.values()


async def test_controller_restart_rebuilds_the_picture_without_false_events(
    drift, watch, devices
) -> None:  # type: ignore[no-untyped-def]
    async with drift() as (_controller, engine):
        await all_in_sync(engine, devices, watch)
        await devices.report(drifted_report(engine._fleet.desired["gw-01"], 30, "uplink-interval"))
        await devices.presence("kiosk-02", reports.PRESENCE_OFFLINE)
        await watch.wait(lambda: watch.state("gw-01") == "drifted")
        await watch.wait(lambda: watch.state("kiosk-02") == "offline")
        await watch.wait(lambda: watch.groups["gateways"].counts["drifted"] == 1)
        await watch.wait(lambda: watch.groups["kiosks"].counts["offline"] == 1)
        before = dict(watch.drift)
        groups_before = {g: s.counts for g, s in watch.groups.items()}
    events = len(watch.events)
    async with drift() as (_controller, engine):
        await engine.wait_for(lambda: engine.passes >= 1)
        await watch.barrier()
        assert engine.statuses() == before  # same states, same "since"
        assert {g: s.counts for g, s in watch.groups.items()} == groups_before
        assert len(watch.events) == events, watch.events[events:]
        # ...and it is live: the next change is seen.
        await devices.report(in_sync_report(engine._fleet.desired["gw-01"], 31))
        await watch.wait(lambda: watch.drift_events("gw-01")[-1]["change"] == "resolved")


async def test_controller_restart_with_lost_state_dir_makes_no_false_events(
    drift, watch, devices, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    async with drift() as (_controller, engine):
        await all_in_sync(engine, devices, watch)
    events = len(watch.events)
    async with drift(state_dir=tmp_path / "fresh-state") as (_controller, engine):
        await engine.wait_for(lambda: engine.passes >= 1)
        await watch.barrier()
        assert all(watch.state(d) == "in_sync" for d in DEVICES)
        assert len(watch.events) == events, watch.events[events:]


async def test_broker_restart_and_wipe(drift, watch, devices, broker) -> None:  # type: ignore[no-untyped-def]
    async with drift() as (controller, engine):
        await all_in_sync(engine, devices, watch)
        broker.restart()
        await engine.wait_for(lambda: controller.link.failures >= 1, timeout=15)
        # Still watching after the broker came back.
        async with Devices(broker.host, broker.port, watch.topics.prefix) as again:
            desired = engine._fleet.desired["kiosk-02"]
            await again.report(drifted_report(desired, 40, "log-level"))
        async with DriftWatch(broker.host, broker.port, watch.topics.prefix) as fresh:
            await fresh.wait(fresh.is_("kiosk-02", "drifted"))
            failures = controller.link.failures
            broker.kill()
            broker.wipe()
            broker.start()
        await engine.wait_for(lambda: controller.link.failures > failures, timeout=15)
        # Everything the broker lost is published again, without a single event.
        async with DriftWatch(broker.host, broker.port, watch.topics.prefix) as fresh:
            await fresh.wait(lambda: all(fresh.state(d) for d in DEVICES), timeout=15)
            await fresh.wait(lambda: {"kiosks", "gateways"} <= set(fresh.groups))
            assert fresh.state("kiosk-02") == "drifted"
            assert fresh.state("kiosk-01") == "in_sync"
            await fresh.barrier()
            assert fresh.drift_events() == []


def test_change_of_names_each_transition() -> None:
    def s(state: str, *resources: str) -> DriftStatus:
        from setpoint.proto.status import ResourceDiff

        diffs = tuple(ResourceDiff(r, "x") for r in resources)
        return DriftStatus("d", "g", state, 1, 1, "c", 0.0, diffs)  # type: ignore[arg-type]

    assert change_of(None, s("drifted", "a")) == "opened"
    assert change_of(None, s("in_sync")) == "changed"
    assert change_of(s("in_sync"), s("pending")) == "opened"
    assert change_of(s("drifted", "a"), s("in_sync")) == "resolved"
    assert change_of(s("pending"), s("failed")) == "changed"
    assert change_of(s("drifted", "a"), s("drifted", "a", "b")) == "changed"
    assert change_of(s("drifted", "a"), s("drifted", "a")) is None
    assert change_of(s("offline"), s("offline")) is None


def _fields(report: Any) -> dict[str, Any]:
    return {name: getattr(report, name) for name in report.__dataclass_fields__}


async def test_two_controllers_share_the_report_stream(  # type: ignore[no-untyped-def]
    broker, unique_prefix, make_repo, signing_key, tmp_path, watch, devices
) -> None:
    from fleetkit import FLEET

    extra = {f"devices/kiosk-{n:02d}.yaml": "group: kiosks\nvars: {site: x}\n" for n in range(3, 9)}
    repo = make_repo({**FLEET, **extra})
    names = sorted(["gw-01", *(f"kiosk-{n:02d}" for n in range(1, 9))])

    def start(name: str):  # type: ignore[no-untyped-def]
        # No reconcile command sent again by the clock (every 30 s by default): the events
        # counted below are only those the test's own reports make.
        return run_drift(
            broker, unique_prefix, repo, signing_key, tmp_path / name,
            client_id=f"controller-{name}", share="drift", reconcile_interval=3600,
        )  # fmt: skip

    async with start("a") as (ca, a), start("b") as (cb, b):
        await watch.wait(lambda: set(names) <= set(watch.drift))
        for n, name in enumerate(names):
            await devices.report(in_sync_report(a._fleet.desired[name], seq=n + 1))
        await watch.wait(lambda: all(watch.state(d) == "in_sync" for d in names))
        for n, name in enumerate(names[::2]):
            desired = a._fleet.desired[name]
            await devices.report(drifted_report(desired, 100 + n, desired.resources[0].id))
        wanted = {d: ("drifted" if d in names[::2] else "in_sync") for d in names}
        await watch.wait(lambda: {d: watch.state(d) for d in names} == wanted)
        # Each live report reached exactly one of the two engines, and both took a share.
        live = sum(e.metrics.reports._value.get() for e in (a, b))
        assert live == len(names) + len(names[::2])
        assert a.metrics.reports._value.get() > 0
        assert b.metrics.reports._value.get() > 0
        await watch.wait(lambda: watch.groups["kiosks"].counts["drifted"] == 4)
        # Each event follows its status (and a reconcile event the command's PUBACK): seen
        # the statuses, wait for the events too before counting them.
        await watch.wait(
            lambda: all(
                watch.drift_events(d) and watch.drift_events(d)[-1]["state"] == wanted[d]
                for d in names
            )
        )
        enforced = {d for d in names[::2] if d.startswith("kiosk-")}  # kiosks: enforce mode
        await watch.wait(
            lambda: {e["device"] for e in watch.events if e["type"] == "reconcile"} == enforced
        )
        # A full re-evaluation (as after a reconnect): the engine holding an older report
        # for a device must leave it to the other, so nothing flips back.
        await watch.barrier()
        events = len(watch.events)
        passes = (a.passes, b.passes)
        for controller, engine in ((ca, a), (cb, b)):
            engine.interrupted()  # everything decided again, as after a broker loss
            controller.wake("drift")
        await a.wait_for(lambda: a.passes > passes[0])
        await b.wait_for(lambda: b.passes > passes[1])
        await watch.barrier()
        assert {d: watch.state(d) for d in names} == wanted
        assert len(watch.events) == events, watch.events[events:]


async def test_metrics_are_served_over_http(drift, watch, devices) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import urllib.request

    async with drift(metrics_listen=("127.0.0.1", 0)) as (_controller, engine):
        await all_in_sync(engine, devices, watch)
        await devices.report(drifted_report(engine._fleet.desired["gw-01"], 9, "uplink-interval"))
        await watch.wait(watch.is_("gw-01", "drifted"))
        gauge = engine.metrics.devices
        await engine.wait_for(lambda: gauge.labels("gateways", "drifted")._value.get() == 1)
        assert engine.metrics.port is not None
        url = f"http://127.0.0.1:{engine.metrics.port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        body = text.decode()
        assert 'setpoint_devices{group="gateways",state="drifted"} 1.0' in body
        assert 'setpoint_devices{group="kiosks",state="in_sync"} 2.0' in body
        assert 'setpoint_drift_events_total{change="opened",group="gateways"}' in body
        assert 'setpoint_publications_total{kind="group",reason="change"} 2.0' in body
        assert "setpoint_reports_received_total 4.0" in body
        assert "setpoint_detection_latency_seconds_bucket" in body


async def test_a_device_whose_heartbeat_is_overdue_goes_offline_without_a_will(  # type: ignore[no-untyped-def]
    drift, watch, devices
) -> None:
    # No will ever arrives (the broker node holding the sessions died): the tick notices.
    async with drift(silent_after=5.0, tick=0.2) as (_controller, engine):
        await all_in_sync(engine, devices, watch)
        await watch.wait(lambda: watch.state("kiosk-01") == "offline", timeout=60)
        status = watch.drift["kiosk-01"]
        assert status.reason.startswith("offline: no report for over 5s (heartbeat overdue)")
        # Its next report brings it back.
        await devices.report(in_sync_report(engine._fleet.desired["kiosk-01"], seq=10))
        await watch.wait(lambda: watch.state("kiosk-01") == "in_sync", timeout=60)


async def test_reconcile_commands_carry_every_key_and_a_refused_one_shows_in_status(
    drift, watch, devices, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from setpoint.commands import keys
    from setpoint.proto.reports import Refusal

    keys.generate(tmp_path / "new-keys")
    new_key = tmp_path / "new-keys" / keys.PRIVATE_NAME
    async with drift(reconcile_interval=3600, extra_keys=(new_key,)) as (controller, engine):
        await all_in_sync(engine, devices, watch)
        desired = engine._fleet.desired["kiosk-01"]
        await devices.report(drifted_report(desired, 20, "motd"))
        await watch.wait(lambda: len(watch.commands) >= 1)
        _device, envelope = watch.commands[0]
        # A device with threshold 2 (or one that trusts only the new key) accepts it.
        both = controller.signer.trusted
        assert len(both) == 2
        command = commands.decode(
            envelopes.verify(envelope, both, payload_type=envelopes.COMMAND_TYPE, threshold=2)
        )
        assert command.device == "kiosk-01"
        # The device refuses it anyway (say it trusts other keys): the status says so.
        refusal = Refusal("kiosk-01", "command", command.seq, "signature", "0 valid", 1)
        refused = replace(drifted_report(desired, 21, "motd"), refusals=(refusal,))
        await devices.report(refused)
        await watch.wait(
            lambda: f"refused reconcile command seq {command.seq}" in watch.drift["kiosk-01"].reason
        )
        assert watch.state("kiosk-01") == "drifted"


async def test_an_mqtt_error_in_the_shared_retained_read_reconnects_instead_of_stopping(
    tmp_path, unique_prefix, example_repo, signing_key, dynsec_plugin, caplog
) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import contextlib
    import json

    import aiomqtt

    from setpoint.controller.broker import Backoff, BrokerSettings
    from setpoint.controller.drifting import DriftSettings
    from setpoint.controller.service import Controller, ControllerConfig
    from setpoint.mosquitto import Broker
    from setpoint.proto.topics import Topics

    # The broker's ACL refuses the subscription of the client that reads the retained
    # reports (to its own barrier topic), not those of the link's two connections. (A
    # connection limit does not single it out: mosquitto 2.0 counts sockets it has not seen
    # closed yet, and miscounts after a refusal.)
    topics, ident = Topics(unique_prefix), "controller-limited"
    closed = {"acltype": "subscribePattern", "topic": f"{unique_prefix}/clients/#"}
    acl = [
        *({"acltype": "subscribePattern", "topic": topics.barrier(c), "priority": 2,
           "allow": True} for c in (ident, f"{ident}-in")),
        {**closed, "priority": 1, "allow": False},
        {"acltype": "publishClientSend", "topic": "$CONTROL/dynamic-security/#", "priority": 0,
         "allow": True},  # for the operator's fix
    ]  # fmt: skip
    config_file = tmp_path / "dynamic-security.json"
    config_file.write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True,
                             "subscribe": True, "unsubscribe": True},
        "clients": [],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "controller"}]}],
        "anonymousGroup": "anonymous",
        "roles": [{"rolename": "controller", "acls": acl}],
    }))  # fmt: skip
    limited = Broker(tmp_path / "limited")
    plugin = f"plugin {dynsec_plugin}\nplugin_opt_config_file {config_file}\n"
    limited.conf.write_text(limited.conf.read_text() + plugin)
    with limited:
        config = ControllerConfig(
            repo=str(example_repo.path),
            broker=BrokerSettings(limited.host, limited.port, client_id=ident),
            key_path=signing_key,
            state_dir=tmp_path / "state",
            prefix=unique_prefix,
            backoff=Backoff(base=0.05, cap=0.3),
            publish_timeout=5.0,
        )
        drift = DriftSettings(share="drift", tick=0.2)
        async with Controller(config, drift=drift) as controller:
            engine = controller.drift
            assert engine is not None
            async with asyncio.timeout(30):
                await controller.link.failed.wait()  # the session ended; the controller runs on
            failures = [r.getMessage() for r in caplog.records if r.name.endswith(".broker")]
            assert any("reading the retained" in f for f in failures), failures
            assert not engine.ready.is_set()  # nothing decided without the retained reports
            # The operator fixes the ACL: the next session reads them, and the engine runs.
            fix = {"commands": [{"command": "removeRoleACL", "rolename": "controller", **closed}]}
            # (QoS 0: the change to the role disconnects its clients, this one too.)
            operator = aiomqtt.Client(limited.host, limited.port)
            await operator.__aenter__()
            await operator.publish("$CONTROL/dynamic-security/v1", json.dumps(fix))
            with contextlib.suppress(aiomqtt.MqttError):
                await operator.__aexit__(None, None, None)
            async with asyncio.timeout(30):
                await engine.ready.wait()


async def test_after_a_broker_restart_each_change_makes_one_event(
    broker, unique_prefix, example_repo, signing_key, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Presence read after a reconnect is judged against the retained statuses of the same
    connection, all of them: no pass runs on a half-read picture (which published each
    change twice, 9 ms apart, and could leave a device offline while it was online)."""
    import asyncio
    from dataclasses import replace

    from setpoint.controller.broker import Backoff, BrokerSettings
    from setpoint.controller.drifting import DriftSettings
    from setpoint.controller.service import Controller, ControllerConfig
    from setpoint.proto.reports import Applied, Report

    names = [f"zz-{n:03d}" for n in range(300)]  # not in the repository: state "unknown"
    config = ControllerConfig(
        repo=str(example_repo.path),
        broker=BrokerSettings(broker.host, broker.port),
        key_path=signing_key,
        state_dir=tmp_path / "state",
        prefix=unique_prefix,
        # Slow to come back: the devices' news is retained on the broker before it is.
        backoff=Backoff(base=4.0, cap=4.0),  # 2 to 4 s
        publish_timeout=5.0,
    )
    async with Controller(config, drift=DriftSettings(tick=0.2)) as controller:
        engine = controller.drift
        assert engine is not None
        async with asyncio.timeout(30):
            await engine.ready.wait()
        async with Devices(broker.host, broker.port, unique_prefix) as devices:
            base = Report(
                device="", time=1_800_000_000, seq=1, shim_version="t", group="kiosks",
                applied_group=Applied("kiosks", 1, "c", "d"), applied_device=None,
                resources=(),
            )  # fmt: skip
            for name in names:
                await devices.report(replace(base, device=name))
                await devices.presence(name, reports.PRESENCE_ONLINE)
        async with DriftWatch(broker.host, broker.port, unique_prefix) as watch:
            await watch.wait(lambda: all(watch.state(n) == "unknown" for n in names), timeout=30)
        failures = controller.link.failures
        await asyncio.to_thread(broker.restart)
        async with DriftWatch(broker.host, broker.port, unique_prefix) as watch:
            async with Devices(broker.host, broker.port, unique_prefix) as devices:
                for name in names:
                    await devices.presence(name, reports.PRESENCE_OFFLINE)
            await engine.wait_for(lambda: controller.link.failures > failures, timeout=30)
            await watch.wait(lambda: all(watch.state(n) == "offline" for n in names), timeout=30)
            await watch.wait(lambda: all(watch.drift_events(n) for n in names), timeout=30)
            passes = engine.passes  # a few more passes (ticks): nothing more may come
            await engine.wait_for(lambda: engine.passes > passes + 3, timeout=30)
            await watch.barrier()
            counts = {n: len(watch.drift_events(n)) for n in names}
            assert {n: c for n, c in counts.items() if c != 1} == {}


async def test_a_commit_re_decides_only_the_devices_whose_desired_state_changed(
    drift, watch, devices, example_repo
) -> None:  # type: ignore[no-untyped-def]
    from fleetkit import FLEET

    async with drift(tick=3600) as (controller, engine):
        await all_in_sync(engine, devices, watch)
        before = engine.evaluations
        gateways = FLEET["groups/gateways.yaml"].replace("value: 30", "value: 45")
        example_repo.commit({"groups/gateways.yaml": gateways}, "gateways: uplink 45 s")
        await watch.wait(lambda: watch.state("gw-01") == "pending")
        await controller.settle(10)
        await engine.wait_for(lambda: not engine._fleet_stale and not engine._reeval)
        # gw-01 is the only member of gateways: the kiosks are not decided again.
        assert engine.evaluations - before == 1
        assert watch.state("kiosk-01") == "in_sync" and watch.state("kiosk-02") == "in_sync"


async def test_the_tick_decides_only_the_devices_that_may_move(drift, watch, devices) -> None:  # type: ignore[no-untyped-def]
    """The tick looks at pending, silent and unreconciled devices, kept as their statuses
    change, not at every device: a fleet in sync costs its ticks no decision; a drifted
    device of an enforce group is decided again on a tick (its reconcile retry)."""
    async with drift(tick=0.1, reconcile_interval=0.3) as (_controller, engine):
        await all_in_sync(engine, devices, watch)
        passes, evaluations = engine.passes, engine.evaluations
        await engine.wait_for(lambda: engine.passes > passes + 5)
        assert engine.evaluations == evaluations
        await devices.report(drifted_report(engine._fleet.desired["kiosk-01"], 50, "motd"))
        await watch.wait(watch.is_("kiosk-01", "drifted"))
        await watch.wait(lambda: len([c for c in watch.commands if c[0] == "kiosk-01"]) >= 2)
