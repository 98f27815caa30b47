"""Planning: from desired resources and observed facts, the steps that make them equal.

:func:`plan` is the heart of the shim and is pure: it compares what a bundle asks for with
what :mod:`observing` found on the device and returns a list of :data:`Step`, a closed set
of small frozen dataclasses. :mod:`applying` runs them, one executor per kind. The same
steps tell :mod:`reporting` what differs (a resource with a step has drifted, a
:class:`Skip` is refused by the device's own policy and reported ``blocked``, a
:class:`Blocked` failed), so the report and the apply can never disagree.

Order of the steps: :class:`Blocked` first (an apply that cannot succeed stops before it
touches anything), then files, deletions of files the shim created itself, settings, and
commands last (they cannot be undone, so they run only once everything else worked).

The shim deletes only what it recorded as created by itself (``managed_files``,
``managed_settings``); a file that existed before a bundle named it is overwritten while
desired, and left as it is when no longer desired.

Pure; no I/O.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from setpoint.proto.bundles import (
    CommandResource,
    FileResource,
    Resource,
    SettingResource,
    SettingValue,
)
from setpoint.proto.sealed import Sealed

from .config import DEFAULT_POLICY, DevicePolicy

FileCondition = Literal[
    "regular",  # a regular file: sha256, mode and digest are filled in
    "missing",  # nothing there (its parent directories may be missing too)
    "symlink",  # the last component is a symbolic link
    "not-regular",  # a directory, device, fifo, socket
    "escapes",  # the path leads outside the device root (through a symlink)
    "reserved",  # the path is inside setpoint's own directory or the state directory
    "error",  # could not be observed (permissions, I/O error)
]


@dataclass(frozen=True, slots=True)
class FileFact:
    """What is at a file resource's path.

    ``real`` is the path relative to the real root after resolving directory symlinks that
    stay inside it; the shim writes and records that path. ``digest`` is what the device
    reports: ``codec.digest({"content": ..., "mode": ...})`` of the file as it is. For the
    path of a sealed resource ``sha256`` and ``digest`` stay empty (no unkeyed hash of a
    secret is ever made) and ``mac`` holds the keyed MAC of the content instead.
    """

    path: str
    condition: FileCondition
    real: str | None = None
    sha256: str = ""
    mode: int | None = None
    digest: str = ""
    detail: str = ""
    mac: str = ""


@dataclass(frozen=True, slots=True)
class SettingsFact:
    """The settings file's current values (``readable`` False: missing or corrupt)."""

    values: Mapping[str, SettingValue] = field(default_factory=dict)
    readable: bool = True
    detail: str = ""


@dataclass(frozen=True, slots=True)
class CommandFact:
    """The last result of a command's check (``passed`` None: never checked)."""

    passed: bool | None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Observed:
    """Everything :func:`plan` needs to know about the device."""

    files: Mapping[str, FileFact] = field(default_factory=dict)
    settings: SettingsFact = SettingsFact()
    commands: Mapping[str, CommandFact] = field(default_factory=dict)
    managed_files: frozenset[str] = frozenset()
    managed_settings: frozenset[str] = frozenset()
    # Sealed resources: the keyed MAC of what is there now, by resource id, and the ledger
    # of what was written (ciphertext digest -> MAC of its plaintext); see `unsealing`.
    sealed_macs: Mapping[str, str] = field(default_factory=dict)
    ledger: Mapping[str, str] = field(default_factory=dict)

    def sealed_in_sync(self, resource: FileResource | SettingResource) -> bool:
        """Is what the device holds for a sealed resource what its ciphertext opened to?"""
        assert resource.sealed is not None
        want = self.ledger.get(resource.sealed.digest())
        return bool(want) and self.sealed_macs.get(resource.id) == want


# The steps: a closed set. Each names the resource it serves (if any) and why it exists.


