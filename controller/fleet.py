"""The fleet repository's files and their validation: ``fleet.yaml``, groups, devices.

An operator commits::

    fleet.yaml               fleet-wide settings (optional)
    groups/<group>.yaml      mode, the branch it tracks, resources
    devices/<device>.yaml    group, vars, resources that add to or replace the group's

:func:`load` reads one *view* of the repository (one commit's tree, or a work tree)
through a :class:`Tree` and returns a :class:`Snapshot`: every group and device that
validated, the ids of those that did not, and a :class:`Problem` per finding, each naming
the file, the item and the fix (``groups/kiosk.yaml: resource 'motd': unknown kind 'fiel'
(known: command, file, setting)``). It never stops at the first problem: a broken file
breaks only the targets that depend on it. :func:`update` works the snapshot of a commit
out from the previous one and the git tree diff between them, when only group or device
files were modified.

The schemas are pydantic models with ``extra='forbid'`` and strict types (YAML already
gives native types; ``"60"`` is not a timeout). YAML goes through :mod:`safeyaml`.

Pure; no I/O beyond the :class:`Tree` it is given.
"""

from __future__ import annotations

import functools
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from setpoint.proto import bundles, sealed
from setpoint.proto.bundles import CommandResource, FileResource, Resource, SettingResource
from setpoint.proto.errors import InvalidId, SchemaError
from setpoint.proto.sealed import Sealed
from setpoint.proto.topics import validate_id, validate_id_for_engine

from . import gating, safeyaml
from .errors import Problem

FLEET_FILE: Final = "fleet.yaml"
GROUPS_DIR: Final = "groups"
DEVICES_DIR: Final = "devices"
YAML_SUFFIXES: Final = (".yaml", ".yml")
MAX_SOURCE_BYTES: Final = 512 * 1024
MAX_FILES: Final = 100_000
DEFAULT_BUNDLE_TTL: Final = 7 * 24 * 3600
_VAR_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_DURATION: Final = re.compile(r"(\d+)\s*([smhdw]?)")
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MODE_TEXT: Final = re.compile(r"(?:0o?)?([0-7]{1,4})")


# --- Reading a view ------------------------------------------------------------------


class Tree(Protocol):
    """Read-only access to one view of the repository (a commit's tree or a work tree)."""

    def list_yaml(self, directory: str) -> list[str]:
        """Names of the regular files directly in ``directory`` (empty if it is missing)."""
        ...

    def read(self, path: str, max_bytes: int) -> bytes | None:
        """The bytes of the regular file at ``path``, or None if there is none.

        Raises :class:`TreeError` for a symlink, a directory, or a file over ``max_bytes``.
        """
        ...


class VersionedTree(Tree, Protocol):
    """A tree that says what identifies each file's content (a git tree: mode and blob id)."""

    def blob_id(self, path: str) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class _Reading:
    """One device file as read before: every file it took (with what identified them then)
    and what came of it."""

    depends: tuple[tuple[str, bytes | None], ...]
    plaintext_ok: bool
    device: Device | None
    problems: tuple[Problem, ...]
    warnings: tuple[Problem, ...]


class _Recording:
    """A tree that notes what identifies each file read through it."""

    def __init__(self, tree: VersionedTree) -> None:
        self._tree = tree
        self.read_ids: list[tuple[str, bytes | None]] = []

    def list_yaml(self, directory: str) -> list[str]:
        raise AssertionError("a device file lists no directory")  # pragma: no cover

    def read(self, path: str, max_bytes: int) -> bytes | None:
        self.read_ids.append((path, self._tree.blob_id(path)))
        return self._tree.read(path, max_bytes)


class Memo:
    """What :func:`load` read from device files before, for a commit that left a device's
    file, and every file it names, as they were: its reading is taken again instead of
    parsing and validating it anew (work proportional to what changed). Only for trees
    that identify their files' content (:class:`VersionedTree`). Holds one reading per
    device file path seen."""

    def __init__(self) -> None:
        self._readings: dict[str, _Reading] = {}
        self.reused = 0

    def get(self, path: str, tree: VersionedTree, plaintext_ok: bool) -> _Reading | None:
        reading = self._readings.get(path)
        if reading is None or reading.plaintext_ok != plaintext_ok:
            return None
        if any(tree.blob_id(p) != blob for p, blob in reading.depends):
            return None
        self.reused += 1
        return reading

    def put(self, path: str, reading: _Reading) -> None:
        self._readings[path] = reading


class TreeError(Exception):
    """A path in the tree that exists but cannot be used (symlink, directory, too large)."""


# --- Schemas -------------------------------------------------------------------------

SettingValue = str | int | float | bool | None


def _scalar(value: Any) -> SettingValue:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise ValueError("must be a string, number, boolean or null (not a list or mapping)")


