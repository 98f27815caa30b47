"""What to publish: from the repository, what was published, and what the broker holds.

:func:`plan` is the controller's pure heart (the publishing counterpart of
``detecting.detect``). It looks at three whole states, never at the event that woke it:

* ``desired``: the bundles the repository wants (``version=0``), per target;
* ``current``: what this controller last published per target (its state directory);
* ``retained``: what the broker holds on each ``.../desired`` topic right now.

and returns the actions that make the broker hold the desired bundles:

* :class:`Publish` ``change``: the content differs from what is retained and published.
  The version is ``max(current, retained) + 1``, so versions only go up, also when the
  state directory was lost (the retained bundles give the floor) or the history rewritten.
* :class:`Publish` ``restore``: the content is unchanged but the broker lost the bundle,
  holds an older one, or holds something that does not verify: the current bundle goes
  back, same version.
* :class:`Publish` ``refresh``: half of its lifetime has passed: same version and content,
  new ``issued_at``/``expires_at`` (devices accept an equal version with equal content).
* :class:`Adopt`: the broker already holds a bundle of ours with this content (the state
  directory was lost or restored from a backup): take it over without publishing.
* :class:`Clear`: the target is gone from the repository: clear its retained topic.

Targets the repository cannot speak for (``broken``) keep their last good bundle alive
(restored and refreshed like any other). Nothing is removed unless the render allows it,
and a commit that would remove every target is refused unless ``allow_empty``.

Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

from setpoint.proto.bundles import Bundle

from .rendering import Rendered, Target

PublishReason = Literal["change", "restore", "refresh"]


@dataclass(frozen=True, slots=True)
class Current:
    """A bundle this controller published (or adopted), who made the change, and when this
    version was first published (restores and refreshes keep it)."""

    bundle: Bundle
    author: str = ""
    branch: str | None = None
    published_at: float = 0.0

    @property
    def version(self) -> int:
        return self.bundle.version

    @property
    def content_digest(self) -> str:
        return self.bundle.content_digest()


@dataclass(frozen=True, slots=True)
class Retained:
    """What the broker holds on a target's topic.

    ``bundle`` is set when the envelope verified with the fleet key and names this target;
    otherwise ``error`` says why it is not ours (a foreign or damaged message).
    ``envelope`` is the verified message's bytes (what the controller re-sends, unchanged,
    to a device that stays behind: ``controller/resending.py``).
    """

    bundle: Bundle | None
    digest: str = ""
    error: str = ""
    envelope: bytes = field(default=b"", compare=False, repr=False)

    @property
    def valid(self) -> bool:
        return self.bundle is not None


@dataclass(frozen=True, slots=True)
class Publish:
    target: Target
    bundle: Bundle
    reason: PublishReason
    author: str = ""
    branch: str | None = None


@dataclass(frozen=True, slots=True)
class Adopt:
    target: Target
    bundle: Bundle
    author: str = ""
    branch: str | None = None
    digest: str = ""  # of the retained envelope taken over (for the audit)


@dataclass(frozen=True, slots=True)
class Clear:
    target: Target
    last: Bundle | None


Action = Publish | Adopt | Clear


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...] = ()
    refusal: str | None = None
    kept: frozenset[Target] = field(default_factory=frozenset)

    def __bool__(self) -> bool:
        return bool(self.actions)


def refresh_due(bundle: Bundle, now: int) -> bool:
    """True once half of the bundle's lifetime has passed."""
    return now >= bundle.issued_at + (bundle.expires_at - bundle.issued_at) // 2


def _keep(
    target: Target, current: Current | None, retained: Retained | None, now: int, ttl: int
) -> list[Action]:
    """Keep the last good bundle retained and fresh."""
    ret = retained.bundle if retained is not None else None
    held = retained.digest if retained is not None else ""
    if current is None:
        return [Adopt(target, ret, digest=held)] if ret is not None else []
    if ret is not None and ret.version > current.version:
        return [Adopt(target, ret, digest=held)]
    bundle = current.bundle
    due = refresh_due(bundle, now)
    if due:
        bundle = bundle.with_version(bundle.version, now, now + ttl)
    lost = (
        ret is None
        or ret.version < current.version
        or ret.content_digest() != current.content_digest
        or ret.expires_at < current.bundle.expires_at
    )
    if lost:
        return [Publish(target, bundle, "restore", current.author, current.branch)]
    if due:
        return [Publish(target, bundle, "refresh", current.author, current.branch)]
    return []


def _want(
    target: Target,
    rendered: Rendered,
    current: Current | None,
    retained: Retained | None,
    now: int,
    ttl: int,
    floor: int,
    attempted: Bundle | None,
) -> list[Action]:
    digest = rendered.bundle.content_digest()
    ret = retained.bundle if retained is not None else None
    if (
        current is not None
        and current.content_digest == digest
        and (ret is None or ret.version <= current.version)
    ):
        return _keep(target, current, retained, now, ttl)
    if (
        ret is not None
        and ret.content_digest() == digest
        and (current is None or ret.version >= current.version)
    ):
        assert retained is not None
        return [Adopt(target, ret, rendered.author, rendered.branch, retained.digest)]
    floor = max(floor, current.version if current else 0, ret.version if ret else 0)
    if attempted is not None and attempted.version > floor:
        # A publication the broker never acknowledged may still have reached devices: its
        # version may be reused only for the same content.
        same = attempted.content_digest() == digest
        floor = attempted.version - 1 if same else attempted.version
    bundle = rendered.bundle.with_version(floor + 1, now, now + ttl)
    return [Publish(target, bundle, "change", rendered.author, rendered.branch)]


