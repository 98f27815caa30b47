"""Re-reading: a slow acknowledgement makes the controller look at its retained bundles again.

Rule 1 of the remedy in ``docs/scale-out.md`` ("The remedy belongs to the controller"): a
clustered engine can acknowledge a retained PUBLISH it never stored (NATS, when the leader
of its stream of retained messages dies: the store times out after the engine's JetStream
API timeout, 4 s on nats-server 2.9.10, is logged, and the PUBACK goes out anyway). The
controller's own live subscription received the bundle before the store failed, so its
view of what is retained is wrong and nothing it can see tells it so, except that the
acknowledgement was slow.

So every bundle publication's PUBACK is timed (an :class:`Ack`). One that took longer than
``slow_ack`` seconds (``--slow-ack``, default 3: under that timeout) marks its target
unconfirmed (:class:`Slow`, logged and counted). While a target is unconfirmed and no
acknowledgement has come promptly since, the controller asks the broker whether it answers
promptly again (:class:`Probe`: one timed QoS 1 message to its own echo topic, at most
once per ``slow_ack`` seconds). Once one comes promptly (a probe's or a later publication's),
it reads its retained desired topics again through a fresh subscription
(:class:`Reread`); the planner then publishes again every target whose retained bundle is
older than what was published, as it does for any view that shows an older bundle. A read
that started after a target's slow acknowledgement came (this one, or a reconnect's sync)
confirms it (:func:`reread`). A prompt acknowledgement of a later publication to the same
target confirms that target too.

Pure: facts in, a new :class:`Ledger` and typed actions out; no clock, no I/O. Times are
the caller's monotonic clock, in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

from .rendering import Target

DEFAULT_SLOW_ACK: Final = 3.0  # seconds; nats-server 2.9.10's JetStream API timeout is 4 s


@dataclass(frozen=True, slots=True)
class Ack:
    """A PUBACK and how long it took: of a bundle publication to ``target`` (``version``
    None: its retained topic cleared), or of a probe (``target`` None)."""

    target: Target | None
    version: int | None
    took: float  # seconds from the PUBLISH written to its PUBACK
    at: float  # when the PUBACK came


@dataclass(frozen=True, slots=True)
class Slow:
    """A bundle publication the broker acknowledged slowly: its target is unconfirmed."""

    target: Target
    version: int | None
    took: float
    at: float
    limit: float  # the slow_ack it exceeded

    def describe(self) -> str:
        """The log line: which target, how slow, what follows."""
        what = "the clearing of" if self.version is None else f"v{self.version} of"
        return (
            f"the broker took {self.took:.1f}s to acknowledge {what} {self.target.kind}"
            f" {self.target.id} (over --slow-ack {self.limit:g}s): a clustered engine may not"
            " have stored it; the retained bundles will be read again once the broker"
            " answers promptly"
        )


@dataclass(frozen=True, slots=True)
class Probe:
    """Publish one timed QoS 1 message (to the controller's own echo topic) and hand its
    :class:`Ack` (``target`` None) back to :func:`take`."""

    at: float


@dataclass(frozen=True, slots=True)
class Reread:
    """Read the retained desired topics again through a fresh subscription (the view
    emptied, the filters subscribed again, a barrier), then hand the time it started to
    :func:`reread`."""

    unconfirmed: tuple[Slow, ...]  # sorted by target
    prompt: float  # when the prompt acknowledgement that allows it came
    at: float

    def describe(self) -> str:
        """The log line: which targets were unconfirmed, and why now."""
        first, more = self.unconfirmed[0], len(self.unconfirmed) - 1
        others = f" and {more} more" if more else ""
        return (
            f"reading the retained bundles again: the broker took {first.took:.1f}s to"
            f" acknowledge {first.target.kind} {first.target.id}{others}, and answers promptly"
            " again; what it holds older than what was published is published again"
        )


Action = Probe | Reread


def _frozen() -> Mapping[Target, Slow]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Ledger:
    """The unconfirmed targets, the last prompt acknowledgement since the last slow one
    (None: none yet), and when the last probe was sent."""

    unconfirmed: Mapping[Target, Slow] = field(default_factory=_frozen)
    prompt_at: float | None = None
    probed_at: float | None = None

    def __bool__(self) -> bool:
        return bool(self.unconfirmed)


def take(ledger: Ledger, ack: Ack, *, slow_ack: float) -> tuple[Ledger, Slow | None]:
    """``ack`` taken into the ledger; a :class:`Slow` when it marks its target unconfirmed.

    A slow acknowledgement of a bundle marks its target; any slow one (a probe's too) means
    the broker is not prompt yet. A prompt one confirms its own target (a later
    publication to it was taken in time) and, while anything is unconfirmed, says the
    broker answers promptly again."""
    if ack.took > slow_ack:
        if ack.target is None:
            return replace(ledger, prompt_at=None), None
        slow = Slow(ack.target, ack.version, ack.took, ack.at, slow_ack)
        unconfirmed = {**ledger.unconfirmed, ack.target: slow}
        return Ledger(MappingProxyType(unconfirmed), None, ledger.probed_at), slow
    unconfirmed = dict(ledger.unconfirmed)
    if ack.target is not None:
        unconfirmed.pop(ack.target, None)
    if not unconfirmed:
        return Ledger(probed_at=ledger.probed_at), None
    newest = max(s.at for s in unconfirmed.values())
    prompt = ack.at if ack.at >= newest else ledger.prompt_at
    return Ledger(MappingProxyType(unconfirmed), prompt, ledger.probed_at), None


def decide(ledger: Ledger, now: float, *, slow_ack: float) -> tuple[Ledger, Action | None]:
    """What to do now: nothing (nothing unconfirmed), a :class:`Reread` (the broker
    answered promptly since the last slow acknowledgement), or a :class:`Probe` (it has
    not; at most one per ``slow_ack`` seconds). The ledger records the probe."""
    if not ledger.unconfirmed:
        return ledger, None
    if ledger.prompt_at is not None:
        unconfirmed = tuple(sorted(ledger.unconfirmed.values(), key=lambda s: s.target))
        return ledger, Reread(unconfirmed, ledger.prompt_at, now)
    if ledger.probed_at is not None and now - ledger.probed_at < slow_ack:
        return ledger, None
    return replace(ledger, probed_at=now), Probe(now)


def due(ledger: Ledger, *, slow_ack: float) -> float | None:
    """When :func:`decide` has something to do next (None: nothing until a new fact)."""
    if not ledger.unconfirmed:
        return None
    if ledger.prompt_at is not None or ledger.probed_at is None:
        return 0.0  # now
    return ledger.probed_at + slow_ack


def reread(ledger: Ledger, started: float) -> Ledger:
    """After a read of the retained bundles through a fresh subscription that started at
    ``started`` (a :class:`Reread`, or a new connection's sync): every target whose slow
    acknowledgement came before it is confirmed (the planner has seen what the broker
    really holds)."""
    left = {t: s for t, s in ledger.unconfirmed.items() if s.at > started}
    if len(left) == len(ledger.unconfirmed):
        return ledger
    if not left:
        return Ledger(probed_at=ledger.probed_at)
    return Ledger(MappingProxyType(left), ledger.prompt_at, ledger.probed_at)
