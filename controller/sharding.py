"""Which controller replica owns which report shard: 16 leases and a ranking, decided purely.

Replicas of one fleet split the 16 report shards (``docs/decisions/0009-report-shards.md``).
:class:`ShardLeases` is one replica's view of who owns what: every shard lease and
membership record received, and every tick of the clock, go in; out come the actions the
replica carries out (publish a shard's lease or its own membership record, start or stop
owning a shard). No I/O, no clock of its own: the caller passes ``now`` (monotonic).

* **A lease per shard.** One :class:`~setpoint.controller.leadership.Lease` per shard, fed
  the records of ``controllers/shards/<shard>``: follow while the holder renews, claim
  after a whole lease without a renewal, last writer wins, renew every third of a lease,
  step down at 80% of a lease without a confirmed renewal (the leader record's rules,
  SPEC 7.7). The replica owns a shard exactly while its lease leads.
* **Membership.** Each replica renews its own record on ``controllers/replicas/<id>`` every
  third of a lease; a replica is *live* while its last record is younger than the lease it
  announced (this replica is always live to itself).
* **Ranking.** For each shard the live replicas are ranked by rendezvous hashing: highest
  ``sha256(shard + ":" + replica)`` first (:func:`rank`). Each replica gets about 16/N
  shards, and a change of membership moves only the shards of the replica that came or went.
* **Balanced claims.** A free shard (no renewal for a lease) is claimed at once by the
  replica ranked first among the live ones; any other waits one more lease, so that a
  shard is never orphaned when its preferred replica is gone.
* **Balanced releases.** A replica that owns a shard where another live replica ranks first
  releases it once that replica's membership has been renewed twice (a new replica settles
  in; a flapping one does not move shards back and forth), one shard at a time and at most
  once per lease: it stops owning the shard, then publishes a record of the same term with
  a lease of 1 ms, which the others take as free at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from setpoint.proto.leader import LeaderRecord
from setpoint.proto.topics import SHARDS

from .leadership import RENEW_FRACTION, Lead, Lease, Publish, StepDown

SETTLED_RENEWALS: Final = 2  # renewals of a better-ranked replica's record before a release
MEMBERSHIP_TERM: Final = 1  # a membership record has no claims: its term never moves


@dataclass(frozen=True, slots=True)
class PublishShard:
    """Publish ``record`` (retained) on ``controllers/shards/<shard>``."""

    shard: str
    record: LeaderRecord


@dataclass(frozen=True, slots=True)
class PublishMembership:
    """Publish ``record`` (retained) on this replica's ``controllers/replicas/<id>``."""

    record: LeaderRecord


@dataclass(frozen=True, slots=True)
class Own:
    """This replica owns ``shard`` from now on: decide and publish for its devices."""

    shard: str


@dataclass(frozen=True, slots=True)
class Disown:
    """Stop publishing for ``shard`` at once; ``reason`` is for the log."""

    shard: str
    reason: str


ShardAction = PublishShard | PublishMembership | Own | Disown


def rank(shard: str, replicas: Iterable[str]) -> list[str]:
    """``replicas`` for ``shard``, best first: highest ``sha256(shard + ":" + replica)``."""
    return sorted(
        set(replicas),
        key=lambda r: hashlib.sha256(f"{shard}:{r}".encode()).digest(),
        reverse=True,
    )


@dataclass(slots=True)
class _Member:
    seen_at: float  # when its last record arrived
    lease: float  # the lease its last record announced
    renewal: int  # the renewal number of its last record
    renewals: int  # renewals seen since it (re)appeared (the same record again is none)


