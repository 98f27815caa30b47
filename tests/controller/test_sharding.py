"""Shard leases and balanced claims, decided purely: a fake clock and a fake broker that hands
every record to every replica in one order (as one MQTT broker does)."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from setpoint.controller.sharding import (
    Disown,
    Own,
    PublishMembership,
    PublishShard,
    ShardAction,
    ShardLeases,
    rank,
)
from setpoint.proto.leader import LeaderRecord
from setpoint.proto.topics import SHARDS

LEASE = 6.0


class Bus:
    """Replicas on one broker: what one publishes, every one receives, in order."""

    def __init__(self, *names: str, now: float = 0.0) -> None:
        self.now = now
        self.replicas = {n: ShardLeases(n, LEASE, now) for n in names}
        self.owns: dict[str, set[str]] = {n: set() for n in names}
        self.log: list[tuple[float, str, ShardAction]] = []
        self.muted: set[str] = set()  # replicas whose publications the broker loses

    def join(self, name: str) -> None:
        self.replicas[name] = ShardLeases(name, LEASE, self.now)
        self.owns[name] = set()

    def step(self, seconds: float, dt: float = 0.1) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = round(self.now + dt, 6)
            for name, replica in list(self.replicas.items()):
                self.carry_out(name, replica.tick(self.now))

    def carry_out(self, name: str, actions: list[ShardAction]) -> None:
        for action in actions:
            self.log.append((self.now, name, action))
            if isinstance(action, Own):
                self.owns[name].add(action.shard)
            elif isinstance(action, Disown):
                self.owns[name].discard(action.shard)
            elif name not in self.muted:
                for other, replica in self.replicas.items():
                    if isinstance(action, PublishMembership):
                        replica.member_received(action.record, self.now)
                    else:
                        assert isinstance(action, PublishShard)
                        self.carry_out(
                            other, replica.shard_received(action.shard, action.record, self.now)
                        )

    def claims(self, name: str) -> list[str]:
        return [
            a.shard
            for _t, n, a in self.log
            if n == name and isinstance(a, PublishShard) and a.record.renewal == 0
        ]

    def assert_each_shard_owned_once(self) -> None:
        owners = [s for owned in self.owns.values() for s in owned]
        assert sorted(owners) == sorted(SHARDS), self.owns


def firsts(name: str, live: list[str]) -> set[str]:
    return {s for s in SHARDS if rank(s, live)[0] == name}


def test_rank_is_rendezvous_hashing_highest_sha256_first() -> None:
    digest = {r: hashlib.sha256(f"3:{r}".encode()).digest() for r in ("a", "b", "c")}
    assert rank("3", ["a", "b", "c", "a"]) == sorted(digest, key=digest.__getitem__, reverse=True)
    # Each of two replicas is first for some shards; a third takes shards from both.
    two = {n: firsts(n, ["ctl-a", "ctl-b"]) for n in ("ctl-a", "ctl-b")}
    assert two["ctl-a"] and two["ctl-b"] and not two["ctl-a"] & two["ctl-b"]
    three = firsts("ctl-c", ["ctl-a", "ctl-b", "ctl-c"])
    assert three and all(s in two["ctl-a"] | two["ctl-b"] for s in three)
    # Only the shards of the replica that came move: the others keep their first.
    for s in set(SHARDS) - three:
        assert rank(s, ["ctl-a", "ctl-b", "ctl-c"])[0] == rank(s, ["ctl-a", "ctl-b"])[0]


def test_a_lone_replica_renews_its_membership_and_owns_every_shard_after_a_lease() -> None:
    bus = Bus("a")
    bus.step(0.1)
    first = [a for _t, _n, a in bus.log if isinstance(a, PublishMembership)]
    assert [m.record for m in first] == [LeaderRecord("a", 1, 6000, 1)]  # at once
    bus.step(LEASE - 0.3)
    assert bus.claims("a") == [] and bus.owns["a"] == set()  # a holder may still renew
    bus.step(0.3 + LEASE / 6 + 0.2)
    assert bus.owns["a"] == set(SHARDS)
    assert sorted(bus.claims("a")) == sorted(SHARDS)
    renewals = [a for _t, _n, a in bus.log if isinstance(a, PublishMembership)]
    assert len(renewals) == 1 + int((LEASE + LEASE / 6 + 0.1) // (LEASE / 3))


def test_two_replicas_claim_at_once_only_the_shards_they_rank_first_for() -> None:
    bus = Bus("ctl-a", "ctl-b")
    bus.step(LEASE + LEASE / 6 + 0.3)
    for name in ("ctl-a", "ctl-b"):
        assert bus.owns[name] == firsts(name, ["ctl-a", "ctl-b"])
        assert set(bus.claims(name)) == bus.owns[name]  # never claimed another's
    bus.assert_each_shard_owned_once()
    bus.step(5 * LEASE)  # and it stays so
    for name in ("ctl-a", "ctl-b"):
        assert bus.owns[name] == firsts(name, ["ctl-a", "ctl-b"])


def test_a_free_shard_whose_first_replica_is_live_is_claimed_by_another_a_lease_later() -> None:
    bus = Bus("ctl-a", "ctl-b")
    bus.muted.add("ctl-b")  # ctl-b's records never arrive: it claims, but nobody sees it
    # ctl-a sees ctl-b live only if its membership arrives: deliver it by hand each step.
    mine = firsts("ctl-a", ["ctl-a", "ctl-b"])
    theirs = set(SHARDS) - mine
    t = 0.0
    while t < LEASE + LEASE / 6 + 0.3:
        bus.step(0.1)
        t += 0.1
        bus.replicas["ctl-a"].member_received(LeaderRecord("ctl-b", 1, 6000, 1), bus.now)
    assert bus.owns["ctl-a"] == mine  # at once: its own first-ranked shards only
    assert not set(bus.claims("ctl-a")) & theirs
    while t < 2 * LEASE + LEASE / 6 + 0.3:
        bus.step(0.1)
        t += 0.1
        bus.replicas["ctl-a"].member_received(LeaderRecord("ctl-b", 1, 6000, 1), bus.now)
    # A lease more and ctl-b never took them: ctl-a claims them, nothing is orphaned.
    assert bus.owns["ctl-a"] == set(SHARDS)
    claimed_at = {a.shard: t for t, n, a in bus.log if n == "ctl-a" and isinstance(a, PublishShard)
                  and a.record.renewal == 0}  # fmt: skip
    assert min(claimed_at[s] for s in theirs) >= 2 * LEASE - 1e-6
    assert max(claimed_at[s] for s in mine) <= LEASE + 0.2


def test_a_replica_that_joins_gets_its_shards_one_release_per_lease_once_settled() -> None:
    bus = Bus("ctl-a")
    bus.step(LEASE + LEASE / 6 + 0.3)
    assert bus.owns["ctl-a"] == set(SHARDS)
    bus.join("ctl-b")
    joined = bus.now
    wanted = firsts("ctl-b", ["ctl-a", "ctl-b"])
    assert wanted
    # ctl-b's first record, and one renewal: not settled yet, nothing released.
    bus.step(LEASE / 3 + 0.05)
    releases = [(t, a) for t, n, a in bus.log if n == "ctl-a" and isinstance(a, Disown)]
    assert releases == []
    # Renewed twice: ctl-a releases one shard where ctl-b ranks first, and ctl-b claims it at
    # once (the released record has a lease of 1 ms); the next release waits a lease.
    bus.step(LEASE / 3 + 0.1)
    releases = [(t, a) for t, n, a in bus.log if n == "ctl-a" and isinstance(a, Disown)]
    assert len(releases) == 1 and releases[0][1].shard in wanted
    released = [a for _t, n, a in bus.log if n == "ctl-a" and isinstance(a, PublishShard)
                and a.record.lease_ms == 1]  # fmt: skip
    assert [a.shard for a in released] == [releases[0][1].shard]
    # Stop publishing first, then give it up: the Disown comes before the release record.
    shard = releases[0][1].shard
    order = [a for _t, n, a in bus.log if n == "ctl-a" and getattr(a, "shard", "") == shard]
    assert isinstance(order[-2], Disown) and order[-1] in released
    bus.step(LEASE / 6 + 0.3)
    assert shard in bus.owns["ctl-b"]
    bus.step(LEASE * 0.8 - 0.6)  # still within a lease of the first release
    assert len([a for _t, n, a in bus.log if n == "ctl-a" and isinstance(a, Disown)]) == 1
    # In the end each holds exactly its first-ranked shards, each released once.
    bus.step(LEASE * (len(wanted) + 1))
    assert bus.owns["ctl-b"] == wanted and bus.owns["ctl-a"] == set(SHARDS) - wanted
    times = [t for t, n, a in bus.log if n == "ctl-a" and isinstance(a, Disown)]
    assert len(times) == len(wanted)
    assert all(b - a >= LEASE - 1e-6 for a, b in itertools.pairwise(times))
    bus.assert_each_shard_owned_once()
    assert joined < times[0]


def test_a_flapping_replica_does_not_move_shards() -> None:
    bus = Bus("ctl-a")
    bus.step(LEASE + LEASE / 6 + 0.3)
    a = bus.replicas["ctl-a"]
    # ctl-b shows up, renews once, vanishes for more than a lease, and comes back: each time
    # it is new again and must renew twice before ctl-a gives anything up.
    for _ in range(3):
        a.member_received(LeaderRecord("ctl-b", 1, 6000, 1), bus.now)
        bus.step(LEASE / 3)
        a.member_received(LeaderRecord("ctl-b", 1, 6000, 2), bus.now)
        bus.step(LEASE + 0.5)
    assert [x for _t, n, x in bus.log if n == "ctl-a" and isinstance(x, Disown)] == []
    assert bus.owns["ctl-a"] == set(SHARDS)


def test_an_owner_steps_down_at_80_percent_of_a_lease_without_a_confirmed_renewal() -> None:
    bus = Bus("ctl-a")
    bus.step(LEASE + LEASE / 6 + 0.3)
    bus.muted.add("ctl-a")  # its renewals no longer come back
    cut = bus.now
    bus.step(LEASE * 0.8 - LEASE / 3)
    assert bus.owns["ctl-a"] == set(SHARDS)
    bus.step(LEASE / 3 + 0.2)
    assert bus.owns["ctl-a"] == set()
    downs = [t for t, _n, a in bus.log if isinstance(a, Disown)]
    assert len(downs) == 16 and all(t - cut <= LEASE * 0.8 + 0.2 for t in downs)


def test_the_shards_of_a_replica_that_died_move_to_the_survivor() -> None:
    bus = Bus("ctl-a", "ctl-b")
    bus.step(LEASE + LEASE / 6 + 0.3)
    b_had = set(bus.owns["ctl-b"])
    del bus.replicas["ctl-b"]  # SIGKILL: no more records from it
    died = bus.now
    bus.step(LEASE + LEASE / 6 + 0.5)
    assert bus.owns["ctl-a"] == set(SHARDS)
    taken = [t for t, n, a in bus.log if n == "ctl-a" and isinstance(a, Own) and a.shard in b_had]
    # At once when its membership ran out too: a lease and the settling time, not two leases.
    assert max(taken) - died <= LEASE + LEASE / 6 + 0.5


def test_another_replicas_later_term_takes_the_shard() -> None:
    bus = Bus("ctl-a")
    bus.step(LEASE + LEASE / 6 + 0.3)
    a = bus.replicas["ctl-a"]
    term = a.leases["5"].term
    actions = a.shard_received("5", LeaderRecord("ctl-z", term + 1, 6000), bus.now)
    assert actions == [Disown("5", f"replica ctl-z took the lead (term {term + 1})")]
    assert a.owned == frozenset(SHARDS) - {"5"}


def test_release_all_gives_every_shard_up_at_once() -> None:
    bus = Bus("ctl-a")
    bus.step(LEASE + LEASE / 6 + 0.3)
    actions = bus.replicas["ctl-a"].release_all(bus.now)
    assert [a.shard for a in actions if isinstance(a, Disown)] == sorted(SHARDS)
    assert all(a.record.lease_ms == 1 for a in actions if isinstance(a, PublishShard))
    assert bus.replicas["ctl-a"].owned == frozenset()


def test_due_in_never_spins_while_a_free_shard_waits_for_its_first_replica() -> None:
    s = ShardLeases("ctl-a", LEASE, 0.0)
    s.member_received(LeaderRecord("ctl-b", 1, 6000, 1), 0.0)
    s.tick(0.0)
    for now in (LEASE + 0.1, LEASE + 1.0):
        s.member_received(LeaderRecord("ctl-b", 1, 6000, 2), now)
        s.tick(now)
        assert s.due_in(now) > 0


def test_a_lease_must_be_positive() -> None:
    with pytest.raises(ValueError, match="longer than 0"):
        ShardLeases("a", 0, 0.0)
