"""From validated views of the repository's branches to the bundles that should be retained.

One bundle per group and one per device (assignment, vars, the device's own resources),
rendered with ``version=0`` and no times: :mod:`planning` decides versions, and signing
happens when publishing. Rendering is deterministic: the same commits always give equal
bundles, so an unchanged target has an unchanged content digest and is not republished.

Branches. The default branch decides *which* branch each group tracks (``branch:`` in its
group file, default: the default branch) and *which* group each device belongs to; the
tracked branch supplies the content (the group file, and the device files of its devices).
So a commit on ``canary`` changes exactly the targets owned by groups that track
``canary``. A group or device that exists only on a tracked branch is owned by that branch
when its own file there says so. Anything that cannot be decided safely (a tracked branch
that does not exist, a device that a tracked branch puts in another group, two branches
claiming one target) is a problem, and the targets concerned are *broken*: their last good
bundles stay in place.

Pure; no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from setpoint.proto import bundles, envelopes
from setpoint.proto import repository as verdicts
from setpoint.proto.bundles import Bundle
from setpoint.proto.topics import Topics

from . import fleet
from .commits import CommitInfo
from .errors import Problem
from .fleet import Device, FleetSettings, Group, Snapshot

TargetKind = Literal["group", "device"]
# Room for the envelope around a bundle: framing, one key id and one signature.
_ENVELOPE_OVERHEAD: Final = 512
MAX_BUNDLE_BYTES: Final = envelopes.MAX_ENVELOPE_BYTES - _ENVELOPE_OVERHEAD


@dataclass(frozen=True, slots=True, order=True)
class Target:
    """A group or a device: something that has a retained bundle."""

    kind: TargetKind
    id: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.id}"

    @classmethod
    def parse(cls, text: str) -> Target:
        kind, _, ident = text.partition("/")
        if kind not in ("group", "device") or not ident:
            raise ValueError(f"{text!r} is not 'group/<id>' or 'device/<id>'")
        return cls(kind, ident)  # type: ignore[arg-type]

    def topic(self, topics: Topics) -> str:
        if self.kind == "group":
            return topics.group_desired(self.id)
        return topics.device_desired(self.id)


@dataclass(frozen=True, slots=True)
class View:
    """One branch: its head commit and the fleet validated from that commit's tree."""

    branch: str
    commit: CommitInfo
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class Rendered:
    """A target's bundle as the repository wants it (``version=0``), and where it came from."""

    bundle: Bundle
    branch: str
    author: str

    @property
    def commit(self) -> str:
        return self.bundle.commit


@dataclass(frozen=True, slots=True)
class BranchProblem:
    """A problem found on one branch's head commit."""

    branch: str
    commit: str
    author: str
    problem: Problem


@dataclass(frozen=True, slots=True)
class Render:
    """Everything the repository says right now.

    ``desired``: targets to publish. ``broken``: targets the repository cannot say anything
    reliable about (keep their last good bundles). Anything else that has a bundle was
    removed, but removals happen only when ``removals_allowed`` (the whole repository
    validated), so a broken file can never clear a bundle.
    """

    default_branch: str | None
    commits: Mapping[str, str] = field(default_factory=dict)
    desired: Mapping[Target, Rendered] = field(default_factory=dict)
    broken: frozenset[Target] = frozenset()
    problems: tuple[BranchProblem, ...] = ()
    settings: FleetSettings | None = None
    removals_allowed: bool = False
    head: CommitInfo | None = None
    # For rollouts (see ``rolling``): each branch's head commit, and the group specs used.
    heads: Mapping[str, CommitInfo] = field(default_factory=dict)
    groups: Mapping[str, Group] = field(default_factory=dict)
    # Findings that publish anyway (a sealed value a device of its group cannot open),
    # checked on what is rendered: group content from its branch, members from the default.
    warnings: tuple[BranchProblem, ...] = ()
    # Each device target's spec and what it rendered to: the next render, given this one,
    # re-uses the bundle of a device whose spec is the same object (a file read before
    # as it is, see fleet.Memo) instead of encoding and digesting it again.
    sources: Mapping[Target, tuple[Device, Rendered]] = field(
        default_factory=dict, compare=False, repr=False
    )
    # The default branch's snapshot this was rendered from (its ``token``), and, when it
    # was carried over from the previous render (``_carry_over``), that render's
    # ``desired`` and the targets re-rendered: the planner then looks only at those.
    snapshot_token: object | None = field(default=None, compare=False, repr=False)
    since: Mapping[Target, Rendered] | None = field(default=None, compare=False, repr=False)
    changed: frozenset[Target] = field(default=frozenset(), compare=False, repr=False)

    @property
    def allow_empty(self) -> bool:
        return bool(self.settings and self.settings.allow_empty)

    @property
    def bundle_ttl(self) -> int | None:
        return self.settings.bundle_ttl if self.settings else None