class ShardLeases:
    """One replica's view of the shard leases and of the live replicas (see the module)."""

    def __init__(self, me: str, lease: float, now: float) -> None:
        if lease <= 0:
            raise ValueError("a lease must be longer than 0 s")
        self.me = me
        self.lease = lease
        self.leases = {shard: Lease(me, lease, now) for shard in SHARDS}
        self._members: dict[str, _Member] = {}
        self._renewal = 0
        self._member_sent_at: float | None = None
        self._released_at: float | None = None

    # --- What it knows ---------------------------------------------------------------------

    @property
    def owned(self) -> frozenset[str]:
        """The shards this replica owns now."""
        return frozenset(s for s, lease in self.leases.items() if lease.role == "leader")

    def live(self, now: float) -> list[str]:
        """The live replicas (this one included), by id."""
        others = {r for r, m in self._members.items() if now - m.seen_at < m.lease}
        return sorted(others | {self.me})

    # --- Facts in ------------------------------------------------------------------------

    def member_received(self, record: LeaderRecord, now: float) -> None:
        """A membership record arrived (its signature verified, its topic's id = holder)."""
        if record.holder == self.me:
            return
        member = self._members.get(record.holder)
        if member is None or now - member.seen_at >= member.lease:
            self._members[record.holder] = _Member(now, record.lease_ms / 1000, record.renewal, 0)
            return
        member.seen_at = now
        member.lease = record.lease_ms / 1000
        if record.renewal != member.renewal:
            member.renewal = record.renewal
            member.renewals += 1

    def member_gone(self, replica: str) -> None:
        """``replica``'s membership record was cleared (it stopped cleanly)."""
        self._members.pop(replica, None)

    def shard_received(self, shard: str, record: LeaderRecord, now: float) -> list[ShardAction]:
        """A record arrived on ``shard``'s lease topic (its signature verified)."""
        return self._mapped(shard, self.leases[shard].received(record, now))

    # --- Time passes -----------------------------------------------------------------------

    def tick(self, now: float) -> list[ShardAction]:
        """Renew the membership, claim, take, renew, step down or release what is due."""
        actions: list[ShardAction] = []
        sent = self._member_sent_at
        if sent is None or now - sent >= self.lease * RENEW_FRACTION:
            self._member_sent_at = now
            self._renewal += 1
            record = LeaderRecord(self.me, MEMBERSHIP_TERM, round(self.lease * 1000), self._renewal)
            actions.append(PublishMembership(record))
        live = self.live(now)
        for shard, lease in self.leases.items():
            free = lease.free_for(now)
            if free is not None and free < self.lease and rank(shard, live)[0] != self.me:
                continue  # the replica ranked first claims it; the others wait a lease more
            actions += self._mapped(shard, lease.tick(now))
        actions += self._release_one(now, live)
        return actions

    def _release_one(self, now: float, live: list[str]) -> list[ShardAction]:
        if self._released_at is not None and now - self._released_at < self.lease:
            return []  # at most one release per lease
        for shard in sorted(self.owned):
            first = rank(shard, live)[0]
            member = self._members.get(first)
            if member is not None and member.renewals >= SETTLED_RENEWALS:
                self._released_at = now
                return self._mapped(shard, self.leases[shard].release(now))
        return []

    def release_all(self, now: float) -> list[ShardAction]:
        """Stopping cleanly: give every owned shard up at once (the others claim it without
        waiting for the lease to run out)."""
        actions: list[ShardAction] = []
        for shard in sorted(self.owned):
            actions += self._mapped(shard, self.leases[shard].release(now))
        return actions

    def due_in(self, now: float) -> float:
        """Seconds until :meth:`tick` may have something to do (at most a tenth of a lease)."""
        step = self.lease / 10
        due = [step]
        if self._member_sent_at is not None:
            due.append(self._member_sent_at + self.lease * RENEW_FRACTION - now)
        for lease in self.leases.values():
            # A free shard left to a better-ranked replica is looked at every step.
            due.append(step if lease.free_for(now) is not None else lease.due_in(now))
        return max(0.0, min(due))

    def _mapped(self, shard: str, actions: list[Publish | Lead | StepDown]) -> list[ShardAction]:
        out: list[ShardAction] = []
        for action in actions:
            if isinstance(action, Publish):
                out.append(PublishShard(shard, action.record))
            elif isinstance(action, Lead):
                out.append(Own(shard))
            else:
                out.append(Disown(shard, action.reason))
        return out
