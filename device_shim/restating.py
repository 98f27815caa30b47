"""Restating: the device's presence and report put right when the broker holds stale ones.

A clustered engine's node that comes back after a network split or a freeze can publish
what it held for the device from before the device moved to another node: the will of
the old connection (``offline``) and a report older than the device's latest, both
retained (``docs/scale-out.md``, "Fault tests"). The device subscribes (QoS 0) to its own
presence and reported topics (the link's ``watch``) and, while connected, publishes
``online`` again when it sees ``offline`` there, and a report again when it sees one with
a lower ``seq`` than the first it published on this connection (SPEC 6.6, 6.7): its own
reports of this connection come back in the order it sent them (an echo of the one before
the latest is not stale, the latest follows it), so only an older connection's can be.

* **Rate-limited.** Each of the two at most once per ``interval`` seconds; one seen
  meanwhile waits for the interval (:meth:`Restater.next_at`), so two nodes cannot make the
  device publish in a loop, and a stale copy that comes twice costs one publication.
* **The latest word counts.** ``online`` seen after ``offline`` (the device's own
  publication coming back) withdraws the wish to publish ``online`` again.
* **Live messages only.** A retained copy delivered because the device subscribed is from
  before the connection; the link drops those (the device publishes its presence and
  its report after every new connection anyway), and :meth:`Restater.forget` drops what
  was wished on the old connection.

Pure; no I/O (the agent decodes what arrived and publishes).
"""

from __future__ import annotations

from typing import Final, Literal

from setpoint.proto import reports

RESTATE_INTERVAL: Final = 5.0

Restated = Literal["presence", "report"]


class Restater:
    """Decides when the device publishes its presence or report again."""

    def __init__(self, interval: float = RESTATE_INTERVAL) -> None:
        self._interval = interval
        self._wanted: set[Restated] = set()
        self._next: dict[Restated, float] = {}
        self._first_seq: int | None = None  # of the first report sent on this connection

    def saw_presence(self, payload: bytes) -> None:
        """A presence message on the device's own topic."""
        if payload == reports.PRESENCE_OFFLINE:
            self._wanted.add("presence")
        elif payload == reports.PRESENCE_ONLINE:
            self._wanted.discard("presence")

    def published(self, seq: int) -> None:
        """The device sent a report numbered ``seq``."""
        if self._first_seq is None:
            self._first_seq = seq

    def saw_report(self, seq: int) -> bool:
        """A report on the device's own topic, numbered ``seq``: True if it is stale (from
        an older connection than this one; nothing is stale before this connection's first
        report, which is on its way)."""
        if self._first_seq is None or seq >= self._first_seq:
            return False
        self._wanted.add("report")
        return True

    def want(self, what: Restated) -> None:
        """Publish ``what`` again (a publication that did not go out), after the interval."""
        self._wanted.add(what)

    def due(self, now: float) -> list[Restated]:
        """What to publish again now (monotonic ``now``); each is then held back for the
        interval."""
        ready = sorted(w for w in self._wanted if self._next.get(w, float("-inf")) <= now)
        for what in ready:
            self._wanted.discard(what)
            self._next[what] = now + self._interval
        return ready

    def next_at(self) -> float | None:
        """When something wished for becomes due (None: nothing is wished for)."""
        if not self._wanted:
            return None
        return min(self._next.get(w, float("-inf")) for w in self._wanted)

    def forget(self) -> None:
        """A new connection: the device publishes both anyway."""
        self._wanted.clear()
        self._first_seq = None
