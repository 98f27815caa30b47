"""The drift engine's two roles when replicas split the report shards, fed messages by hand
(no broker): a shard owner decides its own shards' devices only and keeps their statuses
only; the leader decides no device and summarises the groups from the statuses it reads."""

from __future__ import annotations

from setpoint.controller.broker import Message
from setpoint.controller.detecting import ClearGroup, ShowDrift, ShowGroup
from setpoint.controller.drifting import DriftEngine, DriftSettings, subscriptions
from setpoint.controller.planning import Current
from setpoint.controller.rendering import Target
from setpoint.proto import bundles
from setpoint.proto.bundles import Bundle, SettingResource
from setpoint.proto.reports import Applied, Report, ResourceReport, encode
from setpoint.proto.status import DriftStatus
from setpoint.proto.topics import Topics, shard_of

TOPICS = Topics("setpoint-test/shards/v1")
NOW = 1_000_000.0
DEVICES = ("kiosk-01", "kiosk-03", "kiosk-04")  # shards a, b, 2
RESOURCE = SettingResource("s", "k", "v")


def bundle(kind: str, target: str) -> Bundle:
    extra = {"group": "kiosks"} if kind == "device" else {}
    return Bundle(
        kind=kind,  # type: ignore[arg-type]
        target=target,
        version=1,
        commit="c1",
        issued_at=0,
        expires_at=10**10,
        resources=(RESOURCE,) if kind == "group" else (),
        **extra,  # type: ignore[arg-type]
    )


def published() -> dict[Target, Current]:
    out = {Target("group", "kiosks"): Current(bundle("group", "kiosks"), published_at=NOW)}
    for device in DEVICES:
        out[Target("device", device)] = Current(bundle("device", device), published_at=NOW)
    return out


def in_sync(device: str) -> Message:
    group, own = bundle("group", "kiosks"), bundle("device", device)
    report = Report(
        device=device, time=int(NOW), seq=1, shim_version="test", group="kiosks",
        applied_group=Applied("kiosks", 1, "c1", group.content_digest()),
        applied_device=Applied(device, 1, "c1", own.content_digest()),
        resources=(ResourceReport("s", "setting", "ok", bundles.resource_digest(RESOURCE)),),
    )  # fmt: skip
    return Message(TOPICS.device_reported(device), encode(report), True)


def status_message(device: str, state: str) -> Message:
    found = DriftStatus(device, "kiosks", state, 1, 1, "c1", NOW)  # type: ignore[arg-type]
    return Message(TOPICS.device_drift(device), found.to_json(), True)


def engine(**settings: object) -> DriftEngine:
    e = DriftEngine(DriftSettings(grace=300, **settings), topics=TOPICS, clock=lambda: NOW)  # type: ignore[arg-type]
    e.published(None, published())
    return e


def test_an_owner_subscribes_to_its_shards_and_the_statuses_not_the_group_summaries() -> None:
    owner = DriftSettings(shards=frozenset({"a", "2"}), summaries=False)
    assert [s.topic_filter for s in subscriptions(TOPICS, owner)] == [
        *TOPICS.shard_filters({"2", "a"}),
        TOPICS.all_drift(),
    ]
    assert all(s.bulk for s in subscriptions(TOPICS, owner)[:4])
    leader = DriftSettings(shards=frozenset())
    assert [s.topic_filter for s in subscriptions(TOPICS, leader)] == [
        TOPICS.all_drift(),
        TOPICS.all_group_status(),
    ]


def test_an_owner_decides_its_own_shards_devices_only_and_keeps_only_their_statuses() -> None:
    mine = frozenset({shard_of("kiosk-01"), shard_of("kiosk-04")})
    owner = engine(shards=mine, summaries=False)
    assert owner.take_drift(status_message("kiosk-03", "drifted")) is None  # not ours
    assert owner.take_drift(status_message("kiosk-01", "pending")) is not None
    for device in DEVICES:
        owner.take_report(in_sync(device))
    owner.synced()
    actions = owner.decide()
    decided = {a.device for a in actions if isinstance(a, ShowDrift)}
    assert decided == {"kiosk-01", "kiosk-04"}
    for action in actions:
        owner.done(action)
    assert owner.summaries() == []  # the leader's
    assert set(owner.statuses()) == {"kiosk-01", "kiosk-04"}


