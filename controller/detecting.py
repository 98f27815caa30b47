"""Drift detection: from what is desired and what a device reports, the device's state.

:func:`detect` is pure and level-triggered: it looks only at the whole current desired
state of one device, its latest report and its presence, so a lost or duplicated message
cannot change the answer. The rules, in order:

1. never reported: ``offline`` if its presence says so, else ``unknown``;
2. presence ``offline``: ``offline`` (the last known state is kept in ``reason`` and
   ``last_seen``, so offline is never confused with failed); also when its last report is
   older than ``silent_after`` (its heartbeat is overdue): a will is lost when the broker
   node holding the device's session dies, so presence alone cannot be trusted;
3. not in the fleet repository: ``unknown``;
4. an apply of the current desired version failed: ``failed``;
5. the current desired version was refused: ``rejected`` (unless the device applied that
   version since: the refused envelope was another one claiming the same version);
6. a version newer than anything published is claimed: ``unknown`` (not believed);
7. held back by a batched rollout (its device bundle pins an older group version than
   the one published): ``pending``, waiting for its batch, never overdue (the pin is its
   desired group version: a failure or refusal of the pinned version still counts);
8. not yet on the desired versions (or group): ``pending`` (``overdue`` after the grace);
9. on the desired versions but resources differ: ``drifted``, with which and why (a
   resource the device's policy refuses is listed too; in enforce mode, a refusal of the
   reconcile command sent to it, e.g. signed by keys it does not trust, is named in the
   reason);
10. nothing differs but the device's own policy refuses a resource (a command where
    commands are not allowed): ``blocked``, with which and why. Not drift: nobody changed
    anything, and nothing will change until the device's owner or the repository does;
11. otherwise ``in_sync``.

:func:`summarise` folds device states into a group's convergence summary.
:data:`DriftAction` (a device's) and :data:`GroupAction` (a group summary's) are what the
drift decisions ask the controller's executor to do; :func:`change_of` and
:func:`drift_event_fields` say which drift event a status change makes.

Pure; no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from setpoint.proto import bundles, status
from setpoint.proto.bundles import Resource
from setpoint.proto.reports import Refusal, Report
from setpoint.proto.status import DRIFT_STATES, DriftState, DriftStatus, GroupStatus, ResourceDiff

DEFAULT_GRACE: Final = 300.0
# A device republishes its report at least once per heartbeat (the reference agent: 900 s)
# and after every reconnect; three missed heartbeats mean it is gone.
DEFAULT_SILENT_AFTER: Final = 3 * 900.0


def is_silent(last_seen: float | None, now: float, silent_after: float | None) -> bool:
    """True when the last report (at ``last_seen``) is older than ``silent_after``."""
    return silent_after is not None and last_seen is not None and now - last_seen > silent_after


# --- What a drift decision asks for: a closed set of typed actions -------------------------


@dataclass(frozen=True, slots=True)
class ShowDrift:
    """Retain ``new`` as the device's drift status; with ``event``, send the drift event
    of the change from ``old`` (when it is one)."""

    device: str
    old: DriftStatus | None
    new: DriftStatus
    event: bool = True


@dataclass(frozen=True, slots=True)
class ClearDrift:
    """Clear the device's retained drift status (it left the fleet and reports nothing)."""

    device: str


@dataclass(frozen=True, slots=True)
class Reconcile:
    """Send the device a signed ``reconcile`` command (enforce mode, drifted)."""

    device: str
    group: str | None
    seq: int
    issued_at: int
    expires_at: int
    reason: str


DriftAction = ShowDrift | ClearDrift | Reconcile


@dataclass(frozen=True, slots=True)
class ShowGroup:
    """Retain ``new`` as the group's summary (``.../groups/<group>/status``)."""

    group: str
    new: GroupStatus


@dataclass(frozen=True, slots=True)
class ClearGroup:
    """Clear the group's retained summary (the group left the fleet)."""

    group: str


GroupAction = ShowGroup | ClearGroup

Change = Literal["opened", "changed", "resolved"]


def change_of(previous: DriftStatus | None, new: DriftStatus) -> Change | None:
    """The drift event a status change makes, or None when it makes none.

    ``opened``: it was in sync (or new) and is not; ``resolved``: it is in sync again;
    ``changed``: another state, or the same drift on other resources.
    """
    if previous is None:
        return "changed" if new.state == "in_sync" else "opened"
    if previous.state == new.state:
        if new.state in ("drifted", "blocked") and previous.resources != new.resources:
            return "changed"
        return None
    if new.state == "in_sync":
        return "resolved"
    if previous.state == "in_sync":
        return "opened"
    return "changed"


def drift_event_fields(
    previous: DriftStatus | None, new: DriftStatus, change: Change
) -> dict[str, Any]:
    """The fields of a ``drift`` event (see ``proto/SPEC.md`` 7.3)."""
    body: dict[str, Any] = status.drift_to_dict(new)
    body.pop("last_seen", None)
    body["change"] = change
    body["previous"] = previous.state if previous is not None else None
    body["previous_since"] = previous.since if previous is not None else None
    return body


