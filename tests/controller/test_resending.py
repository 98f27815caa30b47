"""Rule 2 of the remedy for a lost retained bundle (controller/resending.py): which
targets are sent again, when, how often; pure, no broker."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from setpoint.controller import resending
from setpoint.controller.broker import Message
from setpoint.controller.drifting import DriftEngine, DriftSettings
from setpoint.controller.planning import Current, Retained
from setpoint.controller.rendering import Target
from setpoint.controller.resending import Behind, Lack, Resend, Sent
from setpoint.proto.bundles import Bundle, SettingResource
from setpoint.proto.reports import PRESENCE_ONLINE, Applied, Refusal, Report, encode
from setpoint.proto.topics import Topics

G = Target("group", "kiosks")
D = Target("device", "kiosk-01")
PUBLISHED_AT = 1_000_000.0
AFTER = 60.0
TOPICS = Topics("setpoint-test/resend/v1")


def bundle(target: Target, version: int) -> Bundle:
    extra = {"group": "kiosks"} if target.kind == "device" else {}
    return Bundle(
        kind=target.kind,
        target=target.id,
        version=version,
        commit="c1",
        issued_at=0,
        expires_at=1000,
        resources=(SettingResource("s", "k", "v"),),
        **extra,
    )


def current(target: Target = G, version: int = 2) -> Current:
    return Current(bundle(target, version), "Alice", "main", PUBLISHED_AT)


def held(target: Target = G, version: int = 2, envelope: bytes = b"env-v2") -> Retained:
    return Retained(bundle(target, version), "digest", envelope=envelope)


def behind(
    device: str = "kiosk-01", version: int = 2, applied: int | None = 1, live: bool = True
) -> Behind:
    return Behind(device, (Lack(G, version, applied),), live)


def decide(
    facts: list[Behind],
    now: float,
    ledger: dict[Target, Sent] | None = None,
    *,
    published: dict[Target, Current] | None = None,
    retained: dict[Target, Retained] | None = None,
) -> tuple[list[Resend], dict[Target, Sent]]:
    return resending.decide(
        facts,
        {G: current()} if published is None else published,
        {G: held()} if retained is None else retained,
        ledger or {},
        now,
        resend_after=AFTER,
    )


def test_a_live_device_behind_longer_than_resend_after_gets_the_held_envelope() -> None:
    [action], ledger = decide([behind()], PUBLISHED_AT + 75)
    assert (action.target, action.version, action.envelope) == (G, 2, b"env-v2")
    assert action.devices == ("kiosk-01",) and action.attempt == 0
    assert ledger == {}  # recorded by the caller once the broker took it
    line = action.describe()
    assert "re-sent group kiosks v2: kiosk-01 reports v1 for 75s" in line
    assert "may have lost the retained bundle" in line
    assert action.sent() == Sent(2, PUBLISHED_AT + 75, 0)


def test_nothing_before_resend_after() -> None:
    assert decide([behind()], PUBLISHED_AT + AFTER) == ([], {})


def test_a_device_that_is_not_live_gets_nothing() -> None:
    assert decide([behind(live=False)], PUBLISHED_AT + 600) == ([], {})


def test_a_device_behind_on_another_version_than_published_gets_nothing() -> None:
    # It lacks v1 but v2 is published now: the next publication's decision handles it.
    assert decide([behind(version=1, applied=None)], PUBLISHED_AT + 600) == ([], {})


def test_only_the_envelope_of_that_very_version_is_sent() -> None:
    older = {G: held(version=1, envelope=b"env-v1")}
    assert decide([behind()], PUBLISHED_AT + 600, retained=older) == ([], {})
    assert decide([behind()], PUBLISHED_AT + 600, retained={}) == ([], {})
    unreadable = {G: Retained(None, "d", "does not verify", envelope=b"junk")}
    assert decide([behind()], PUBLISHED_AT + 600, retained=unreadable) == ([], {})


def test_one_action_per_target_naming_every_device_behind() -> None:
    facts = [behind("kiosk-02", applied=None), behind("kiosk-01"), behind("kiosk-03", live=False)]
    [action], _ = decide(facts, PUBLISHED_AT + 90)
    assert action.devices == ("kiosk-01", "kiosk-02")
    assert "kiosk-01 (and 1 more device) reports v1" in action.describe()


def test_each_target_the_device_lacks_is_decided_on_its_own() -> None:
    late = Current(bundle(D, 3), "Alice", "main", PUBLISHED_AT + 50)
    fact = Behind("kiosk-01", (Lack(G, 2, 1), Lack(D, 3, None)), True)
    actions, _ = decide(
        [fact],
        PUBLISHED_AT + 90,
        published={G: current(), D: late},
        retained={G: held(), D: held(D, 3, b"env-d3")},
    )
    assert [(a.target, a.envelope) for a in actions] == [(G, b"env-v2")]  # D only 40 s old
    actions, _ = decide(
        [fact],
        PUBLISHED_AT + 111,
        published={G: current(), D: late},
        retained={G: held(), D: held(D, 3, b"env-d3")},
    )
    assert [(a.target, a.reports) for a in actions] == [(D, "nothing"), (G, "v1")]


def test_at_most_once_per_backoff_doubling_to_fifteen_minutes() -> None:
    now = PUBLISHED_AT + 75
    ledger: dict[Target, Sent] = {}
    sent_at: list[tuple[float, int]] = []
    while now < PUBLISHED_AT + 3 * 3600:
        actions, ledger = decide([behind()], now, ledger)
        for action in actions:
            ledger[action.target] = action.sent()
            sent_at.append((now - PUBLISHED_AT, action.attempt))
        now += 1.0
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(sent_at)]
    assert gaps[:5] == [60.0, 120.0, 240.0, 480.0, 900.0]
    assert set(gaps[5:]) == {900.0}
    assert [a for _, a in sent_at[:3]] == [0, 1, 2]


def test_the_backoff_starts_over_once_no_device_lags() -> None:
    ledger = {G: Sent(2, PUBLISHED_AT + 75, 3)}  # next one 480 s later
    assert decide([behind()], PUBLISHED_AT + 200, ledger) == ([], ledger)
    _, ledger = decide([], PUBLISHED_AT + 200, ledger)  # its devices are in sync
    assert ledger == {}
    [action], _ = decide([behind()], PUBLISHED_AT + 201, ledger)
    assert action.attempt == 0


def test_a_new_version_starts_the_backoff_over() -> None:
    ledger = {G: Sent(1, PUBLISHED_AT - 10, 4)}
    [action], kept = decide([behind()], PUBLISHED_AT + 61, ledger)
    assert action.attempt == 0 and kept == {}


# --- The facts: DriftEngine.behind, fed messages by hand (no broker) -------------------


def engine_with(*reports_: Report) -> DriftEngine:
    """A drift engine that published kiosks v2 (at PUBLISHED_AT) and each device's v1,
    took ``reports_`` (100 s after the publication) and decided once."""
    engine = DriftEngine(DriftSettings(grace=300), topics=TOPICS, clock=lambda: PUBLISHED_AT + 100)
    published = {G: current()}
    for name in ("kiosk-01", "kiosk-02", "kiosk-03"):
        target = Target("device", name)
        published[target] = Current(bundle(target, 1), "Alice", "main", PUBLISHED_AT)
    engine.published(None, published)
    for report in reports_:
        engine.take_report(Message(TOPICS.device_reported(report.device), encode(report), False))
    engine.synced()
    for action in engine.decide():
        engine.done(action)
    return engine


def report(device: str, group_version: int | None, **changes: Any) -> Report:
    device_bundle = bundle(Target("device", device), 1)
    applied = Applied("kiosks", group_version, "c1", "d") if group_version is not None else None
    base = Report(
        device=device,
        time=int(PUBLISHED_AT),
        seq=1,
        shim_version="test",
        group="kiosks",
        applied_group=applied,
        applied_device=Applied(device, 1, "c1", device_bundle.content_digest()),
    )
    return replace(base, **changes)


def test_the_facts_name_pending_devices_only_and_what_they_lack() -> None:
    refused = Refusal("kiosks", "group", 2, "signature", "not signed by a trusted key", 0)
    engine = engine_with(
        report("kiosk-01", 1),
        report("kiosk-02", None),
        report("kiosk-03", 1, refusals=(refused,)),
    )
    states = {n: s.state for n, s in engine.statuses().items()}
    assert states == {"kiosk-01": "pending", "kiosk-02": "pending", "kiosk-03": "rejected"}
    assert engine.behind() == [
        Behind("kiosk-01", (Lack(G, 2, 1),), live=True),
        Behind("kiosk-02", (Lack(G, 2, None),), live=True),
    ]  # kiosk-03 refused v2: it is not behind, nothing is sent to it again


def test_a_device_is_live_by_a_report_since_the_publication_or_presence_online() -> None:
    engine = DriftEngine(DriftSettings(grace=300), topics=TOPICS, clock=lambda: PUBLISHED_AT - 5)
    engine.published(None, {G: current(), D: Current(bundle(D, 1), "A", "main", PUBLISHED_AT)})
    engine.take_report(
        Message(TOPICS.device_reported("kiosk-01"), encode(report("kiosk-01", 1)), True)
    )
    engine.synced()
    for action in engine.decide():
        engine.done(action)
    # Its report came before v2 was published, and no presence: not known to be alive.
    assert [b.live for b in engine.behind()] == [False]
    engine.take_presence(Message(TOPICS.device_presence("kiosk-01"), PRESENCE_ONLINE, True))
    for action in engine.decide():
        engine.done(action)
    assert [b.live for b in engine.behind()] == [True]


def test_a_device_a_batched_rollout_holds_back_is_not_behind_on_its_group() -> None:
    pinned = replace(bundle(D, 1), group_version=1)  # its batch is not released yet
    engine = DriftEngine(DriftSettings(grace=300), topics=TOPICS, clock=lambda: PUBLISHED_AT + 100)
    engine.published(None, {G: current(), D: Current(pinned, "A", "main", PUBLISHED_AT)})
    device = report("kiosk-01", 1)
    engine.take_report(Message(TOPICS.device_reported("kiosk-01"), encode(device), False))
    engine.synced()
    for action in engine.decide():
        engine.done(action)
    found = engine.statuses()["kiosk-01"]
    assert found.state == "pending" and "waiting for its batch" in found.reason
    assert engine.behind() == []
