"""Which controller replica leads: a lease on a retained, signed record, decided purely.

Replicas of one fleet share the retained topic ``controllers/leader`` (``proto.leader``).
:class:`Lease` is one replica's view of it: every record received and every tick of the
clock goes in, and out come the actions the replica must carry out (publish a record, start
leading, stop leading). It does no I/O and reads no clock: the caller passes ``now`` (a
monotonic clock), which makes every race below a unit test.

The rules:

* **Follow** while some replica renews: each record received restarts the wait. After a
  whole lease (the one the record announced) with no record, **claim**: publish a record
  with the next term.
* **Last writer wins.** One broker delivers the records of a topic to every subscriber in
  the same order, so when two replicas claim at once, the claim the broker took last is
  the one everybody sees last. A claimant that sees another replica's claim of its own term
  *after* its own echo has lost; one that sees it *before* its echo was written first and
  ignores it. The winner leads once its echo has come back and a short settling time has
  passed with no later claim.
* **A leader renews** every third of its lease and counts a renewal as done when its echo
  comes back. It **steps down** the moment it sees another replica's record of a later
  term (or of its own term, written after its own), and on its own when its last confirmed
  renewal is 80% of a lease old: the others start counting from when they received it, so
  it stops publishing before any of them can claim.
* **A claim waits for its echo** up to three leases, and one that comes back even later
  still stands (the others hold it as the leader record): a clustered engine electing new
  stream leaders can hold a message for seconds, longer than a short lease.
* A record of an older term than the newest seen is stale (a cut-off leader's late renewal)
  and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from setpoint.proto.leader import LeaderRecord

RENEW_FRACTION: Final = 1 / 3
STEP_DOWN_FRACTION: Final = 0.8
SETTLE_FRACTION: Final = 1 / 6
CLAIM_WAIT_FRACTION: Final = 3.0

Role = Literal["follower", "claiming", "leader"]


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish this record (retained) on the leader topic: a claim or a renewal."""

    record: LeaderRecord


@dataclass(frozen=True, slots=True)
class Lead:
    """This replica leads from now on: start publishing."""

    term: int


@dataclass(frozen=True, slots=True)
class StepDown:
    """Stop publishing at once; ``reason`` is for the log."""

    reason: str


Action = Publish | Lead | StepDown


class Lease:
    """One replica's view of the leader record (see the module's docstring)."""

    def __init__(self, me: str, lease: float, now: float) -> None:
        if lease <= 0:
            raise ValueError("a lease must be longer than 0 s")
        self.me = me
        self.lease = lease
        self.role: Role = "follower"
        self.holder: str | None = None  # the leader as last seen (None: none yet)
        self.term = 0  # the newest term seen, ours included
        self._renewal = 0
        self._seen_at = now  # a replica that just started waits a whole lease
        self._seen_lease = lease
        self._sent_at = now  # our last claim or renewal went out
        self._echo_at: float | None = None  # our claim or last renewal came back
        self._claimed: int | None = None  # the term this replica claimed last

    def _record(self) -> LeaderRecord:
        return LeaderRecord(self.me, self.term, round(self.lease * 1000), self._renewal)

    def received(self, record: LeaderRecord, now: float) -> list[Action]:
        """A record arrived on the leader topic (its signature already verified)."""
        if record.term < self.term:
            return []  # stale: a cut-off leader's late renewal
        if record.holder == self.me:
            if record.term == self.term == self._claimed:
                if self.role == "follower":
                    # Our claim came back after we had given up waiting for it (an engine
                    # electing stream leaders stalls for seconds): the others have it as
                    # the leader record, so it stands.
                    self.role = "claiming"
                self._echo_at = now
            self._seen(record, now)
            return []
        if self.role == "follower" or record.term > self.term or self._echo_at is not None:
            # Later than ours (a newer term, or our own term written after our echo).
            was = self.role
            self._seen(record, now)
            self.role = "follower"
            self._echo_at = None
            if was == "leader":
                return [StepDown(f"replica {record.holder} took the lead (term {record.term})")]
            return []
        return []  # the same term, written before our claim: ours wins

    def _seen(self, record: LeaderRecord, now: float) -> None:
        self.holder = record.holder
        self.term = max(self.term, record.term)
        self._seen_at = now
        self._seen_lease = record.lease_ms / 1000

    def tick(self, now: float) -> list[Action]:
        """Time passed: claim, take the lead, renew, or step down when it is due."""
        if self.role == "follower":
            if now - self._seen_at < self._seen_lease:
                return []
            self.term += 1
            self._claimed = self.term
            self._renewal = 0
            self.role = "claiming"
            self._echo_at = None
            self._sent_at = now
            return [Publish(self._record())]
        if self.role == "claiming":
            if self._echo_at is None:
                if now - self._sent_at >= self.lease * CLAIM_WAIT_FRACTION:  # never came back
                    self.role = "follower"
                    self._seen_at = now
                return []
            if now - self._echo_at < self.lease * SETTLE_FRACTION:
                return []
            self.role = "leader"
            self.holder = self.me
            return [Lead(self.term)]
        # The leader.
        assert self._echo_at is not None
        unconfirmed = now - self._echo_at
        if unconfirmed >= self.lease * STEP_DOWN_FRACTION:
            self.role = "follower"
            self._seen_at = now
            self._echo_at = None
            return [StepDown(f"no renewal of the lead confirmed for {unconfirmed:.1f}s")]
        if now - self._sent_at >= self.lease * RENEW_FRACTION:
            self._renewal += 1
            self._sent_at = now
            return [Publish(self._record())]
        return []

    def free_for(self, now: float) -> float | None:
        """A follower's view: seconds since the record it follows ran out (no renewal for
        a whole lease); None while it is still renewed, or if this replica claims or leads."""
        if self.role != "follower":
            return None
        overdue = now - (self._seen_at + self._seen_lease)
        return overdue if overdue >= 0 else None

    def release(self, now: float) -> list[Action]:
        """Give the lead up at once (the holder's choice): stop publishing, then publish a
        record of the same term whose lease is 1 ms, so that the others see it free as soon
        as they receive it. Nothing if this replica does not lead."""
        if self.role != "leader":
            return []
        self.role = "follower"
        self._claimed = None  # its echo is not a claim that came back late
        self._echo_at = None
        self._renewal += 1
        self._seen_at, self._seen_lease, self._sent_at = now, 0.001, now
        record = LeaderRecord(self.me, self.term, 1, self._renewal)
        return [StepDown("released"), Publish(record)]

    def due_in(self, now: float) -> float:
        """Seconds until :meth:`tick` may have something to do (at most a tenth of a lease)."""
        step = self.lease / 10
        if self.role == "follower":
            return max(0.0, min(step, self._seen_at + self._seen_lease - now))
        return max(0.0, step / 2) if self.role == "claiming" else step