@dataclass(frozen=True, slots=True)
class Desired:
    """What one device should be running, as the controller last published it."""

    device: str
    group: str
    mode: str
    group_version: int
    group_digest: str
    device_version: int
    device_digest: str
    commit: str
    resources: tuple[Resource, ...]
    published_at: float
    # The newer group version published but not released to this device yet (its bundle
    # pins ``group_version``, the version it keeps running); None: it follows the group.
    pinned_from: int | None = None

    @property
    def resource_digests(self) -> dict[str, str]:
        return {r.id: bundles.resource_digest(r) for r in self.resources}


def _status(
    device: str,
    group: str | None,
    state: DriftState,
    now: float,
    previous: DriftStatus | None,
    *,
    desired: Desired | None,
    report: Report | None,
    resources: Sequence[ResourceDiff] = (),
    reason: str = "",
    last_seen: float | None = None,
) -> DriftStatus:
    since = previous.since if previous is not None and previous.state == state else now
    applied_group = report.applied_group if report is not None else None
    applied_device = report.applied_device if report is not None else None
    return DriftStatus(
        device=device,
        group=group,
        state=state,
        desired_version=desired.group_version if desired else None,
        applied_version=applied_group.version if applied_group else None,
        commit=desired.commit if desired else None,
        since=since,
        resources=tuple(resources),
        reason=reason,
        last_seen=last_seen,
        desired_device_version=desired.device_version if desired else None,
        applied_device_version=applied_device.version if applied_device else None,
    )


def _resource_diffs(
    desired: Desired, report: Report
) -> tuple[list[ResourceDiff], list[ResourceDiff]]:
    """What differs, and what the device's own policy refuses (blocked), per resource."""
    wanted = desired.resource_digests
    seen = {r.id: r for r in report.resources}
    diffs: list[ResourceDiff] = []
    blocked: list[ResourceDiff] = []
    for rid, digest in wanted.items():
        observed = seen.get(rid)
        if observed is None:
            diffs.append(ResourceDiff(rid, "not reported by the device"))
        elif observed.status == "blocked":
            why = observed.detail or "the device's policy refuses it"
            blocked.append(ResourceDiff(rid, f"blocked: {why}"))
        elif observed.status == "drifted":
            why = observed.detail or "changed on the device"
            diffs.append(ResourceDiff(rid, f"drifted: {why}"))
        elif observed.status == "failed":
            diffs.append(ResourceDiff(rid, f"failed: {observed.detail or 'apply failed'}"))
        elif observed.status == "skipped":
            # What agents said before ``blocked`` existed; counted as drift, as it always was
            # (proto/SPEC.md 6.6).
            diffs.append(ResourceDiff(rid, f"skipped: {observed.detail or 'not allowed'}"))
        elif observed.status == "pending":
            diffs.append(ResourceDiff(rid, "pending on the device"))
        elif observed.kind != "command" and observed.digest and observed.digest != digest:
            diffs.append(ResourceDiff(rid, "content differs from desired"))
    for rid in sorted(set(seen) - set(wanted)):
        diffs.append(ResourceDiff(rid, "present on the device but not desired"))
    return diffs, blocked