def plan(
    *,
    desired: Mapping[Target, Rendered] | None,
    broken: frozenset[Target] = frozenset(),
    removals_allowed: bool = False,
    allow_empty: bool = False,
    current: Mapping[Target, Current],
    retained: Mapping[Target, Retained],
    floors: Mapping[Target, int] | None = None,
    attempted: Mapping[Target, Bundle] | None = None,
    now: int,
    ttl: int,
    only: Collection[Target] | None = None,
) -> Plan:
    """The actions that make the broker hold what the repository wants.

    ``only``: look at these targets alone (the others are known to need nothing: their
    inputs did not change since a plan that found nothing for them).

    ``desired=None`` means the repository could not be read: everything is kept.
    ``floors`` are the highest versions ever published per target, also of targets that
    were removed since (a device remembers the version it applied; a target that comes
    back must continue above it). ``attempted`` are publications sent but never
    acknowledged (the broker went away): their versions are reused only for equal content.
    """
    if ttl < 1:
        raise ValueError("ttl must be at least 1 second")

    def known(target: Target) -> bool:
        """Published by us, or retained and signed by us."""
        if target in current:
            return True
        found = retained.get(target)
        return found is not None and found.valid

    refusal = None
    if desired is not None and removals_allowed and not desired and not allow_empty:
        every = set(current) | {t for t, r in retained.items() if r.valid}
        if every:
            refusal = (
                f"this commit removes every group and device ({len(every)} retained bundles);"
                " nothing was cleared. If that is intended, add 'allow_empty: true' to"
                " fleet.yaml"
            )
            removals_allowed = False
    want = desired or {}
    publishes: list[Publish] = []
    adopts: list[Adopt] = []
    clears: list[Clear] = []
    kept: set[Target] = set()
    # Work proportional to what changed: with ``only``, nothing is looked at but those.
    if only is None:
        targets: Collection[Target] = (
            set(current) | {t for t, r in retained.items() if r.valid} | want.keys()
        )
    else:
        targets = only
    for target in targets:  # the actions are put in order below
        if target not in want and not known(target):
            continue
        cur, ret = current.get(target), retained.get(target)
        if target in want:
            floor = (floors or {}).get(target, 0)
            tried = (attempted or {}).get(target)
            actions = _want(target, want[target], cur, ret, now, ttl, floor, tried)
        elif desired is not None and removals_allowed and target not in broken:
            last = cur.bundle if cur else (ret.bundle if ret else None)
            actions = [Clear(target, last)]
        else:
            kept.add(target)
            actions = _keep(target, cur, ret, now, ttl)
        for action in actions:
            if isinstance(action, Publish):
                publishes.append(action)
            elif isinstance(action, Adopt):
                adopts.append(action)
            else:
                clears.append(action)
    # Groups before devices (a device that moves finds its new group's bundle already
    # there); devices cleared before their groups.
    adopts.sort(key=lambda a: a.target)
    publishes.sort(key=lambda a: (a.target.kind != "group", a.target.id))
    clears.sort(key=lambda a: (a.target.kind != "device", a.target.id))
    return Plan((*adopts, *publishes, *clears), refusal, frozenset(kept))


def changed_targets(
    before: Mapping[Target, Rendered],
    before_broken: frozenset[Target],
    after: Mapping[Target, Rendered],
    after_broken: frozenset[Target],
) -> set[Target]:
    """The targets whose desired content (or brokenness) differs between two renders.

    A target whose content digest and branch are the same in both needs from :func:`plan`
    what it needed before (its bundle's ``commit`` aside, which is not content: an
    unchanged bundle is not published again), so a plan that found nothing to do for the
    first render needs to look only at these for the second (``plan(only=...)``)."""
    changed = set(before_broken ^ after_broken)
    changed.update(before.keys() - after.keys())
    for target, rendered in after.items():
        old = before.get(target)
        if old is rendered:
            continue
        if (
            old is None
            or old.branch != rendered.branch
            or old.bundle.content_digest() != rendered.bundle.content_digest()
        ):
            changed.add(target)
    return changed


def refresh_at(bundle: Bundle) -> int:
    """When ``bundle`` is to be signed again (Unix seconds): half its lifetime."""
    return bundle.issued_at + (bundle.expires_at - bundle.issued_at) // 2


def next_refresh(current: Mapping[Target, Current]) -> int | None:
    """When the earliest refresh falls due (Unix seconds), if anything is published."""
    times = [refresh_at(c.bundle) for c in current.values()]
    return min(times) if times else None