def parse_duration(value: Any) -> int:
    """Seconds from an integer or a string: ``90``, ``45s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    if isinstance(value, bool):
        raise ValueError("must be a number of seconds or a duration like '7d'")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration: write seconds or e.g. '30m', '12h', '7d'")
    if seconds < 1:
        raise ValueError("must be at least 1 second")
    return seconds


def parse_mode(value: Any) -> int:
    """Permission bits from ``"0644"``, ``0644``, ``644``, ``"0o644"`` (always octal)."""
    if isinstance(value, bool):
        raise ValueError("must be octal permission bits like '0644'")
    if isinstance(value, int):
        # Only reached from Python callers: the YAML loader keeps `mode:` as text.
        mode = value
    elif isinstance(value, str) and (match := _MODE_TEXT.fullmatch(value.strip())):
        mode = int(match.group(1), 8)
    else:
        raise ValueError(f"{value!r} is not octal permission bits: write it like '0644'")
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"{value!r} is out of range (0000-7777)")
    return mode


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class GateSpec(_Strict):
    """A ring's gate: promotes ``from`` a ring once its devices proved the content."""

    source: str = Field(alias="from")
    in_sync: Any = 1.0
    healthy_for: Any = 0
    max_unhealthy: int = 0
    approval: bool = False

    @field_validator("in_sync")
    @classmethod
    def _share(cls, value: Any) -> float:
        return gating.parse_share(value)

    @field_validator("healthy_for")
    @classmethod
    def _healthy_for(cls, value: Any) -> int:
        return 0 if value == 0 else parse_duration(value)

    @field_validator("max_unhealthy")
    @classmethod
    def _max(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more")
        return value

    def gate(self) -> gating.Gate:
        return gating.Gate(
            self.source, self.in_sync, self.healthy_for, self.max_unhealthy, self.approval
        )


class RingSpec(_Strict):
    """One ring of ``rings:`` in ``fleet.yaml``: a branch, and its gate after the first."""

    branch: str
    gate: GateSpec | None = None

    @field_validator("branch")
    @classmethod
    def _branch(cls, value: str) -> str:
        return validate_id(value, "ring branch")


class OperatorSpec(_Strict):
    """A person who may approve, pause and resume rollouts: a name and a public key (PEM)."""

    name: str
    key: str


class FleetSettings(_Strict):
    """``fleet.yaml``: settings for the whole fleet (read from the default branch; ``rings``
    and ``operators`` from the protected branch, see ``protection``)."""

    description: str | None = None
    allow_empty: bool = False
    # Plaintext `secret: true` values in device files (group files never: see docs/secrets.md).
    allow_plaintext_secret: bool = False
    bundle_ttl: Any = None
    rings: list[RingSpec] = []
    operators: list[OperatorSpec] = []
    # The MQTT engine the fleet runs on: ids it cannot carry in a topic are refused per
    # target (proto/SPEC.md section 2). "mqtt" is any standard broker.
    engine: Literal["mqtt", "nats"] = "mqtt"

    @field_validator("bundle_ttl")
    @classmethod
    def _ttl(cls, value: Any) -> int | None:
        return None if value is None else parse_duration(value)

    @model_validator(mode="after")
    def _rings(self) -> FleetSettings:
        problems = gating.check_rings(self.ring_list().rings)
        if problems:
            raise ValueError("rings: " + "; ".join(problems))
        return self

    def ring_list(self) -> gating.Rings:
        return gating.Rings(
            tuple(gating.Ring(r.branch, r.gate.gate() if r.gate else None) for r in self.rings)
        )


class SealedSpec(_Strict):
    """``sealed:``: an age ciphertext (ASCII armour) and its recipients' key ids."""

    age: str
    recipients: list[str]

    def value(self) -> Sealed:
        try:
            return sealed.from_map(
                {"age": sealed.normal_armor(self.age), "recipients": self.recipients}, "sealed"
            )
        except SchemaError as exc:
            raise ValueError(str(exc).removeprefix("sealed: ")) from None


class FileSpec(_Strict):
    id: str
    kind: Literal["file"]
    path: str
    content: str | None = None
    source: str | None = None
    sealed: SealedSpec | None = None
    mode: Any = None
    special_mode: bool = False  # the author means a setuid/setgid/sticky/world-writable mode

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: Any) -> int | None:
        return None if value is None else parse_mode(value)

    @model_validator(mode="after")
    def _risky(self) -> FileSpec:
        risky = None if self.mode is None else bundles.risky_mode(self.mode)
        if risky is not None and not self.special_mode:
            raise ValueError(
                f"mode: {self.mode:04o} is {risky}: devices refuse it unless their own policy"
                " allows it (allow_special_modes); if it is meant, say so with"
                " 'special_mode: true', else use a mode like 0755"
            )
        return self


class SettingSpec(_Strict):
    id: str
    kind: Literal["setting"]
    key: str
    value: Any = None
    secret: bool = False
    sealed: SealedSpec | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not 1 <= len(value) <= 256:
            raise ValueError("must be 1-256 characters")
        return value

    @field_validator("value")
    @classmethod
    def _value(cls, value: Any) -> SettingValue:
        return _scalar(value)


class CommandSpec(_Strict):
    id: str
    kind: Literal["command"]
    check: str
    apply: str
    timeout: int = 60

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: int) -> int:
        if not 1 <= value <= 3600:
            raise ValueError("must be 1-3600 seconds")
        return value


