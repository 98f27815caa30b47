"""The leader lease, decided purely: claims, races, renewals and step-downs with a fake clock."""

from __future__ import annotations

import pytest

from setpoint.controller.leadership import Lead, Lease, Publish, StepDown
from setpoint.proto import leader
from setpoint.proto.errors import SchemaError
from setpoint.proto.leader import LeaderRecord

LEASE = 6.0


def published(actions: list[object]) -> LeaderRecord:
    assert len(actions) == 1 and isinstance(actions[0], Publish), actions
    return actions[0].record


def run_until_leader(lease: Lease, now: float) -> float:
    """Tick a lone replica to the lead; return the time it took the lead."""
    claim = published(lease.tick(now))
    assert lease.received(claim, now) == []
    now += LEASE / 6
    assert lease.tick(now) == [Lead(claim.term)]
    return now


def test_a_lone_replica_waits_a_whole_lease_then_claims_and_leads() -> None:
    lease = Lease("a", LEASE, now=0.0)
    assert lease.tick(LEASE - 0.1) == []  # a leader may still be renewing
    now = run_until_leader(lease, LEASE)
    assert lease.role == "leader" and lease.term == 1 and lease.holder == "a"
    # It renews every third of a lease, each renewal a distinct record.
    renewal = published(lease.tick(now + LEASE / 3))
    assert (renewal.holder, renewal.term, renewal.renewal) == ("a", 1, 1)


def test_a_live_leader_keeps_the_others_following() -> None:
    lease = Lease("b", LEASE, now=0.0)
    for i in range(10):
        now = i * LEASE / 3
        assert lease.received(LeaderRecord("a", 4, 6000, i), now) == []
        assert lease.tick(now + 0.1) == []
    assert lease.role == "follower" and lease.holder == "a"
    # The renewals stop: after a whole lease from the last one, b claims term 5.
    last = 9 * LEASE / 3
    assert lease.tick(last + LEASE - 0.01) == []
    assert published(lease.tick(last + LEASE)).term == 5


def test_two_claims_at_once_the_one_written_last_wins_on_both_sides() -> None:
    a, b = Lease("a", LEASE, 0.0), Lease("b", LEASE, 0.0)
    claim_a, claim_b = published(a.tick(LEASE)), published(b.tick(LEASE))
    assert claim_a.term == claim_b.term == 1
    # The broker took a's claim first, then b's: both see them in that order.
    for replica in (a, b):
        replica.received(claim_a, LEASE + 0.01)
        replica.received(claim_b, LEASE + 0.02)
    later = LEASE + LEASE / 6 + 0.1
    assert a.tick(later) == [] and a.role == "follower" and a.holder == "b"
    assert b.tick(later) == [Lead(1)]


def test_a_leader_steps_down_when_another_takes_a_later_term() -> None:
    lease = Lease("a", LEASE, 0.0)
    now = run_until_leader(lease, LEASE)
    actions = lease.received(LeaderRecord("b", 2, 6000), now + 1)
    assert actions == [StepDown("replica b took the lead (term 2)")]
    assert lease.role == "follower"


def test_a_leader_that_cannot_renew_steps_down_before_the_others_may_claim() -> None:
    lease = Lease("a", LEASE, 0.0)
    now = run_until_leader(lease, LEASE)
    # Renewals go out but never come back (the broker is gone).
    step_down_at = None
    t = now
    while step_down_at is None:
        t += 0.1
        if any(isinstance(x, StepDown) for x in lease.tick(t)):
            step_down_at = t
    echo = LEASE + 0.0  # the claim's echo, the last confirmation
    assert step_down_at - echo < LEASE  # before any follower's lease runs out
    assert lease.role == "follower"


def test_a_stale_renewal_of_an_older_term_changes_nothing() -> None:
    lease = Lease("b", LEASE, 0.0)
    lease.received(LeaderRecord("c", 5, 6000), 1.0)
    assert lease.received(LeaderRecord("a", 4, 6000, 9), 2.0) == []
    assert lease.holder == "c" and lease.term == 5
    # ...and does not restart the wait: b claims a lease after c's record.
    assert published(lease.tick(1.0 + LEASE)).term == 6


def test_a_claim_that_never_comes_back_returns_to_following() -> None:
    lease = Lease("a", LEASE, 0.0)
    published(lease.tick(LEASE))
    assert lease.tick(3 * LEASE) == [] and lease.role == "claiming"  # an engine may stall
    assert lease.tick(4 * LEASE) == [] and lease.role == "follower"


def test_a_claim_that_comes_back_after_it_was_given_up_still_leads() -> None:
    lease = Lease("a", LEASE, 0.0)
    claim = published(lease.tick(LEASE))
    lease.tick(4 * LEASE)  # given up
    assert lease.role == "follower"
    assert lease.received(claim, 4 * LEASE + 1) == []
    assert lease.tick(4 * LEASE + 1 + LEASE / 6) == [Lead(claim.term)]


def test_an_old_record_of_its_own_id_from_before_a_restart_is_not_a_claim() -> None:
    lease = Lease("a", LEASE, 0.0)  # restarted; the retained record is its former self's
    assert lease.received(LeaderRecord("a", 5, 6000, 40), 0.1) == []
    assert lease.received(LeaderRecord("a", 5, 6000, 41), 0.2) == []
    assert lease.role == "follower"
    assert lease.tick(0.2 + LEASE / 2) == []
    assert published(lease.tick(0.2 + LEASE)).term == 6


def test_the_record_round_trips_and_bad_records_are_refused() -> None:
    record = LeaderRecord("ctl-a", 3, 6000, 2)
    assert leader.decode(leader.encode(record)) == record
    with pytest.raises(SchemaError, match="lease_ms"):
        leader.decode(leader.encode(LeaderRecord("ctl-a", 3, 0)))
    with pytest.raises(SchemaError):
        leader.decode(leader.encode(LeaderRecord("Bad/Id", 3, 6000)))
    with pytest.raises(SchemaError, match="non-negative"):
        leader.decode(leader.encode(LeaderRecord("ctl-a", -1, 6000)))
