"""Desired-state bundles: the payload a controller signs and a device applies.

A bundle is a msgpack map (see ``proto/SPEC.md``). A *group* bundle carries the group's
mode and resources; a *device* bundle carries the device's group assignment, its vars and
the resources that add to or replace the group's by id. :func:`effective` merges the two
into the list a device enforces, substituting ``${var}`` placeholders from the device's
vars; the controller uses the same function to know what each device should report.

Pure; no I/O.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from . import codec, sealed
from .errors import SchemaError
from .sealed import Sealed
from .topics import validate_id

SCHEMA: Final = 1
MAX_BUNDLE_BYTES: Final = 1024 * 1024
MAX_RESOURCES: Final = 10_000
MODES: Final = ("enforce", "observe")
KINDS: Final = ("command", "file", "setting")

BundleKind = Literal["group", "device"]
Mode = Literal["enforce", "observe"]
SettingValue = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class FileResource:
    """A file under the device root: exact content and permission bits.

    A sealed file carries ``sealed`` (the age ciphertext) and an empty ``content``: only
    the device it was sealed for learns the content, when it applies it.
    """

    id: str
    path: str
    content: bytes
    mode: int = 0o644
    sealed: Sealed | None = None
    kind: Literal["file"] = "file"


def risky_mode(mode: int) -> str | None:
    """What makes a file mode dangerous to install from a repository (setuid, setgid,
    sticky, writable by anyone), or None. A root device writes files as root: a setuid
    mode from the repository would be a root shell for every local account."""
    bits = [
        name
        for bit, name in ((0o4000, "setuid"), (0o2000, "setgid"), (0o1000, "sticky"))
        if mode & bit
    ]
    if mode & 0o002:
        bits.append("world-writable")
    return " and ".join(bits) or None


@dataclass(frozen=True, slots=True)
class SettingResource:
    """One key in the device's settings file; ``secret`` values are never logged.

    A sealed setting carries ``sealed`` (its value is the UTF-8 text of the age
    plaintext), ``value`` None and ``secret`` True.
    """

    id: str
    key: str
    value: SettingValue
    secret: bool = False
    sealed: Sealed | None = None
    kind: Literal["setting"] = "setting"


@dataclass(frozen=True, slots=True)
class CommandResource:
    """A check command and an apply command (``/bin/sh -c``); runs only where allowed."""

    id: str
    check: str
    apply: str
    timeout: int = 60
    kind: Literal["command"] = "command"


Resource = FileResource | SettingResource | CommandResource


@dataclass(frozen=True, slots=True)
class Bundle:
    """The decoded payload of a group or device bundle."""

    kind: BundleKind
    target: str
    version: int
    commit: str
    issued_at: int
    expires_at: int
    resources: tuple[Resource, ...] = ()
    mode: Mode = "enforce"
    group: str | None = None
    vars: Mapping[str, SettingValue] = field(default_factory=dict)
    group_version: int | None = None
    schema: int = SCHEMA
    # :meth:`content_digest`, computed once per bundle (not an init field: ``replace``
    # makes a new bundle, which computes its own).
    _content_digest: str | None = field(default=None, init=False, repr=False, compare=False)

    def content(self) -> dict[str, Any]:
        """The fields that define what the device should be, without version or times."""
        body: dict[str, Any] = {
            "kind": self.kind,
            "target": self.target,
            "resources": [resource_to_map(r) for r in self.resources],
        }
        if self.kind == "group":
            body["mode"] = self.mode
        else:
            body["group"] = self.group
            body["vars"] = dict(self.vars)
            if self.group_version is not None:
                body["group_version"] = self.group_version
        return body

    def content_digest(self) -> str:
        """Digest of :meth:`content`: equal for bundles that ask the same of a device."""
        digest = self._content_digest
        if digest is None:
            digest = codec.digest(self.content())
            object.__setattr__(self, "_content_digest", digest)
        return digest

    def with_commit(self, commit: str) -> Bundle:
        """The same content, rendered from ``commit``: its content digest is carried over
        (the commit is not part of the content), not computed again."""
        # The constructor called directly: ``replace`` costs twice as much (a render stamps
        # every group bundle, a publication the bundles it publishes).
        bundle = Bundle(
            self.kind, self.target, self.version, commit, self.issued_at, self.expires_at,
            self.resources, self.mode, self.group, self.vars, self.group_version, self.schema,
        )  # fmt: skip
        object.__setattr__(bundle, "_content_digest", self._content_digest)
        return bundle

    def with_version(self, version: int, issued_at: int, expires_at: int) -> Bundle:
        return replace(self, version=version, issued_at=issued_at, expires_at=expires_at)


def resource_to_map(resource: Resource) -> dict[str, Any]:
    if isinstance(resource, FileResource | SettingResource) and resource.sealed is not None:
        return _sealed_to_map(resource, resource.sealed)
    if isinstance(resource, FileResource):
        return {
            "id": resource.id,
            "kind": "file",
            "path": resource.path,
            "content": resource.content,
            "mode": resource.mode,
        }
    if isinstance(resource, SettingResource):
        return {
            "id": resource.id,
            "kind": "setting",
            "key": resource.key,
            "value": resource.value,
            "secret": resource.secret,
        }
    return {
        "id": resource.id,
        "kind": "command",
        "check": resource.check,
        "apply": resource.apply,
        "timeout": resource.timeout,
    }


def _sealed_to_map(resource: FileResource | SettingResource, value: Sealed) -> dict[str, Any]:
    if isinstance(resource, FileResource):
        where = {"path": resource.path, "mode": resource.mode}
    else:
        where = {"key": resource.key, "secret": True}
    return {"id": resource.id, "kind": resource.kind, **where, "sealed": value.to_map()}


def resource_digest(resource: Resource) -> str:
    """Digest of what a resource asks for; a device reports the same digest when in sync.

    For a sealed resource it is derived from the ciphertext, never from the plaintext.
    """
    if isinstance(resource, FileResource) and resource.sealed is not None:
        return codec.digest({"sealed": resource.sealed.digest(), "mode": resource.mode})
    if isinstance(resource, SettingResource) and resource.sealed is not None:
        return codec.digest({"key": resource.key, "sealed": resource.sealed.digest()})
    if isinstance(resource, FileResource):
        return codec.digest({"content": resource.content, "mode": resource.mode})
    if isinstance(resource, SettingResource):
        return codec.digest({"key": resource.key, "value": resource.value})
    return codec.digest({"check": resource.check, "apply": resource.apply})


def validate_path(path: object, where: str) -> str:
    """A relative POSIX path that stays under the device root."""
    if not isinstance(path, str) or not path:
        raise SchemaError(f"{where}: path must be a non-empty string")
    if "\x00" in path or "\\" in path:
        raise SchemaError(f"{where}: path {path!r} contains NUL or backslash")
    if path.startswith("/"):
        raise SchemaError(f"{where}: path {path!r} must be relative to the device root")
    normal = posixpath.normpath(path)
    # A trailing '/' names a directory, never a file: the path must already be normal.
    if normal in (".", "..") or normal.startswith("../") or normal != path:
        raise SchemaError(
            f"{where}: path {path!r} must be a normalised path inside the device root"
        )
    return path


def _take(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in raw:
        raise SchemaError(f"{where}: missing field {key!r}")
    value = raw[key]
    if isinstance(value, bool) and kind is int:
        raise SchemaError(f"{where}: field {key!r} must be an integer")
    if not isinstance(value, kind):
        raise SchemaError(f"{where}: field {key!r} has the wrong type")
    return value


def _only(raw: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = set(raw) - allowed
    if extra:
        raise SchemaError(f"{where}: unknown field(s) {sorted(extra)}")


def _setting_value(value: object, where: str) -> SettingValue:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise SchemaError(f"{where}: value must be a string, number, boolean or nil")


def resource_from_map(raw: object, where: str) -> Resource:
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: resource is not a map")
    rid = _take(raw, "id", str, where)
    validate_id(rid, f"{where}: resource id")
    where = f"{where} {rid!r}"
    kind = _take(raw, "kind", str, where)
    if kind == "file":
        _only(raw, {"id", "kind", "path", "content", "mode", "sealed"}, where)
        mode = _take(raw, "mode", int, where)
        if not 0 <= mode <= 0o7777:
            raise SchemaError(f"{where}: mode {mode:o} out of range")
        if "sealed" in raw:
            if "content" in raw:
                raise SchemaError(f"{where}: a file has 'content' or 'sealed', not both")
            value = sealed.from_map(raw["sealed"], where)
            return FileResource(rid, validate_path(raw.get("path"), where), b"", mode, value)
        return FileResource(
            rid, validate_path(raw.get("path"), where), _take(raw, "content", bytes, where), mode
        )
    if kind == "setting":
        _only(raw, {"id", "kind", "key", "value", "secret", "sealed"}, where)
        key = _take(raw, "key", str, where)
        if not key or len(key) > 256:
            raise SchemaError(f"{where}: key must be 1-256 characters")
        if "sealed" in raw:
            if "value" in raw:
                raise SchemaError(f"{where}: a setting has 'value' or 'sealed', not both")
            value = sealed.from_map(raw["sealed"], where)
            return SettingResource(rid, key, None, True, value)
        return SettingResource(
            rid,
            key,
            _setting_value(raw.get("value"), where),
            bool(_take(raw, "secret", bool, where)),
        )
    if kind == "command":
        _only(raw, {"id", "kind", "check", "apply", "timeout"}, where)
        timeout = _take(raw, "timeout", int, where)
        if not 1 <= timeout <= 3600:
            raise SchemaError(f"{where}: timeout must be 1-3600 seconds")
        return CommandResource(
            rid, _take(raw, "check", str, where), _take(raw, "apply", str, where), timeout
        )
    raise SchemaError(f"{where}: unknown kind {kind!r} (known: {', '.join(KINDS)})")


_GROUP_FIELDS: Final = {
    "schema", "kind", "target", "version", "commit", "issued_at", "expires_at",
    "resources", "mode",
}  # fmt: skip
_DEVICE_FIELDS: Final = {
    "schema", "kind", "target", "version", "commit", "issued_at", "expires_at",
    "resources", "group", "vars", "group_version",
}  # fmt: skip


def encode(bundle: Bundle) -> bytes:
    """Canonical msgpack of the bundle payload."""
    body = bundle.content()
    body.update(
        schema=bundle.schema,
        version=bundle.version,
        commit=bundle.commit,
        issued_at=bundle.issued_at,
        expires_at=bundle.expires_at,
    )
    return codec.pack(body)


def decode(data: bytes, *, max_size: int = MAX_BUNDLE_BYTES) -> Bundle:
    """Decode and validate a verified bundle payload."""
    raw = codec.unpack(data, max_size=max_size)
    if not isinstance(raw, dict):
        raise SchemaError("bundle is not a map")
    schema = _take(raw, "schema", int, "bundle")
    if schema != SCHEMA:
        raise SchemaError(f"bundle schema {schema} is not supported (this side speaks {SCHEMA})")
    kind = _take(raw, "kind", str, "bundle")
    if kind not in ("group", "device"):
        raise SchemaError(f"bundle kind {kind!r} is not group or device")
    _only(raw, _GROUP_FIELDS if kind == "group" else _DEVICE_FIELDS, f"{kind} bundle")
    target = validate_id(_take(raw, "target", str, "bundle"), f"{kind} bundle target")
    where = f"{kind} bundle {target!r}"
    version = _take(raw, "version", int, where)
    if version < 1:
        raise SchemaError(f"{where}: version must be >= 1")
    resources_raw = _take(raw, "resources", list, where)
    if len(resources_raw) > MAX_RESOURCES:
        raise SchemaError(f"{where}: more than {MAX_RESOURCES} resources")
    resources = tuple(resource_from_map(r, f"{where}: resource") for r in resources_raw)
    ids = [r.id for r in resources]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise SchemaError(f"{where}: duplicate resource id(s) {dupes}")
    common: dict[str, Any] = dict(
        kind=kind,
        target=target,
        version=version,
        commit=_take(raw, "commit", str, where),
        issued_at=_take(raw, "issued_at", int, where),
        expires_at=_take(raw, "expires_at", int, where),
        resources=resources,
        schema=schema,
    )
    if kind == "group":
        mode = _take(raw, "mode", str, where)
        if mode not in MODES:
            raise SchemaError(f"{where}: mode {mode!r} is not enforce or observe")
        return Bundle(mode=mode, **common)
    group = validate_id(_take(raw, "group", str, where), f"{where}: group")
    variables = _take(raw, "vars", dict, where)
    for name, value in variables.items():
        _setting_value(value, f"{where}: var {name!r}")
    group_version = raw.get("group_version")
    if group_version is not None and (
        isinstance(group_version, bool) or not isinstance(group_version, int)
    ):
        raise SchemaError(f"{where}: group_version must be an integer")
    return Bundle(group=group, vars=variables, group_version=group_version, **common)


# Only the braced form: string.Template would also rewrite ``$name`` and turn ``$$`` into
# ``$``, corrupting shell scripts and other files that never meant to use vars.
_VAR_REF: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def var_text(value: SettingValue) -> str:
    """How a var's value reads inside text: nil empty, booleans ``true``/``false``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _substitute(text: str, variables: Mapping[str, SettingValue]) -> str:
    def replace_ref(match: re.Match[str]) -> str:
        name = match.group(1)
        return var_text(variables[name]) if name in variables else match.group(0)

    return _VAR_REF.sub(replace_ref, text)


