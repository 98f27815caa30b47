"""Re-sending: a device that keeps reporting but stays behind gets its bundle again.

Rule 2 of the remedy in ``docs/scale-out.md`` ("The remedy belongs to the controller"): an
engine can lose a retained bundle without the publisher knowing (NATS stores a retained
PUBLISH once and only logs a failure; a node's feed of retained updates can die with
another node), so a device that subscribes afterwards is given the old bundle and stays
``pending``. :func:`decide` finds, per target, the devices that are alive (a report since
the publication, or presence ``online``) and still ``pending`` on a version published more
than ``resend_after`` seconds ago, and asks for the exact envelope the controller holds for
that version to be published again, retained (same bytes: same version, same signature), at
most once per target per backoff (``BACKOFF``: 60 s doubling to 15 min; the entry is
dropped, so the backoff starts over, once no device lags on the target).

A device that refused the version (``rejected``, ``blocked``, ``failed``) is not behind and
gets nothing: only ``pending`` devices are facts here. A device a batched rollout holds
back is not behind on its group either (it waits for its batch).

Pure: facts in, typed :class:`Resend` actions and the new ledger out; no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from setpoint.kit.backoff import Backoff

from .planning import Current, Retained
from .rendering import Target

DEFAULT_RESEND_AFTER: Final = 60.0
# At most once per target per backoff: 60 s, doubling, at most 15 min (nominal, no jitter:
# one controller, a handful of targets; nothing to spread).
BACKOFF: Final = Backoff(base=60.0, cap=900.0, factor=2.0)


@dataclass(frozen=True, slots=True)
class Lack:
    """A target's version a device does not run: what it runs of it (None: nothing)."""

    target: Target
    version: int
    applied: int | None


@dataclass(frozen=True, slots=True)
class Behind:
    """One ``pending`` device's facts: what it lacks, and whether it is alive (a report
    since the publication, or presence ``online``)."""

    device: str
    lacks: tuple[Lack, ...]
    live: bool


@dataclass(frozen=True, slots=True)
class Sent:
    """The last re-send of a target: which version, when, and how many so far."""

    version: int
    at: float
    attempt: int  # 0 for the first re-send


@dataclass(frozen=True, slots=True)
class Resend:
    """Publish ``envelope`` again, retained, on ``target``'s topic (the same bytes the
    controller published for ``version``)."""

    target: Target
    version: int
    envelope: bytes = field(repr=False)
    devices: tuple[str, ...]  # the devices behind on it, sorted
    reports: str  # what the first of them runs of it, in words ("v1", "nothing")
    behind_for: float  # seconds since the version was published
    attempt: int  # 0 for the first re-send of this version
    at: float  # when it was decided
    next_in: float  # the backoff: no re-send of this version before ``at + next_in``

    def sent(self) -> Sent:
        """The ledger entry once the broker acknowledged it."""
        return Sent(self.version, self.at, self.attempt)

    def describe(self) -> str:
        """The log line: which target, which device, how long, why."""
        first, more = self.devices[0], len(self.devices) - 1
        others = f" (and {more} more device{'s' if more > 1 else ''})" if more else ""
        return (
            f"re-sent {self.target.kind} {self.target.id} v{self.version}: {first}{others}"
            f" reports {self.reports} for {self.behind_for:.0f}s after it was published;"
            " the engine may have lost the retained bundle"
            f" (re-send {self.attempt + 1}; next at the earliest in"
            f" {self.next_in:.0f}s)"
        )


def decide(
    behind: Iterable[Behind],
    published: Mapping[Target, Current],
    held: Mapping[Target, Retained],
    ledger: Mapping[Target, Sent],
    now: float,
    *,
    resend_after: float = DEFAULT_RESEND_AFTER,
    backoff: Backoff = BACKOFF,
) -> tuple[list[Resend], dict[Target, Sent]]:
    """The envelopes to publish again, and the ledger to keep: the entries of the targets
    still lagging (a target no device lags on any more is dropped: its backoff starts
    over); the caller adds :meth:`Resend.sent` once the broker acknowledged it.

    A target is re-sent when a live device lacks the version published on it now, that
    version was published more than ``resend_after`` seconds ago, the controller holds its
    envelope (``Retained.envelope`` of that very version), and the backoff since the last
    re-send of that version has run out."""
    lagging: dict[Target, list[tuple[str, Lack]]] = {}
    for fact in behind:
        if not fact.live:
            continue
        for lack in fact.lacks:
            current = published.get(lack.target)
            if current is None or current.version != lack.version:
                continue  # not what is published now: the next publication decides it
            lagging.setdefault(lack.target, []).append((fact.device, lack))
    actions: list[Resend] = []
    kept: dict[Target, Sent] = {}
    for target in sorted(lagging):
        current = published[target]
        last = ledger.get(target)
        if last is not None and last.version != current.version:
            last = None  # another version since: start over
        if last is not None:
            kept[target] = last
        if now - current.published_at <= resend_after:
            continue
        if last is not None and now - last.at < backoff.nominal(last.attempt):
            continue
        entry = held.get(target)
        if entry is None or entry.bundle is None or entry.bundle.version != current.version:
            continue  # not the bytes of that version: the planner publishes it anew
        if not entry.envelope:
            continue
        devices = sorted(lagging[target], key=lambda d: d[0])
        applied = devices[0][1].applied
        attempt = 0 if last is None else last.attempt + 1
        actions.append(
            Resend(
                target=target,
                version=current.version,
                envelope=entry.envelope,
                devices=tuple(d for d, _ in devices),
                reports="nothing" if applied is None else f"v{applied}",
                behind_for=now - current.published_at,
                attempt=attempt,
                at=now,
                next_in=backoff.nominal(attempt),
            )
        )
    return actions, kept