def tracked_branch(group: Group, default_branch: str) -> str:
    return group.branch or default_branch


def branches_needed(default: Snapshot, default_branch: str) -> list[str]:
    """The branches whose heads must be read: the default and every tracked branch."""
    tracked = {tracked_branch(g, default_branch) for g in default.groups.values()}
    return [default_branch, *sorted(tracked - {default_branch})]


def _group_bundle(group: Group, commit: str) -> Bundle:
    return Bundle(
        kind="group",
        target=group.id,
        version=0,
        commit=commit,
        issued_at=0,
        expires_at=0,
        resources=group.resources,
        mode=group.mode,
    )


def _device_bundle(device: Device, commit: str) -> Bundle:
    return Bundle(
        kind="device",
        target=device.id,
        version=0,
        commit=commit,
        issued_at=0,
        expires_at=0,
        resources=device.resources,
        group=device.group,
        vars=dict(sorted(device.vars.items())),
    )


class _Builder:
    def __init__(
        self,
        default_branch: str,
        views: Mapping[str, View | None],
        previous: Mapping[Target, tuple[Device, Rendered]],
    ) -> None:
        self.default_branch = default_branch
        self.views = views
        self.previous = previous
        self.sources: dict[Target, tuple[Device, Rendered]] = {}
        self.desired: dict[Target, Rendered] = {}
        self.broken: set[Target] = set()
        self.problems: list[BranchProblem] = []
        self.claims: dict[Target, str] = {}
        self.devices: dict[str, tuple[Device, View]] = {}

    def problem(self, view: View, file: str, message: str) -> None:
        self.problems.append(
            BranchProblem(view.branch, view.commit.id, view.commit.author, Problem(file, message))
        )

    def add(self, target: Target, bundle: Bundle, view: View, file: str) -> None:
        size = len(bundles.encode(bundle))
        if size > MAX_BUNDLE_BYTES:
            self.problem(
                view,
                file,
                f"the {target.kind} bundle would be {size} bytes, over the {MAX_BUNDLE_BYTES}"
                "-byte limit; move large files out of the bundle",
            )
            self.broken.add(target)
            return
        self.desired[target] = Rendered(bundle, view.branch, view.commit.author)

    def add_device(self, target: Target, device: Device, view: View) -> None:
        prior = self.previous.get(target)
        if prior is not None and prior[0] is device and prior[1].branch == view.branch:
            # Kept as it was, commit and author included: they are not content, an
            # unchanged bundle is not published again, and a publication stamps the head
            # of its branch (service.Controller._stamped).
            rendered = prior[1]
            self.desired[target] = rendered
        else:
            self.add(target, _device_bundle(device, view.commit.id), view, device.file)
            found = self.desired.get(target)
            if found is None:
                return
            rendered = found
        self.sources[target] = (device, rendered)

    def claim(self, target: Target, branch: str, view: View, file: str) -> bool:
        """Record that ``branch`` owns ``target``; a second claimant breaks it."""
        other = self.claims.setdefault(target, branch)
        if other == branch:
            return True
        self.problem(
            view,
            file,
            f"{target.kind} {target.id!r} is claimed by branches {other!r} and {branch!r};"
            " define it on the default branch to choose",
        )
        self.broken.add(target)
        self.desired.pop(target, None)
        return False


