"""Rule 1 of the remedy for a lost retained bundle (controller/rereading.py): which
publications were slow, when to probe, when to read the retained bundles again; pure, no
broker. And the controller's refusal of a ``slow_ack`` it cannot use."""

from __future__ import annotations

from pathlib import Path

import pytest

from setpoint.controller import rereading
from setpoint.controller.broker import BrokerSettings
from setpoint.controller.errors import ConfigError
from setpoint.controller.rendering import Target
from setpoint.controller.rereading import Ack, Ledger, Probe, Reread, Slow
from setpoint.controller.service import Controller, ControllerConfig

G = Target("group", "kiosks")
D = Target("device", "kiosk-01")
LIMIT = 3.0


def take(ledger: Ledger, *acks: Ack) -> tuple[Ledger, list[Slow]]:
    slow: list[Slow] = []
    for ack in acks:
        ledger, found = rereading.take(ledger, ack, slow_ack=LIMIT)
        if found is not None:
            slow.append(found)
    return ledger, slow


def decide(ledger: Ledger, now: float) -> tuple[Ledger, rereading.Action | None]:
    return rereading.decide(ledger, now, slow_ack=LIMIT)


def test_prompt_acknowledgements_leave_nothing_to_do() -> None:
    ledger, slow = take(
        Ledger(), Ack(G, 2, 0.01, 10.0), Ack(D, 3, 2.9, 11.0), Ack(G, None, 3.0, 12)
    )
    assert slow == [] and not ledger
    assert decide(ledger, 13.0) == (ledger, None)
    assert rereading.due(ledger, slow_ack=LIMIT) is None


def test_a_slow_acknowledgement_marks_its_target_and_says_so() -> None:
    ledger, [slow] = take(Ledger(), Ack(G, 2, 4.02, 10.0))
    assert slow == Slow(G, 2, 4.02, 10.0, LIMIT)
    assert dict(ledger.unconfirmed) == {G: slow}
    assert slow.describe() == (
        "the broker took 4.0s to acknowledge v2 of group kiosks (over --slow-ack 3s): a"
        " clustered engine may not have stored it; the retained bundles will be read again"
        " once the broker answers promptly"
    )
    _, [cleared] = take(Ledger(), Ack(D, None, 5.0, 10.0))
    assert "to acknowledge the clearing of device kiosk-01" in cleared.describe()


def test_a_slow_probe_marks_nothing() -> None:
    ledger, slow = take(Ledger(), Ack(None, None, 9.0, 10.0))
    assert slow == [] and not ledger


def test_without_a_prompt_acknowledgement_since_the_broker_is_probed_once_per_slow_ack() -> None:
    ledger, _ = take(Ledger(), Ack(G, 2, 4.0, 10.0))
    assert rereading.due(ledger, slow_ack=LIMIT) == 0.0  # at once
    ledger, action = decide(ledger, 10.1)
    assert action == Probe(10.1)
    assert rereading.due(ledger, slow_ack=LIMIT) == 10.1 + LIMIT
    assert decide(ledger, 12.0) == (ledger, None)  # within slow_ack of the last probe
    # The probe came back slowly too: not prompt yet, the next probe when it is due.
    ledger, _ = take(ledger, Ack(None, None, 3.5, 13.6))
    ledger, action = decide(ledger, 13.6)
    assert action == Probe(13.6)


def test_a_prompt_probe_asks_for_a_read_of_every_unconfirmed_target() -> None:
    ledger, _ = take(Ledger(), Ack(G, 2, 4.0, 10.0), Ack(D, 5, 4.1, 10.1))
    ledger, action = decide(ledger, 10.2)
    assert isinstance(action, Probe)
    ledger, _ = take(ledger, Ack(None, None, 0.02, 10.22))
    ledger, action = decide(ledger, 10.22)
    assert isinstance(action, Reread)
    assert [s.target for s in action.unconfirmed] == [D, G]  # sorted: devices, then groups
    assert (action.prompt, action.at) == (10.22, 10.22)
    assert action.describe() == (
        "reading the retained bundles again: the broker took 4.1s to acknowledge device"
        " kiosk-01 and 1 more, and answers promptly again; what it holds older than what"
        " was published is published again"
    )


def test_a_prompt_publication_after_the_slow_one_needs_no_probe() -> None:
    ledger, _ = take(Ledger(), Ack(G, 2, 4.0, 10.0), Ack(D, 5, 0.05, 10.3))
    ledger, action = decide(ledger, 10.3)
    assert isinstance(action, Reread) and action.prompt == 10.3
    assert [s.target for s in action.unconfirmed] == [G]


def test_a_slow_acknowledgement_after_a_prompt_one_waits_for_the_next_prompt_one() -> None:
    ledger, _ = take(Ledger(), Ack(G, 2, 4.0, 10.0), Ack(None, None, 0.01, 10.1))
    assert ledger.prompt_at == 10.1
    ledger, _ = take(ledger, Ack(D, 5, 3.5, 13.0))  # slow again: the broker is not prompt
    assert ledger.prompt_at is None
    _ledger, action = decide(ledger, 13.0)
    assert isinstance(action, Probe)


def test_a_prompt_publication_to_the_same_target_confirms_it() -> None:
    ledger, _ = take(Ledger(), Ack(G, 2, 4.0, 10.0), Ack(G, 2, 0.03, 20.0))  # a restore
    assert not ledger
    assert decide(ledger, 21.0) == (ledger, None)


def test_a_read_that_started_after_the_slow_acknowledgement_confirms_it() -> None:
    ledger, _ = take(Ledger(), Ack(G, 2, 4.0, 10.0), Ack(D, 5, 4.0, 12.0))
    assert rereading.reread(ledger, 9.0) == ledger  # began before either came
    left = rereading.reread(ledger, 11.0)
    assert list(left.unconfirmed) == [D]
    done = rereading.reread(ledger, 12.5)  # a Reread, or a new connection's sync
    assert not done and done.prompt_at is None
    assert decide(done, 13.0) == (done, None)


def test_nothing_it_is_given_changes() -> None:
    ledger, _ = take(Ledger(), Ack(G, 2, 4.0, 10.0))
    before = dict(ledger.unconfirmed)
    take(ledger, Ack(D, 1, 5.0, 11.0), Ack(G, 3, 0.1, 12.0))
    decide(ledger, 12.0)
    rereading.reread(ledger, 11.0)
    assert dict(ledger.unconfirmed) == before and ledger.prompt_at is None


async def test_a_controller_refuses_a_slow_ack_not_under_its_publish_timeout(
    tmp_path: Path,
) -> None:
    config = ControllerConfig(
        repo=str(tmp_path / "fleet"),
        broker=BrokerSettings("127.0.0.1", 1),
        key_path=tmp_path / "none.key",
        state_dir=tmp_path / "state",
        publish_timeout=10.0,
        slow_ack=10.0,
    )
    with pytest.raises(ConfigError) as refused:
        async with Controller(config):
            pass
    assert str(refused.value) == (
        "slow_ack 10s is not between 0 and the publish timeout (10s): an acknowledgement"
        " that slow fails the publication instead; use a smaller slow_ack (default 3s), or"
        " None to turn rule 1 off"
    )