def test_a_decision_equal_to_the_retained_status_publishes_nothing() -> None:
    owner = engine(shards=frozenset({shard_of("kiosk-01")}), summaries=False)
    owner.take_report(in_sync("kiosk-01"))
    owner.synced()
    first = owner.decide()
    for action in first:
        owner.done(action)
    # A new owner after a handoff: the retained status (the old owner's) and report arrive
    # before anything is decided; the same condition publishes nothing.
    (shown,) = [a for a in first if isinstance(a, ShowDrift)]
    successor = engine(shards=frozenset({shard_of("kiosk-01")}), summaries=False)
    successor.take_drift(Message(TOPICS.device_drift("kiosk-01"), shown.new.to_json(), True))
    successor.take_report(in_sync("kiosk-01"))
    assert successor.decide() == []  # nothing before the barrier
    successor.synced()
    assert successor.decide() == []


def test_the_leader_decides_no_device_and_summarises_the_statuses_it_reads() -> None:
    leader = engine(shards=frozenset())
    leader.take_report(in_sync("kiosk-01"))  # (it does not subscribe to reports at all)
    leader.synced()
    assert leader.decide() == []
    (summary,) = leader.summaries()
    assert isinstance(summary, ShowGroup) and summary.new.counts["unknown"] == 3
    leader.done(summary)
    for device, state in zip(DEVICES, ("in_sync", "in_sync", "drifted"), strict=True):
        assert leader.take_drift(status_message(device, state)) is not None
    assert leader.decide() == []
    (summary,) = leader.summaries()
    assert isinstance(summary, ShowGroup)
    assert (summary.new.counts["in_sync"], summary.new.counts["drifted"]) == (2, 1)
    leader.done(summary)
    # A status read again unchanged moves nothing.
    leader.take_drift(status_message("kiosk-04", "drifted"))
    assert leader.decide() == [] and leader.summaries() == []
    assert not any(isinstance(a, ClearGroup) for a in leader.summaries())


def test_the_leader_finds_the_devices_behind_from_the_owners_statuses() -> None:
    leader = engine(shards=frozenset())
    leader.synced()
    leader.decide()
    # kiosk-01: pending, runs neither v1, seen after the publication: alive and behind on
    # both. kiosk-03: pending on its group only, last seen before the publication.
    # kiosk-04: in sync: not a fact.
    behind = DriftStatus("kiosk-01", "kiosks", "pending", 1, None, "c1", NOW, last_seen=NOW + 5)
    stale = DriftStatus(
        "kiosk-03", "kiosks", "pending", 1, None, "c1", NOW, last_seen=NOW - 5,
        desired_device_version=1, applied_device_version=1,
    )  # fmt: skip
    fine = DriftStatus("kiosk-04", "kiosks", "in_sync", 1, 1, "c1", NOW, last_seen=NOW + 5)
    for found in (behind, stale, fine):
        leader.take_drift(Message(TOPICS.device_drift(found.device), found.to_json(), True))
    facts = {b.device: b for b in leader.behind()}
    assert set(facts) == {"kiosk-01", "kiosk-03"}
    assert facts["kiosk-01"].live and {lack.target.kind for lack in facts["kiosk-01"].lacks} == {
        "device",
        "group",
    }
    assert not facts["kiosk-03"].live
    assert [(lack.target, lack.applied) for lack in facts["kiosk-03"].lacks] == [
        (Target("group", "kiosks"), None)
    ]
    # A shard owner keeps no other shard's status: it finds nobody behind from statuses.
    owner = engine(shards=frozenset({shard_of("kiosk-04")}), summaries=False)
    owner.take_drift(Message(TOPICS.device_drift("kiosk-01"), behind.to_json(), True))
    assert owner.behind() == []