RESOURCE_SPECS: Final[Mapping[str, type[_Strict]]] = {
    "command": CommandSpec,
    "file": FileSpec,
    "setting": SettingSpec,
}


class RolloutSpec(_Strict):
    """``rollout:`` in a group file: batches, the pause between them, what halts."""

    batch: Any = None
    pause: Any = 0
    order: list[str] = []
    by: str | None = None
    success: Any = 1.0
    max_failures: int = 0
    on_failure: Literal["halt", "revert"] = "halt"

    @field_validator("batch")
    @classmethod
    def _batch(cls, value: Any) -> int | float | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("must be at least 1 device (or a share like '25%')")
            return value
        share = gating.parse_share(value)
        if share <= 0:
            raise ValueError("must be more than 0%")
        return share

    @field_validator("pause")
    @classmethod
    def _pause(cls, value: Any) -> int:
        return 0 if value == 0 else parse_duration(value)

    @field_validator("success")
    @classmethod
    def _success(cls, value: Any) -> float:
        return gating.parse_share(value)

    @field_validator("max_failures")
    @classmethod
    def _max(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more")
        return value

    def policy(self) -> gating.BatchPolicy:
        size = self.batch if isinstance(self.batch, int) else None
        share = self.batch if isinstance(self.batch, float) else None
        return gating.BatchPolicy(
            size=size,
            share=share,
            pause=self.pause,
            order=tuple(self.order),
            by=self.by,
            success=self.success,
            max_failures=self.max_failures,
            on_failure=self.on_failure,
        )


class WindowSpec(_Strict):
    """``window:`` in a group file: when new versions may start rolling out."""

    days: list[str] = list(gating.DAYS)
    hours: str = "00:00-24:00"
    tz: str = "UTC"

    @model_validator(mode="after")
    def _check(self) -> WindowSpec:
        gating.parse_window(self.days, self.hours, self.tz)
        return self

    def window(self) -> gating.Window:
        return gating.parse_window(self.days, self.hours, self.tz)


class GroupSpec(_Strict):
    """``groups/<group>.yaml``."""

    description: str | None = None
    mode: Literal["enforce", "observe"] = "enforce"
    branch: str | None = None
    resources: list[Any] = []
    rollout: RolloutSpec | None = None
    window: WindowSpec | None = None

    @field_validator("branch")
    @classmethod
    def _branch(cls, value: str | None) -> str | None:
        if value is not None and not _valid_branch(value):
            raise ValueError(f"{value!r} is not a valid branch name")
        return value


class DeviceSpec(_Strict):
    """``devices/<device>.yaml``."""

    description: str | None = None
    group: str
    recipient: str | None = None
    vars: dict[str, Any] = {}
    resources: list[Any] = []

    @field_validator("recipient")
    @classmethod
    def _recipient(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                sealed.check_recipient(value, "recipient")
            except SchemaError as exc:
                raise ValueError(str(exc).removeprefix("recipient: ")) from None
        return value

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        return validate_id(value, "group id")

    @field_validator("vars")
    @classmethod
    def _vars(cls, value: dict[str, Any]) -> dict[str, SettingValue]:
        for name, item in value.items():
            if _VAR_NAME.fullmatch(name) is None:
                raise ValueError(
                    f"var name {name!r} is not valid: use letters, digits and '_',"
                    " starting with a letter or '_'"
                )
            try:
                _scalar(item)
            except ValueError as exc:
                raise ValueError(f"var {name!r} {exc}") from None
        return value


def _valid_branch(name: str) -> bool:
    # The subset of git-check-ref-format that matters here: no traversal, no control
    # characters, nothing git itself would refuse.
    if not name or len(name) > 200 or name.startswith(("/", "-", ".")) or name.endswith(("/", ".")):
        return False
    if ".." in name or "//" in name or "@{" in name or name.endswith(".lock"):
        return False
    return all(c > " " and c not in "~^:?*[\\\x7f" for c in name)


# --- What a view contains -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Group:
    id: str
    file: str
    mode: Literal["enforce", "observe"]
    branch: str | None
    resources: tuple[Resource, ...]
    rollout: gating.BatchPolicy | None = None
    window: gating.Window | None = None


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    file: str
    group: str
    vars: Mapping[str, SettingValue]
    resources: tuple[Resource, ...]
    group_line: int | None = field(default=None, compare=False)
    recipient: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One view of the fleet: what validated, what did not, and why."""

    settings: FleetSettings | None
    groups: Mapping[str, Group] = field(default_factory=dict)
    devices: Mapping[str, Device] = field(default_factory=dict)
    broken_groups: frozenset[str] = frozenset()
    broken_devices: frozenset[str] = frozenset()
    problems: tuple[Problem, ...] = ()
    # Findings that do not stop a publication (a value not sealed for a device, ...).
    warnings: tuple[Problem, ...] = ()
    # This snapshot's identity, and, when :func:`update` worked it out from another, that
    # one's ``token`` and the ids of the groups and devices whose files changed: a render
    # of the other can be carried over, re-rendering only those (rendering.render).
    token: object = field(default_factory=object, compare=False, repr=False)
    derived: tuple[object, frozenset[str], frozenset[str]] | None = field(
        default=None, compare=False, repr=False
    )
    # Per group, its devices' ids, and whether any resource is sealed (None: not worked
    # out): what lets :func:`update` look only at what changed.
    members: Mapping[str, frozenset[str]] | None = field(default=None, compare=False, repr=False)
    sealed: bool | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def group_ids(self) -> frozenset[str]:
        return frozenset(self.groups) | self.broken_groups

    @property
    def device_ids(self) -> frozenset[str]:
        return frozenset(self.devices) | self.broken_devices


class _Collector:
    """Problems found while loading one file, each prefixed with the file name."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []

    def add(self, message: str, item: str | None = None, line: int | None = None) -> None:
        text = f"{item}: {message}" if item else message
        self.problems.append(Problem(self.file, text, line))

    def warn(self, message: str, item: str | None = None, line: int | None = None) -> None:
        text = f"{item}: {message}" if item else message
        self.warnings.append(Problem(self.file, text, line))

    def add_validation(
        self,
        exc: ValidationError,
        model: type[BaseModel],
        item: str | None,
        raw: Mapping[str, Any] | None = None,
    ) -> None:
        known = ", ".join(sorted(model.model_fields))
        seen: set[tuple[Any, ...]] = set()
        for error in exc.errors():
            loc = tuple(error["loc"])
            # A union reports one error per member; one line per field is enough.
            key = loc[:1]
            if key in seen:
                continue
            seen.add(key)
            name = ".".join(str(part) for part in loc)
            kind = error["type"]
            line = safeyaml.line_of(raw, loc[0] if loc else None)
            if kind == "extra_forbidden":
                self.add(f"unknown key {name!r} (known: {known})", item, line)
            elif kind == "missing":
                self.add(f"missing key {name!r}", item, line)
            else:
                message = str(error["msg"]).removeprefix("Value error, ")
                self.add(f"{name}: {message}" if name else message, item, line)


@functools.lru_cache(maxsize=32768)
def _load_cached(data: bytes) -> Any:
    return safeyaml.load(data)


def _load_yaml(data: bytes) -> Any:
    """Parse YAML; small documents are cached by content, so a commit that changes one file
    of a large fleet re-parses one file. The result is shared: never mutate it."""
    if len(data) <= 8192:
        return _load_cached(data)
    return safeyaml.load(data)


def _parse_document(tree: Tree, path: str, collector: _Collector) -> dict[str, Any] | None:
    """The mapping in the YAML file at ``path``, or None after recording why not."""
    try:
        data = tree.read(path, safeyaml.MAX_YAML_BYTES)
    except TreeError as exc:
        collector.add(str(exc))
        return None
    if data is None:
        return {}
    try:
        document = _load_yaml(data)
    except safeyaml.YamlError as exc:
        collector.add(str(exc), line=exc.line)
        return None
    if document is None:
        return {}
    if not isinstance(document, dict):
        collector.add(
            f"the file must hold a mapping of keys, not a {type(document).__name__}"
            " (see `setpoint init` for an example)"
        )
        return None
    bad_keys = [k for k in document if not isinstance(k, str)]
    if bad_keys:
        collector.add(f"keys must be strings, not {bad_keys[0]!r}")
        return None
    return document


def _validate(
    model: type[_Strict], raw: Mapping[str, Any], collector: _Collector, item: str | None = None
) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        collector.add_validation(exc, model, item, raw)
        return None


def _source_path(value: str) -> str:
    if not value or value.startswith("/") or "\\" in value or "\x00" in value:
        raise ValueError(f"source {value!r} must be a path relative to the repository root")
    normal = posixpath.normpath(value)
    if normal != value or normal == "." or normal.startswith("../") or normal == "..":
        raise ValueError(f"source {value!r} must be a normalised path inside the repository")
    return value


@dataclass(frozen=True, slots=True)
class _Owner:
    """Whose file a resource list is in, and what that file may hold."""

    kind: Literal["group", "device"]
    id: str
    allow_plaintext_secret: bool = False

    def seal_hint(self, rid: str) -> str:
        return f"setpoint secrets seal --{self.kind} {self.id} --resource {rid} --write"


def _resources(
    raw_list: Sequence[Any], tree: Tree, collector: _Collector, owner: _Owner
) -> tuple[Resource, ...] | None:
    """Validate a ``resources:`` list; None if any item is wrong (problems recorded)."""
    before = len(collector.problems)
    out: list[Resource] = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(raw_list, start=1):
        item = f"resource #{index}"
        line = safeyaml.line_of(raw)
        if not isinstance(raw, dict):
            collector.add("must be a mapping with at least 'id' and 'kind'", item)
            continue
        rid = raw.get("id")
        if rid is None:
            collector.add("missing key 'id'", item, line)
            continue
        try:
            validate_id(rid, "resource id")
        except InvalidId as exc:
            collector.add(str(exc), item, safeyaml.line_of(raw, "id"))
            continue
        item = f"resource {rid!r}"
        if rid in first_index:
            collector.add(
                f"duplicate id (resource #{first_index[rid]} has it too); resource ids must be"
                " unique in a file",
                item,
                safeyaml.line_of(raw, "id"),
            )
            continue
        first_index[rid] = index
        kind = raw.get("kind")
        known = ", ".join(sorted(RESOURCE_SPECS))
        if kind is None:
            collector.add(f"missing key 'kind' (known: {known})", item, line)
            continue
        model = RESOURCE_SPECS.get(kind) if isinstance(kind, str) else None
        if model is None:
            collector.add(
                f"unknown kind {kind!r} (known: {known})", item, safeyaml.line_of(raw, "kind")
            )
            continue
        spec = _validate(model, raw, collector, item)
        if spec is None:
            continue
        resource = _resource(spec, tree, collector, item, raw, owner)
        if resource is not None:
            out.append(resource)
    if len(collector.problems) != before:
        return None
    return tuple(out)


def _sealed(
    spec: SealedSpec, collector: _Collector, item: str, raw: Mapping[str, Any]
) -> Sealed | None:
    try:
        return spec.value()
    except ValueError as exc:
        collector.add(f"sealed: {exc}", item, safeyaml.line_of(raw, "sealed"))
        return None


def _setting(
    spec: SettingSpec, collector: _Collector, item: str, raw: Mapping[str, Any], owner: _Owner
) -> Resource | None:
    line = safeyaml.line_of(raw, "secret")
    if spec.sealed is not None:
        if spec.value is not None:
            collector.add("give 'value' or 'sealed', not both", item, safeyaml.line_of(raw))
            return None
        value = _sealed(spec.sealed, collector, item, raw)
        return None if value is None else SettingResource(spec.id, spec.key, None, True, value)
    if spec.secret and owner.kind == "group":
        collector.add(
            "'secret: true' with a plaintext value in a group file: every device can read the"
            f" group's bundle; seal it instead (`{owner.seal_hint(spec.id)} --from-stdin`,"
            " docs/secrets.md)",
            item,
            line,
        )
        return None
    if spec.secret and not owner.allow_plaintext_secret:
        collector.add(
            f"'secret: true' with a plaintext value: seal it (`{owner.seal_hint(spec.id)}"
            " --from-stdin`), or set 'allow_plaintext_secret: true' in fleet.yaml to accept"
            " plaintext secrets in device files",
            item,
            line,
        )
        return None
    return SettingResource(spec.id, spec.key, spec.value, spec.secret)


def _resource(
    spec: Any,
    tree: Tree,
    collector: _Collector,
    item: str,
    raw: Mapping[str, Any],
    owner: _Owner,
) -> Resource | None:
    if isinstance(spec, SettingSpec):
        return _setting(spec, collector, item, raw, owner)
    if isinstance(spec, CommandSpec):
        return CommandResource(spec.id, spec.check, spec.apply, spec.timeout)
    assert isinstance(spec, FileSpec)
    try:
        bundles.validate_path(spec.path, "path")
    except SchemaError as exc:
        message = str(exc).removeprefix("path: ")
        collector.add(
            f"{message}; a file resource's path is relative to the device root",
            item,
            safeyaml.line_of(raw, "path"),
        )
        return None
    if [spec.content, spec.source, spec.sealed].count(None) != 2:
        collector.add(
            "give exactly one of 'content' (the text inline), 'source' (a file in the"
            " repository) or 'sealed' (from `setpoint secrets seal`)",
            item,
            safeyaml.line_of(raw),
        )
        return None
    if spec.sealed is not None:
        value = _sealed(spec.sealed, collector, item, raw)
        # Sealed files are private unless the operator says otherwise.
        mode = 0o600 if spec.mode is None else spec.mode
        return None if value is None else FileResource(spec.id, spec.path, b"", mode, value)
    mode = 0o644 if spec.mode is None else spec.mode
    if owner.kind == "group" and mode & 0o077 == 0:
        collector.warn(
            f"mode {mode:04o} says this file is private, but its content is plaintext in the"
            " group's bundle, which every device can read; seal it"
            f" (`{owner.seal_hint(spec.id)} --from-file FILE`) or move it to a device file",
            item,
            safeyaml.line_of(raw, "mode"),
        )
    if spec.content is not None:
        return FileResource(spec.id, spec.path, spec.content.encode("utf-8"), mode)
    assert spec.source is not None
    try:
        source = _source_path(spec.source)
        data = tree.read(source, MAX_SOURCE_BYTES)
    except (ValueError, TreeError) as exc:
        collector.add(str(exc), item, safeyaml.line_of(raw, "source"))
        return None
    if data is None:
        collector.add(
            f"source {spec.source!r} does not exist in the repository; add and commit it, or"
            " fix the path (relative to the repository root)",
            item,
            safeyaml.line_of(raw, "source"),
        )
        return None
    return FileResource(spec.id, spec.path, data, mode)


def _target_files(tree: Tree, directory: str, what: str, problems: list[Problem]) -> dict[str, str]:
    """Map target id to its file under ``directory``; bad names become problems."""
    files: dict[str, str] = {}
    names = tree.list_yaml(directory)
    if len(names) > MAX_FILES:
        problems.append(Problem(directory, f"more than {MAX_FILES} files"))
        names = names[:MAX_FILES]
    for name in sorted(names):
        stem, suffix = posixpath.splitext(name)
        if suffix not in YAML_SUFFIXES:
            continue
        path = f"{directory}/{name}"
        try:
            validate_id(stem, f"{what} id")
        except InvalidId as exc:
            problems.append(Problem(path, f"{exc}; rename the file"))
            continue
        if stem in files:
            problems.append(
                Problem(path, f"{what} {stem!r} is also defined in {files[stem]}; keep one file")
            )
            continue
        files[stem] = path
    return files


def _fits_engine(tid: str, path: str, what: str, engine: str, problems: list[Problem]) -> bool:
    """False (with a problem) for a target whose id ``engine`` cannot carry in a topic: only
    that target is refused, the rest of the fleet is published."""
    try:
        validate_id_for_engine(tid, engine, f"{what} id")
    except InvalidId as exc:
        problems.append(Problem(path, f"{exc}; rename the file"))
        return False
    return True


def _check_effective(device: Device, group: Group, collector: _Collector) -> bool:
    """The merged resources of a device must not put two files on one path."""
    merged: dict[str, Resource] = {r.id: r for r in group.resources}
    merged.update((r.id, r) for r in device.resources)
    paths: dict[str, str] = {}
    keys: dict[str, str] = {}
    ok = True
    for resource in merged.values():
        if isinstance(resource, FileResource):
            other = paths.setdefault(resource.path, resource.id)
            if other != resource.id:
                collector.add(
                    f"resources {other!r} and {resource.id!r} both manage path"
                    f" {resource.path!r} (with group {group.id!r}); keep one",
                )
                ok = False
        elif isinstance(resource, SettingResource):
            other = keys.setdefault(resource.key, resource.id)
            if other != resource.id:
                collector.add(
                    f"resources {other!r} and {resource.id!r} both set key"
                    f" {resource.key!r} (with group {group.id!r}); keep one",
                )
                ok = False
    return ok


def load(tree: Tree, *, engine: str | None = None, memo: Memo | None = None) -> Snapshot:
    """Read and validate one view of the fleet repository; ``engine`` (else ``fleet.yaml``'s
    ``engine:``) also refuses the ids that engine cannot carry in a topic. With a ``memo``
    (and a tree that identifies its files' content), device files read before as they are
    now are not read again."""
    versioned: VersionedTree | None = (
        tree if memo is not None and hasattr(tree, "blob_id") else None
    )  # type: ignore[assignment]
    problems: list[Problem] = []
    warnings: list[Problem] = []

    collector = _Collector(FLEET_FILE)
    document = _parse_document(tree, FLEET_FILE, collector)
    settings = None if document is None else _validate(FleetSettings, document, collector)
    problems.extend(collector.problems)
    engine = engine or (settings.engine if settings else "mqtt")

    groups: dict[str, Group] = {}
    broken_groups: set[str] = set()
    for gid, path in _target_files(tree, GROUPS_DIR, "group", problems).items():
        if not _fits_engine(gid, path, "group", engine, problems):
            broken_groups.add(gid)
            continue
        collector = _Collector(path)
        group = _load_group(gid, path, tree, collector)
        problems.extend(collector.problems)
        warnings.extend(collector.warnings)
        if group is None:
            broken_groups.add(gid)
        else:
            groups[gid] = group

    devices: dict[str, Device] = {}
    broken_devices: set[str] = set()
    plaintext_ok = bool(settings and settings.allow_plaintext_secret)
    for did, path in _target_files(tree, DEVICES_DIR, "device", problems).items():
        if not _fits_engine(did, path, "device", engine, problems):
            broken_devices.add(did)
            continue
        collector = _Collector(path)
        device = _read_device(did, path, tree, collector, plaintext_ok, versioned, memo)
        if device is not None:
            if device.group in broken_groups:
                device = None  # its group's file carries the problem
            elif device.group not in groups:
                known = ", ".join(sorted(groups | dict.fromkeys(broken_groups))) or "none"
                collector.add(
                    f"group {device.group!r} does not exist (groups: {known}); create"
                    f" groups/{device.group}.yaml or fix the name",
                    line=device.group_line,
                )
                device = None
            elif not _check_effective(device, groups[device.group], collector):
                device = None
        problems.extend(collector.problems)
        warnings.extend(collector.warnings)
        if device is None:
            broken_devices.add(did)
        else:
            devices[did] = device
    warnings.extend(sealing_warnings(groups, devices))

    if not (problems or groups or devices or broken_groups or broken_devices):
        problems.extend(_empty_fleet(tree, settings))

    return Snapshot(
        settings=settings,
        groups=groups,
        devices=devices,
        broken_groups=frozenset(broken_groups),
        broken_devices=frozenset(broken_devices),
        problems=tuple(problems),
        warnings=tuple(warnings),
    )


def update(
    previous: Snapshot,
    tree: Tree,
    changes: Sequence[tuple[str, str]],
    *,
    memo: Memo | None = None,
) -> Snapshot | None:
    """The snapshot of ``tree`` worked out from ``previous``, the snapshot of a tree that
    differs from it by ``changes`` (``(git change type, path)``, from the git tree diff):
    work proportional to what changed. Only the changed group and device files are read;
    the devices of a changed group are checked against it again. None when this cannot be
    sure to give what :func:`load` gives: ``previous`` had a problem, a broken target or a
    warning, a file was added, deleted or renamed, a file outside ``groups/`` and
    ``devices/`` changed (``fleet.yaml``, a file a resource names), or a changed file has
    a finding now. Then the caller loads the whole tree."""
    if previous.problems or previous.warnings or previous.broken_groups:
        return None
    if previous.broken_devices:
        return None
    changed_groups: dict[str, str] = {}
    changed_devices: dict[str, str] = {}
    for kind, path in changes:
        directory, _, name = path.partition("/")
        stem, suffix = posixpath.splitext(name)
        if kind != "modify" or "/" in name or suffix not in YAML_SUFFIXES:
            return None
        group = previous.groups.get(stem) if directory == GROUPS_DIR else None
        device = previous.devices.get(stem) if directory == DEVICES_DIR else None
        if group is not None and group.file == path:
            changed_groups[stem] = path
        elif device is not None and device.file == path:
            changed_devices[stem] = path
        else:
            return None
    groups = dict(previous.groups)
    for gid, path in changed_groups.items():
        collector = _Collector(path)
        loaded = _load_group(gid, path, tree, collector)
        if loaded is None or collector.problems or collector.warnings:
            return None
        groups[gid] = loaded
    devices = dict(previous.devices)
    plaintext_ok = bool(previous.settings and previous.settings.allow_plaintext_secret)
    versioned: VersionedTree | None = (
        tree if memo is not None and hasattr(tree, "blob_id") else None
    )  # type: ignore[assignment]
    for did, path in changed_devices.items():
        collector = _Collector(path)
        read = _read_device(did, path, tree, collector, plaintext_ok, versioned, memo)
        if read is None or collector.problems or collector.warnings or read.group not in groups:
            return None
        devices[did] = read
    # Work proportional to what changed: the members of a changed group come from the
    # index, not a scan of every device; it follows the devices that changed group.
    members = dict(previous.members if previous.members is not None else _members(devices))
    for did in changed_devices:
        was, now = previous.devices[did].group, devices[did].group
        if was != now:
            members[was] = members.get(was, frozenset()) - {did}
            members[now] = members.get(now, frozenset()) | {did}
    recheck = [devices[d] for g in changed_groups for d in sorted(members.get(g, ()))]
    recheck += [devices[d] for d in changed_devices if devices[d].group not in changed_groups]
    for device in recheck:
        if not _check_effective(device, groups[device.group], _Collector(device.file)):
            return None
    # Sealed values are checked against every device only when there are any.
    sealed = previous.sealed if previous.sealed is not None else _any_sealed(previous)
    changed_targets: list[Group | Device] = [
        *(groups[g] for g in changed_groups),
        *(devices[d] for d in changed_devices),
    ]
    if sealed or any(bundles.is_sealed(r) for t in changed_targets for r in t.resources):
        if sealing_warnings(groups, devices):
            return None
        sealed = None  # worked out again by the next update, if it needs to know
    return Snapshot(
        settings=previous.settings,
        groups=groups,
        devices=devices,
        derived=(previous.token, frozenset(changed_groups), frozenset(changed_devices)),
        members=members,
        sealed=sealed,
    )


def _members(devices: Mapping[str, Device]) -> dict[str, frozenset[str]]:
    """Per group, the ids of its devices."""
    found: dict[str, set[str]] = {}
    for device in devices.values():
        found.setdefault(device.group, set()).add(device.id)
    return {group: frozenset(ids) for group, ids in found.items()}


def _any_sealed(snapshot: Snapshot) -> bool:
    targets: list[Group | Device] = [*snapshot.groups.values(), *snapshot.devices.values()]
    return any(bundles.is_sealed(r) for t in targets for r in t.resources)


def sealing_warnings(groups: Mapping[str, Group], devices: Mapping[str, Device]) -> list[Problem]:
    """Sealed values that a current device cannot open, or that a former one still can.

    Uses the recipients' key ids kept beside each ciphertext: nothing is decrypted.
    """
    targets: list[Group | Device] = [*groups.values(), *devices.values()]
    if not any(bundles.is_sealed(r) for t in targets for r in t.resources):
        return []
    missing: dict[tuple[str, str], list[str]] = {}
    no_recipient: dict[str, list[str]] = {}
    keyids: dict[str, set[str]] = {}
    hints: dict[str, str] = {}
    for device in sorted(devices.values(), key=lambda d: d.id):
        group = groups.get(device.group)
        merged: dict[str, tuple[Resource, str]] = {}
        if group is not None:
            merged.update((r.id, (r, group.file)) for r in group.resources)
            hints[group.file] = f"--group {group.id}"
        merged.update((r.id, (r, device.file)) for r in device.resources)
        hints[device.file] = f"--device {device.id}"
        mine = None if device.recipient is None else sealed.recipient_keyid(device.recipient)
        if mine is not None:
            keyids.setdefault(device.group, set()).add(mine)
        for rid, (resource, file) in merged.items():
            value = getattr(resource, "sealed", None)
            if value is None:
                continue
            if mine is None:
                no_recipient.setdefault(device.file, []).append(rid)
            elif not value.sealed_for(mine):
                missing.setdefault((file, rid), []).append(device.id)
    out = [
        Problem(
            file,
            f"resource {rid!r}: not sealed for device(s) {', '.join(ids)}, which will refuse"
            f" the bundle (not-a-recipient) until it is resealed: setpoint secrets reseal"
            f" {hints[file]} --resource {rid}",
        )
        for (file, rid), ids in sorted(missing.items())
    ]
    out.extend(
        Problem(
            file,
            f"no 'recipient:', but sealed value(s) {', '.join(repr(r) for r in rids)} are"
            " meant for this device: run `setpoint shim keygen` on the device, add the"
            " printed age1... line here as 'recipient:', then reseal",
        )
        for file, rids in sorted(no_recipient.items())
    )
    for group in sorted(groups.values(), key=lambda g: g.id):
        current = keyids.get(group.id, set())
        for resource in group.resources:
            value = getattr(resource, "sealed", None)
            extra = set(value.recipients) - current if value is not None else set()
            if extra:
                out.append(
                    Problem(
                        group.file,
                        f"resource {resource.id!r}: also sealed for {len(extra)} recipient(s)"
                        " no longer in the group (they can read this ciphertext); rotate the"
                        f" secret and reseal: setpoint secrets reseal --group {group.id}"
                        f" --resource {resource.id}",
                    )
                )
    return out


def _empty_fleet(tree: Tree, settings: FleetSettings | None) -> list[Problem]:
    """Nothing to publish: a mistake (wrong folder, files never committed, everything
    deleted) unless ``fleet.yaml`` says the fleet is meant to be empty."""
    if settings is not None and settings.allow_empty:
        return []
    try:
        has_fleet_file = tree.read(FLEET_FILE, safeyaml.MAX_YAML_BYTES) is not None
    except TreeError:
        has_fleet_file = True  # its problem is already recorded
    if has_fleet_file:
        return [
            Problem(
                FLEET_FILE,
                "the fleet has no groups and no devices, so the controller would remove every"
                " retained bundle; add groups/<group>.yaml and devices/<device>.yaml, or set"
                " 'allow_empty: true' in fleet.yaml if the fleet is meant to be empty",
            )
        ]
    return [
        Problem(
            "",
            f"no {FLEET_FILE}, {GROUPS_DIR}/ or {DEVICES_DIR}/ at the top of the repository:"
            " this is not a fleet repository, or the fleet is in a subfolder (point at that"
            " folder), or its files were never committed (`git add` and commit them);"
            " `setpoint init DIR` creates an example fleet",
        )
    ]


def _load_group(gid: str, path: str, tree: Tree, collector: _Collector) -> Group | None:
    document = _parse_document(tree, path, collector)
    if document is None:
        return None
    spec = _validate(GroupSpec, document, collector)
    if spec is None:
        return None
    resources = _resources(spec.resources, tree, collector, _Owner("group", gid))
    if resources is None:
        return None
    return Group(
        gid,
        path,
        spec.mode,
        spec.branch,
        resources,
        spec.rollout.policy() if spec.rollout else None,
        spec.window.window() if spec.window else None,
    )


def _read_device(
    did: str,
    path: str,
    tree: Tree,
    collector: _Collector,
    plaintext_ok: bool,
    versioned: VersionedTree | None,
    memo: Memo | None,
) -> Device | None:
    """:func:`_load_device`, through ``memo`` when the tree is versioned."""
    if versioned is None or memo is None:
        return _load_device(did, path, tree, collector, plaintext_ok)
    reading = memo.get(path, versioned, plaintext_ok)
    if reading is None:
        recording = _Recording(versioned)
        fresh = _Collector(path)
        device = _load_device(did, path, recording, fresh, plaintext_ok)
        reading = _Reading(
            tuple(recording.read_ids),
            plaintext_ok,
            device,
            tuple(fresh.problems),
            tuple(fresh.warnings),
        )
        memo.put(path, reading)
    collector.problems.extend(reading.problems)
    collector.warnings.extend(reading.warnings)
    return reading.device


def _load_device(
    did: str, path: str, tree: Tree, collector: _Collector, plaintext_ok: bool = False
) -> Device | None:
    document = _parse_document(tree, path, collector)
    if document is None:
        return None
    if not document:
        collector.add("missing key 'group': every device belongs to one group")
        return None
    spec = _validate(DeviceSpec, document, collector)
    if spec is None:
        return None
    owner = _Owner("device", did, allow_plaintext_secret=plaintext_ok)
    resources = _resources(spec.resources, tree, collector, owner)
    if resources is None:
        return None
    return Device(
        did,
        path,
        spec.group,
        dict(spec.vars),
        resources,
        safeyaml.line_of(document, "group"),
        recipient=spec.recipient,
    )