def render(resource: Resource, variables: Mapping[str, SettingValue]) -> Resource:
    """Substitute ``${var}`` in UTF-8 file text and string setting values.

    Only ``${name}`` with ``name`` among ``variables`` is replaced; anything else (an
    unknown name, ``$name``, ``$$``) stays as it is. Paths, keys and commands are never
    substituted.
    """
    if not variables or getattr(resource, "sealed", None) is not None:
        return resource
    if isinstance(resource, FileResource):
        try:
            text = resource.content.decode("utf-8")
        except UnicodeDecodeError:
            return resource
        return replace(resource, content=_substitute(text, variables).encode("utf-8"))
    if isinstance(resource, SettingResource) and isinstance(resource.value, str):
        return replace(resource, value=_substitute(resource.value, variables))
    return resource


def effective(group: Bundle | None, device: Bundle | None) -> list[Resource]:
    """What a device enforces: group resources, replaced or extended by the device's, by id.

    Resources keep the group's order, then the device's additions in their order.
    """
    merged: dict[str, Resource] = {}
    if group is not None:
        merged.update((r.id, r) for r in group.resources)
    variables: Mapping[str, SettingValue] = {}
    if device is not None:
        merged.update((r.id, r) for r in device.resources)
        variables = device.vars
    return [render(r, variables) for r in merged.values()]


def is_sealed(resource: Resource) -> bool:
    """Does the resource carry a sealed value (decrypted only on the device, at apply)?"""
    return getattr(resource, "sealed", None) is not None


def resource_ids(resources: Sequence[Resource]) -> list[str]:
    return [r.id for r in resources]