@dataclass(frozen=True, slots=True)
class WriteFile:
    """Write ``content`` to ``path`` atomically with ``mode``; ``manage``: the shim owns it.

    With ``sealed``, the content is that value's plaintext, opened only when applying.
    """

    resource_id: str
    path: str
    content: bytes = field(repr=False)
    mode: int
    manage: bool
    why: str
    sealed: Sealed | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class SetMode:
    resource_id: str
    path: str
    mode: int
    why: str


@dataclass(frozen=True, slots=True)
class DeleteManaged:
    """Remove a file the shim created and no bundle wants any more."""

    path: str
    why: str = "no longer desired"
    resource_id: str | None = None


@dataclass(frozen=True, slots=True)
class SetSetting:
    resource_id: str
    key: str
    value: SettingValue = field(repr=False)  # may be secret: never in a repr or a log
    secret: bool
    why: str
    sealed: Sealed | None = field(default=None, repr=False)  # the value, opened at apply


@dataclass(frozen=True, slots=True)
class RemoveSetting:
    key: str
    why: str = "no longer desired"
    resource_id: str | None = None


@dataclass(frozen=True, slots=True)
class RunCommand:
    resource_id: str
    check: str
    apply: str
    timeout: int
    why: str


@dataclass(frozen=True, slots=True)
class Skip:
    """A visible no-op: the device does not permit this resource."""

    resource_id: str
    why: str


@dataclass(frozen=True, slots=True)
class Blocked:
    """The resource cannot be applied as it stands; running this step fails the apply."""

    resource_id: str
    why: str
    permanent: bool = True


@dataclass(frozen=True, slots=True)
class Wait:
    """A visible no-op: nothing can be done yet (``why`` says what it waits for)."""

    why: str
    resource_id: str | None = None


Step = (
    WriteFile
    | SetMode
    | DeleteManaged
    | SetSetting
    | RemoveSetting
    | RunCommand
    | Skip
    | Blocked
    | Wait
)
CHANGES: tuple[type, ...] = (WriteFile, SetMode, DeleteManaged, SetSetting, RemoveSetting)


def same_value(a: SettingValue, b: SettingValue) -> bool:
    """Equal and of the same type (``1``, ``1.0`` and ``True`` are different settings)."""
    return type(a) is type(b) and a == b


_BLOCKED_WHY: Mapping[str, str] = {
    "symlink": "path is a symbolic link; setpoint manages regular files only",
    "not-regular": "path is not a regular file",
    "escapes": "path leads outside the device root (through a symlink)",
    "reserved": "path is inside setpoint's own directory",
}


def _plan_file(
    resource: FileResource, fact: FileFact | None, observed: Observed, policy: DevicePolicy
) -> Step | None:
    refusal = policy.refuses_mode(resource.mode)
    if refusal is not None:
        return Blocked(resource.id, refusal)
    if fact is None:
        return Blocked(resource.id, "path was not observed", permanent=False)
    if fact.condition in _BLOCKED_WHY:
        detail = f" ({fact.detail})" if fact.detail else ""
        return Blocked(resource.id, _BLOCKED_WHY[fact.condition] + detail)
    if fact.condition == "error" or fact.real is None:
        return Blocked(resource.id, f"cannot observe: {fact.detail}", permanent=False)
    value = resource.sealed
    if fact.condition == "missing":
        return WriteFile(
            resource.id, fact.real, resource.content, resource.mode, True, "missing", value
        )
    if (
        not observed.sealed_in_sync(resource)
        if value is not None
        else fact.sha256 != content_sha256(resource.content)
    ):
        return WriteFile(
            resource.id,
            fact.real,
            resource.content,
            resource.mode,
            fact.real in observed.managed_files,
            "content differs",
            value,
        )
    if fact.mode != resource.mode:
        shown = "?" if fact.mode is None else f"{fact.mode:04o}"
        return SetMode(
            resource.id, fact.real, resource.mode, f"mode {shown}, want {resource.mode:04o}"
        )
    return None