def detect(
    desired: Desired | None,
    report: Report | None,
    presence: str | None,
    now: float,
    *,
    device: str | None = None,
    previous: DriftStatus | None = None,
    reported_at: float | None = None,
    grace: float = DEFAULT_GRACE,
    silent_after: float | None = DEFAULT_SILENT_AFTER,
    command_seq: int | None = None,
) -> DriftStatus:
    """The drift status of one device (see the module docstring for the rules);
    ``silent_after=None`` trusts presence alone."""
    name = desired.device if desired else report.device if report else device
    if name is None:
        raise ValueError("detect() needs a desired state, a report or a device id")
    group = desired.group if desired else report.group if report else None

    def status(state: DriftState, **kw: object) -> DriftStatus:
        return _status(
            name,
            group,
            state,
            now,
            previous,
            desired=desired,
            report=report,
            **kw,  # type: ignore[arg-type]
        )

    if report is None:
        if presence == "offline":
            return status("offline", reason="offline; never reported")
        return status("unknown", reason="never reported")
    last_seen = reported_at if reported_at is not None else float(report.time)
    if presence == "offline":
        if previous is not None and previous.state == "offline":
            return status("offline", reason=previous.reason, last_seen=last_seen)
        note = f"; last known state {previous.state}" if previous is not None else ""
        return status("offline", reason=f"offline{note}", last_seen=last_seen)
    if is_silent(last_seen, now, silent_after):
        if previous is not None and previous.state == "offline":
            return status("offline", reason=previous.reason, last_seen=last_seen)
        note = f"; last known state {previous.state}" if previous is not None else ""
        return status(
            "offline",
            reason=f"offline: no report for over {silent_after:.0f}s (heartbeat overdue){note}",
            last_seen=last_seen,
        )
    if desired is None:
        return status("unknown", reason="not in the fleet repository", last_seen=last_seen)

    targets = {
        ("group", desired.group): (desired.group_version, desired.group_digest),
        ("device", desired.device): (desired.device_version, desired.device_digest),
    }
    failure = report.failure
    if failure is not None:
        for (_kind, target), (version, _digest) in targets.items():
            if failure.target == target and failure.version == version:
                kind = "permanent" if failure.permanent else "temporary"
                return status(
                    "failed",
                    reason=f"apply of {target} v{version} failed ({kind}): {failure.error}",
                    last_seen=last_seen,
                )
    applied_now = {"group": report.applied_group, "device": report.applied_device}
    for refusal in reversed(report.refusals):
        wanted = targets.get((refusal.kind, refusal.target))
        if wanted is None or refusal.version != wanted[0]:
            continue
        got = applied_now.get(refusal.kind)
        if got is not None and got.target == refusal.target and got.version == refusal.version:
            # That version is applied since: what was refused was another envelope claiming
            # the same version (a forged or badly signed one), not the genuine bundle.
            continue
        return status(
            "rejected",
            reason=f"{refusal.kind} bundle {refusal.target} v{refusal.version} refused:"
            f" {refusal.reason}: {refusal.error}",
            last_seen=last_seen,
        )

    if desired.pinned_from is not None:
        got = report.applied_group
        on = f"v{got.version}" if got is not None and got.target == desired.group else "nothing"
        return status(
            "pending",
            reason=f"waiting for its batch: group {desired.group} v{desired.pinned_from} is"
            f" rolling out; pinned to v{desired.group_version} (runs {on})",
            last_seen=last_seen,
        )

    applied = {"group": report.applied_group, "device": report.applied_device}
    behind: list[str] = []
    for (kind, target), (version, digest) in targets.items():
        got = applied[kind]
        if got is None or got.target != target:
            behind.append(f"{kind} {target} v{version} not applied")
        elif got.version > version:
            return status(
                "unknown",
                reason=f"claims {kind} {target} v{got.version}, never published"
                f" (latest is v{version})",
                last_seen=last_seen,
            )
        elif got.version < version:
            behind.append(f"{kind} {target} v{got.version} -> v{version}")
        elif got.digest != digest:
            behind.append(f"{kind} {target} v{version} applied with other content")
    if behind:
        overdue = now - desired.published_at > grace
        prefix = "overdue: " if overdue else ""
        return status("pending", reason=prefix + "; ".join(behind), last_seen=last_seen)

    diffs, blocked = _resource_diffs(desired, report)
    if diffs:
        healed = desired.mode == "enforce"
        note = "enforce mode: the device puts it back" if healed else "observe mode: left alone"
        refused = _refused_command(report, name, desired, command_seq) if healed else None
        if refused is not None:
            note = (
                f"enforce mode, but the device refused reconcile command seq {refused.version}:"
                f" {refused.reason}: {refused.error} (does the device trust the controller's"
                " signing keys, and enough of them for its threshold?)"
            )
        return status("drifted", resources=diffs + blocked, reason=note, last_seen=last_seen)
    if blocked:
        return status(
            "blocked",
            resources=blocked,
            reason="the device's own policy refuses a resource: allow it on the device or"
            " remove it from the repository",
            last_seen=last_seen,
        )
    return status("in_sync", last_seen=last_seen)


def _refused_command(
    report: Report, device: str, desired: Desired, command_seq: int | None
) -> Refusal | None:
    """The device's refusal of the latest reconcile command sent to it, if it refused it:
    the one with ``command_seq`` when the caller knows what it sent, else any command
    refused since the desired state was published."""
    for refusal in reversed(report.refusals):
        if refusal.kind != "command" or refusal.target != device:
            continue
        if command_seq is not None:
            if refusal.version == command_seq:
                return refusal
        elif refusal.at >= desired.published_at:
            return refusal
    return None


def summarise(
    group: str,
    statuses: Iterable[DriftStatus],
    *,
    version: int | None,
    commit: str | None,
    mode: str,
    now: float,
) -> GroupStatus:
    """A group's convergence: counts per state and the share in sync on ``version``."""
    members = list(statuses)
    counts = Counter(s.state for s in members)
    in_sync = sum(1 for s in members if s.state == "in_sync" and s.applied_version == version)
    pending = [s.since for s in members if s.state == "pending"]
    return GroupStatus(
        group=group,
        version=version,
        commit=commit,
        mode=mode,
        devices=len(members),
        counts={state: counts.get(state, 0) for state in DRIFT_STATES},
        converged_pct=round(100.0 * in_sync / len(members), 1) if members else 100.0,
        oldest_pending=min(pending) if pending else None,
        time=now,
    )
