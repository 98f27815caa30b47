"""Healing records: which resources the device put back, and for how long it says so.

In enforce mode the shim puts a hand edit back at once and reports the resource
``healed`` (with when and what it was) so that the controller tells operators about the
edit (SPEC 6.8). The record lasts until the next applied version, or until the resource
drifts again, with one exception: a heal that no report has yet carried **back from the
broker** outlives a new version. A clustered engine electing a new stream leader can
delay or lose the reports published meanwhile (docs/scale-out.md, "Fault tests"), and the
commit that ends such an outage brings a new version at once: without the exception the
heal would be gone from the device's reports before any of them arrived, and the edit
would never be told. The device reads its own report topic (restating.py), so it knows
when one of its reports came back; a heal is *told* once a report that came back carries
it with the same detail.

Where the broker never echoes a report (its ACL does not let the device read its own
topic), the plain rule holds: nothing outlives a new version.

Pure; no I/O (the agent heals, publishes and reads its own reports).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from setpoint.proto.reports import MAX_DETAIL, Report


class Heals:
    """The ``healed`` details the device's reports carry, by resource id."""

    def __init__(self) -> None:
        self._detail: dict[str, str] = {}
        self._untold: set[str] = set()  # healed, but no report carrying it came back yet
        self._echoes = False  # a report of this device came back from the broker

    @property
    def details(self) -> Mapping[str, str]:
        """What a report says: resource id -> ``healed at ...: was ...``."""
        return self._detail

    def untold(self) -> frozenset[str]:
        """The heals no report that came back carried yet."""
        return frozenset(self._untold)

    def healed(self, rid: str, detail: str) -> None:
        """The device put ``rid`` back."""
        self._detail[rid] = detail
        self._untold.add(rid)

    def drifted(self, rid: str) -> None:
        """``rid`` differs again: it is drifted, no longer healed."""
        self._detail.pop(rid, None)
        self._untold.discard(rid)

    def echoed(self, report: Report) -> frozenset[str]:
        """A report of this device came back from the broker: the heals it tells (those
        that were untold until now)."""
        self._echoes = True
        told = frozenset(
            r.id
            for r in report.resources
            if r.status == "healed"
            and r.id in self._untold
            and r.detail == self._detail[r.id][:MAX_DETAIL]  # as a report carries it
        )
        self._untold -= told
        return told

    def applied(self, desired: Collection[str]) -> None:
        """A new version is applied (``desired``: its resource ids): the heals already told
        end; an untold one stays while its resource is still desired, if the broker echoes
        this device's reports at all."""
        keep = self._untold & set(desired) if self._echoes else set()
        self._detail = {rid: d for rid, d in self._detail.items() if rid in keep}
        self._untold = keep