@functools.lru_cache(maxsize=256)
def content_sha256(content: bytes) -> str:
    """SHA-256 of desired content, cached: the same bundle is compared every interval."""
    return hashlib.sha256(content).hexdigest()


def _plan_setting(resource: SettingResource, observed: Observed) -> Step | None:
    fact = observed.settings
    why = None
    if not fact.readable:
        why = (
            f"settings file unreadable ({fact.detail})" if fact.detail else "settings file missing"
        )
    elif resource.key not in fact.values:
        why = "missing"
    elif (
        not observed.sealed_in_sync(resource)
        if resource.sealed is not None
        else not same_value(fact.values[resource.key], resource.value)
    ):
        why = "value differs"
    if why is None:
        return None
    return SetSetting(
        resource.id, resource.key, resource.value, resource.secret, why, resource.sealed
    )


def _plan_command(
    resource: CommandResource, fact: CommandFact | None, policy: DevicePolicy
) -> Step | None:
    refusal = policy.refuses_command(resource.check, resource.apply)
    if refusal is not None:
        return Skip(resource.id, refusal)
    if fact is not None and fact.passed is False:
        why = f"check failed ({fact.detail})" if fact.detail else "check failed"
        return RunCommand(
            resource.id, resource.check, resource.apply, policy.timeout(resource.timeout), why
        )
    return None


def plan(
    desired: Sequence[Resource],
    observed: Observed,
    policy: DevicePolicy = DEFAULT_POLICY,
) -> list[Step]:
    """The steps that make the device match ``desired`` (empty when it already does)."""
    blocked: list[Step] = []
    files: list[Step] = []
    settings: list[Step] = []
    commands: list[Step] = []
    skips: list[Step] = []
    desired_real: set[str] = set()
    desired_keys: set[str] = set()
    path_owner: dict[str, str] = {}
    key_owner: dict[str, str] = {}

    for resource in desired:
        step: Step | None
        if isinstance(resource, FileResource):
            fact = observed.files.get(resource.path)
            real = fact.real if fact is not None and fact.real is not None else resource.path
            if real in path_owner:
                step = Blocked(resource.id, f"same path as resource {path_owner[real]!r}")
            else:
                path_owner[real] = resource.id
                desired_real.add(real)
                step = _plan_file(resource, fact, observed, policy)
        elif isinstance(resource, SettingResource):
            if resource.key in key_owner:
                step = Blocked(resource.id, f"same key as resource {key_owner[resource.key]!r}")
            else:
                key_owner[resource.key] = resource.id
                desired_keys.add(resource.key)
                step = _plan_setting(resource, observed)
        else:
            step = _plan_command(resource, observed.commands.get(resource.id), policy)
        if step is None:
            continue
        if isinstance(step, Blocked):
            blocked.append(step)
        elif isinstance(step, SetSetting):
            settings.append(step)
        elif isinstance(step, RunCommand):
            commands.append(step)
        elif isinstance(step, Skip):
            skips.append(step)
        else:
            files.append(step)

    deletes: list[Step] = [
        DeleteManaged(path) for path in sorted(observed.managed_files - desired_real)
    ]
    removals: list[Step] = []
    if observed.settings.readable:
        removals = [
            RemoveSetting(key)
            for key in sorted(observed.managed_settings - desired_keys)
            if key in observed.settings.values
        ]
    return [*blocked, *files, *deletes, *settings, *removals, *commands, *skips]


def changes(steps: Sequence[Step]) -> list[Step]:
    """The steps that would change the device (no Skip, Wait or Blocked)."""
    return [s for s in steps if isinstance(s, (*CHANGES, RunCommand))]


def managed_files_after(steps: Sequence[Step], managed: frozenset[str]) -> frozenset[str]:
    """The files the shim owns once ``steps`` have run."""
    deleted = {s.path for s in steps if isinstance(s, DeleteManaged)}
    created = {s.path for s in steps if isinstance(s, WriteFile) and s.manage}
    return frozenset((managed - deleted) | created)
