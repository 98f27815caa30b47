"""Reporting: the device's whole current truth as one :class:`~setpoint.proto.reports.Report`.

:func:`resource_reports` turns desired resources, observed facts and the planned steps into
one status per resource, with the digest of what was observed (the same digest
``bundles.resource_digest`` gives for the desired resource when they agree):

==========  =================================================================
``ok``      observed equals desired
``drifted`` it differs (observe mode leaves it; enforce mode reports this, then heals)
``healed``  it differed and the shim put it back (until the next version: healing.py)
``failed``  it cannot be applied (path refused, apply or heal failed)
``blocked`` the device's own policy refuses it (a command where commands are not
            allowed): not drift, nobody changed anything
``pending`` not known yet (a command whose check has not run)
==========  =================================================================

:class:`Reporter` decides when to publish: when anything but ``time`` and ``seq`` changed,
and otherwise once per heartbeat, never more (bandwidth matters on cellular links). Each
published report gets the next sequence number.

Pure; no I/O (the agent publishes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import setpoint
from setpoint.proto import bundles
from setpoint.proto.bundles import CommandResource, FileResource, Resource, SettingResource
from setpoint.proto.reports import Report, ResourceReport, ResourceState

from .observing import setting_digest
from .planning import Blocked, Observed, Skip, Step, Wait

# The distribution's top package holds only its version; importing it costs nothing more
# (importlib.metadata would cost half a megabyte of RSS on a device).
SHIM_VERSION: Final[str] = getattr(setpoint, "__version__", "0+unknown")


def observed_digest(resource: Resource, observed: Observed) -> str:
    """The digest of what is on the device for ``resource`` ("" if nothing is there).

    For a sealed resource: the desired digest (of the ciphertext) when the keyed MAC says
    the device holds its plaintext, else "": nothing derived from a secret leaves the device.
    """
    if isinstance(resource, FileResource | SettingResource) and resource.sealed is not None:
        return bundles.resource_digest(resource) if observed.sealed_in_sync(resource) else ""
    if isinstance(resource, FileResource):
        fact = observed.files.get(resource.path)
        return fact.digest if fact is not None else ""
    if isinstance(resource, SettingResource):
        values = observed.settings.values
        if not observed.settings.readable or resource.key not in values:
            return ""
        return setting_digest(resource.key, values[resource.key])
    fact_c = observed.commands.get(resource.id)
    return bundles.resource_digest(resource) if fact_c is not None and fact_c.passed else ""


def resource_reports(
    desired: Sequence[Resource],
    observed: Observed,
    steps: Sequence[Step],
    *,
    healed: Mapping[str, str] | None = None,
    failed: Mapping[str, str] | None = None,
) -> tuple[ResourceReport, ...]:
    """One status per desired resource, in bundle order."""
    healed = healed or {}
    failed = failed or {}
    by_id: dict[str, Step] = {}
    for each in steps:
        rid = getattr(each, "resource_id", None)
        if rid is not None and not isinstance(each, Wait):
            by_id.setdefault(rid, each)
    result: list[ResourceReport] = []
    for resource in desired:
        step = by_id.get(resource.id)
        digest = observed_digest(resource, observed)
        status: ResourceState
        if resource.id in failed:
            status, detail = "failed", failed[resource.id]
        elif isinstance(step, Skip):
            status, detail = "blocked", step.why
        elif isinstance(step, Blocked):
            status, detail = "failed", step.why
        elif step is not None:
            status, detail = "drifted", getattr(step, "why", "")
        elif (
            isinstance(resource, CommandResource)
            and observed.commands.get(resource.id) is not None
            and observed.commands[resource.id].passed is None
        ):
            status, detail = "pending", "check not run yet"
        elif resource.id in healed:
            status, detail = "healed", healed[resource.id]
        else:
            status, detail = "ok", ""
        result.append(ResourceReport(resource.id, resource.kind, status, digest, detail))
    return tuple(result)


def _content(report: Report) -> Report:
    return dataclasses.replace(report, time=0, seq=0)


class Reporter:
    """Numbers reports and decides when one is due."""

    def __init__(
        self,
        *,
        heartbeat: float,
        first_seq: int,
        seq_limit: int,
        reserve: Callable[[], int],
    ) -> None:
        self._heartbeat = heartbeat
        self._seq = first_seq - 1
        self._limit = seq_limit
        self._reserve = reserve
        self._last: Report | None = None
        self._last_at: float | None = None
        self.published = 0

    def due(self, report: Report, now: float) -> bool:
        """Does ``report`` differ from the last one published, or is a heartbeat due?"""
        if self._last is None or self._last_at is None:
            return True
        if _content(report) != self._last:
            return True
        return now - self._last_at >= self._heartbeat

    def next_due(self) -> float | None:
        """When the next heartbeat is due (monotonic seconds), if anything was published."""
        return None if self._last_at is None else self._last_at + self._heartbeat

    def stamp(self, report: Report, wall: float) -> Report:
        """``report`` with the next sequence number and the time."""
        if self._seq + 1 > self._limit:
            self._limit = self._reserve()
        return dataclasses.replace(report, seq=self._seq + 1, time=int(wall))

    @property
    def last_seq(self) -> int:
        """The sequence number of the last report handed to the broker."""
        return self._seq

    def sent(self, report: Report, now: float) -> None:
        """Record that ``report`` (as stamped) was handed to the broker."""
        self._seq = report.seq
        self._last = _content(report)
        self._last_at = now
        self.published += 1

    def forget(self) -> None:
        """Publish again at the next chance (a new connection: the broker may have lost it)."""
        self._last = None