def render(
    default_branch: str | None,
    views: Mapping[str, View | None],
    previous: Render | None = None,
) -> Render:
    """Combine the views of the default branch and the branches it tracks (``previous``:
    the last render, whose unchanged device bundles are re-used)."""
    default = views.get(default_branch) if default_branch else None
    if default_branch is None or default is None:
        # No commit on the default branch (a new repository): nothing is known, and so
        # nothing may be removed.
        return Render(default_branch)
    if previous is not None:
        carried = _carry_over(previous, default, views)
        if carried is not None:
            return carried
    b = _Builder(default_branch, views, previous.sources if previous is not None else {})
    problems_by_view = [
        BranchProblem(v.branch, v.commit.id, v.commit.author, p)
        for v in views.values()
        if v is not None
        for p in v.snapshot.problems
    ]
    b.problems.extend(problems_by_view)
    snap = default.snapshot

    # Groups defined on the default branch: it decides the branch they track.
    owner: dict[str, str] = {}
    for gid, group in sorted(snap.groups.items()):
        owner[gid] = tracked_branch(group, default_branch)
        b.claims[Target("group", gid)] = owner[gid]
    b.broken.update(Target("group", g) for g in snap.broken_groups)
    broken_groups = set(snap.broken_groups)

    # Groups that exist only on a tracked branch, owned by it if their file there says so.
    for branch in sorted(set(views) - {default_branch}):
        view = views[branch]
        if view is None:
            continue
        for gid, group in sorted(view.snapshot.groups.items()):
            if gid in snap.group_ids or tracked_branch(group, default_branch) != branch:
                continue
            if b.claim(Target("group", gid), branch, view, group.file):
                owner[gid] = branch
            else:
                broken_groups.add(gid)
        for gid in view.snapshot.broken_groups - snap.group_ids:
            b.broken.add(Target("group", gid))
            broken_groups.add(gid)

    # Each group's content comes from the branch it tracks.
    groups: dict[str, tuple[Group, View]] = {}
    for gid, branch in sorted(owner.items()):
        target = Target("group", gid)
        if target in b.broken:
            broken_groups.add(gid)
            continue
        view = views.get(branch)
        if view is None:
            b.problem(
                default,
                snap.groups[gid].file,
                f"tracks branch {branch!r}, which does not exist; create the branch or fix"
                " 'branch:'",
            )
            b.broken.add(target)
            broken_groups.add(gid)
            continue
        if gid in view.snapshot.broken_groups:
            b.broken.add(target)
            broken_groups.add(gid)
            continue
        tracked = view.snapshot.groups.get(gid)
        if tracked is None:
            continue  # deleted on the branch it tracks: removed
        group = tracked
        groups[gid] = (group, view)
        b.add(target, _group_bundle(group, view.commit.id), view, group.file)

    # Devices on the default branch: it decides their group; the group's branch has the rest.
    for did, assigned in sorted(snap.devices.items()):
        target = Target("device", did)
        gid = assigned.group
        if gid in broken_groups or gid not in owner:
            b.broken.add(target)
            continue
        branch = owner[gid]
        b.claims[target] = branch
        view = views.get(branch)
        if view is None:
            b.broken.add(target)
            continue
        if branch == default_branch:
            device: Device | None = assigned
        elif did in view.snapshot.broken_devices:
            b.broken.add(target)
            continue
        else:
            device = view.snapshot.devices.get(did)
            if device is not None and device.group != gid:
                b.problem(
                    view,
                    device.file,
                    f"puts the device in group {device.group!r}, but the default branch"
                    f" {default_branch!r} puts it in {gid!r}; move devices between groups"
                    f" on {default_branch!r}",
                )
                b.broken.add(target)
                continue
        if device is None or gid not in groups:
            continue  # deleted on the tracked branch, or its group was: removed
        b.add_device(target, device, view)
        b.devices[did] = (device, view)
    b.broken.update(Target("device", d) for d in snap.broken_devices)

    # Devices that exist only on a tracked branch, in a group that branch owns.
    for branch in sorted(set(views) - {default_branch}):
        view = views[branch]
        if view is None:
            continue
        for did, device in sorted(view.snapshot.devices.items()):
            target = Target("device", did)
            if did in snap.device_ids or owner.get(device.group) != branch:
                continue
            if target in b.broken or not b.claim(target, branch, view, device.file):
                continue
            if device.group in broken_groups or device.group not in groups:
                b.broken.add(target)
                continue
            b.add_device(target, device, view)
            b.devices[did] = (device, view)
        for did in view.snapshot.broken_devices - snap.device_ids:
            b.broken.add(Target("device", did))

    desired = {t: b.desired[t] for t in sorted(b.desired) if t not in b.broken}
    return Render(
        default_branch=default_branch,
        commits={k: v.commit.id for k, v in sorted(views.items()) if v is not None},
        desired=desired,
        broken=frozenset(b.broken),
        problems=tuple(_unique(b.problems)),
        settings=snap.settings,
        removals_allowed=not b.problems and not b.broken,
        head=default.commit,
        heads={k: v.commit for k, v in sorted(views.items()) if v is not None},
        groups={gid: group for gid, (group, _view) in sorted(groups.items())},
        warnings=_sealing_warnings(groups, b.devices),
        sources={t: v for t, v in b.sources.items() if desired.get(t) is v[1]},
        snapshot_token=snap.token,
    )


def _carry_over(previous: Render, default: View, views: Mapping[str, View | None]) -> Render | None:
    """The render of ``default`` worked out from ``previous``: work proportional to what
    changed. Only when its snapshot was worked out (``fleet.update``) from the one
    ``previous`` was rendered from, and both have a single branch and nothing broken,
    refused or warned about: then only the groups and devices whose files changed are
    rendered again, the other targets keep their bundles (commit and author included; a
    publication stamps its branch's head). Group bundles, a few, are stamped with the new
    commit as a whole render does (a rollout records its group's). None otherwise."""
    snap = default.snapshot
    derived = snap.derived
    if (
        derived is None
        or derived[0] is not previous.snapshot_token
        or previous.snapshot_token is None
        or previous.default_branch != default.branch
        or set(views) != {default.branch}
        or set(previous.commits) != {default.branch}
        or previous.problems
        or previous.broken
        or previous.warnings
        or not previous.removals_allowed
        or snap.problems
        or snap.warnings
    ):
        return None
    _token, changed_groups, changed_devices = derived
    b = _Builder(default.branch, views, {})
    commit = default.commit
    desired = dict(previous.desired)
    groups = dict(previous.groups)
    sources = dict(previous.sources)
    for gid in groups:
        target = Target("group", gid)
        before = desired.get(target)
        if before is not None and gid not in changed_groups:
            bundle = before.bundle.with_commit(commit.id)
            desired[target] = Rendered(bundle, default.branch, commit.author)
    changed: set[Target] = set()
    for gid in sorted(changed_groups):
        group = snap.groups[gid]
        target = Target("group", gid)
        b.add(target, _group_bundle(group, commit.id), default, group.file)
        if target not in b.desired or target not in desired:
            return None
        desired[target] = b.desired[target]
        groups[gid] = group
        changed.add(target)
    for did in sorted(changed_devices):
        device = snap.devices[did]
        target = Target("device", did)
        if device.group not in groups or target not in desired:
            return None
        b.add(target, _device_bundle(device, commit.id), default, device.file)
        rendered = b.desired.get(target)
        if rendered is None:
            return None
        desired[target] = rendered
        sources[target] = (device, rendered)
        changed.add(target)
    if b.problems or b.broken:
        return None
    return dataclasses.replace(
        previous,
        commits={default.branch: commit.id},
        desired=desired,
        settings=snap.settings,
        head=commit,
        heads={default.branch: commit},
        groups=groups,
        sources=sources,
        snapshot_token=snap.token,
        since=previous.desired,
        changed=frozenset(changed),
    )


def _sealing_warnings(
    groups: Mapping[str, tuple[Group, View]], devices: Mapping[str, tuple[Device, View]]
) -> tuple[BranchProblem, ...]:
    """:func:`fleet.sealing_warnings` on the rendered fleet, each on the branch of its file."""
    views = {g.file: v for g, v in groups.values()} | {d.file: v for d, v in devices.values()}
    found = fleet.sealing_warnings(
        {gid: g for gid, (g, _v) in groups.items()}, {did: d for did, (d, _v) in devices.items()}
    )
    return tuple(
        BranchProblem(views[w.file].branch, views[w.file].commit.id, views[w.file].commit.author, w)
        for w in found
        if w.file in views
    )


def _unique(problems: Iterable[BranchProblem]) -> list[BranchProblem]:
    seen: set[BranchProblem] = set()
    out = []
    for problem in problems:
        if problem not in seen:
            seen.add(problem)
            out.append(problem)
    return out


def repository_status(
    render: Render,
    refusal: str | None,
    now: float,
    previous: verdicts.RepositoryStatus | None = None,
) -> verdicts.RepositoryStatus:
    """Each branch's head commit, accepted or refused, with every problem and its line.

    ``refusal`` (the planner's: a commit that would remove everything) refuses the default
    branch's head. A verdict keeps the ``checked_at`` of ``previous`` while the head and the
    verdict are the same, so an unchanged status is not published again.
    """
    problems: dict[str, list[verdicts.Problem]] = {}
    for found in render.problems:
        problems.setdefault(found.branch, []).append(
            verdicts.Problem(found.problem.file or None, found.problem.line, found.problem.message)
        )
    if refusal is not None and render.default_branch is not None:
        problems.setdefault(render.default_branch, []).append(
            verdicts.Problem("fleet.yaml", None, refusal)
        )
    branches: dict[str, verdicts.BranchStatus] = {}
    for branch, info in sorted(render.heads.items()):
        found_here = tuple(problems.get(branch, ()))
        status = verdicts.BranchStatus(
            branch=branch,
            head=info.id,
            accepted=not found_here,
            checked_at=now,
            subject=info.summary,
            problems=found_here,
        )
        before = previous.branches.get(branch) if previous is not None else None
        if before is not None and before == dataclasses.replace(
            status, checked_at=before.checked_at
        ):
            status = before
        branches[branch] = status
    return verdicts.RepositoryStatus(branches)
