"""Sealing secrets for the fleet repository: encrypt with age to the devices that may read them.

The operator's side of sealed values (``setpoint secrets seal`` and ``reseal``):

* :func:`recipients` finds the ``recipient:`` of one device, or of every device of a group,
  in a view of the repository;
* :func:`seal` encrypts a plaintext the operator gives to those recipients (age X25519,
  through ``pyrage``), returning the :class:`~setpoint.proto.sealed.Sealed` value with the
  recipients' key ids beside the ciphertext;
* :func:`place` writes that value into a group or device file's text as ``sealed:``,
  replacing the resource's ``value``/``content``/``source`` (or adding the resource),
  keeping the rest of the file, comments included, as it was.

Nothing here decrypts: the controller has no identity and never sees a plaintext. The
plaintext comes from the operator and goes only to the age library.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import yaml

from setpoint.proto import sealed
from setpoint.proto.errors import SchemaError
from setpoint.proto.sealed import Sealed

from . import safeyaml
from .errors import ControllerError
from .fleet import DEVICES_DIR, GROUPS_DIR, YAML_SUFFIXES, Tree, TreeError

_REPLACED: Final = ("value", "content", "source", "sealed")


class SealingError(ControllerError):
    """A value cannot be sealed as asked; the message says what to fix."""


def target_file(tree: Tree, kind: str, ident: str) -> str:
    """The repository path of a group's or device's file (``.yaml`` or ``.yml``)."""
    directory = GROUPS_DIR if kind == "group" else DEVICES_DIR
    names = set(tree.list_yaml(directory))
    for suffix in YAML_SUFFIXES:
        if f"{ident}{suffix}" in names:
            return f"{directory}/{ident}{suffix}"
    raise SealingError(f"{kind} {ident!r} has no file {directory}/{ident}.yaml in the repository")


def _device_file(tree: Tree, path: str) -> dict[str, Any]:
    try:
        document = safeyaml.load(tree.read(path, safeyaml.MAX_YAML_BYTES) or b"")
    except (safeyaml.YamlError, TreeError) as exc:
        raise SealingError(f"{path}: {exc}") from None
    return document if isinstance(document, dict) else {}


def recipients(
    tree: Tree, *, group: str | None = None, device: str | None = None
) -> dict[str, str]:
    """The recipient of ``device``, or of every device in ``group``, by device id.

    Reads only ``group:`` and ``recipient:`` of the device files, so that a group whose file
    does not validate yet (a plaintext secret being sealed) can still be sealed for.
    """
    if (group is None) == (device is None):
        raise SealingError("name exactly one of --group or --device")
    if device is not None:
        files = {device: target_file(tree, "device", device)}
    else:
        assert group is not None
        target_file(tree, "group", group)
        files = {}
        for name in sorted(tree.list_yaml(DEVICES_DIR)):
            stem, _dot, suffix = name.rpartition(".")
            path = f"{DEVICES_DIR}/{name}"
            if f".{suffix}" in YAML_SUFFIXES and _device_file(tree, path).get("group") == group:
                files[stem] = path
        if not files:
            raise SealingError(f"group {group!r} has no devices to seal for")
    found: dict[str, str] = {}
    lacking = []
    for ident, path in files.items():
        recipient = _device_file(tree, path).get("recipient")
        if recipient is None:
            lacking.append(path)
            continue
        try:
            found[ident] = sealed.check_recipient(recipient, f"{path}: recipient")
        except SchemaError as exc:
            raise SealingError(str(exc)) from None
    if lacking:
        raise SealingError(
            f"no 'recipient:' in {', '.join(lacking)}: run `setpoint shim keygen --state-dir"
            " DIR` on each device and add the age1... line it prints as 'recipient:'"
        )
    return found


def seal(plaintext: bytes, to: Mapping[str, str]) -> Sealed:
    """Encrypt ``plaintext`` to the recipients ``to`` (device id -> ``age1...``)."""
    import pyrage  # the operator's machine only: devices import it when they decrypt

    if not to:
        raise SealingError("no recipients to seal for")
    parsed = []
    for device, recipient in sorted(to.items()):
        try:
            parsed.append(pyrage.x25519.Recipient.from_str(recipient))
        except pyrage.RecipientError as exc:
            raise SealingError(
                f"device {device!r}: recipient {recipient[:80]!r} is not valid ({exc});"
                " copy it again from `setpoint shim keygen`"
            ) from None
    try:
        armor = pyrage.encrypt(plaintext, parsed, armored=True).decode("ascii")
    except pyrage.EncryptError as exc:
        raise SealingError(f"age could not encrypt: {exc}") from None
    return Sealed(sealed.normal_armor(armor), sealed.keyids(to.values()))


def yaml_lines(value: Sealed, indent: int) -> list[str]:
    """``sealed:`` and its mapping, as lines at ``indent`` columns."""
    pad = " " * indent
    lines = [f"{pad}sealed:", f"{pad}  recipients:"]
    lines += [f"{pad}    - {keyid}" for keyid in value.recipients]
    lines.append(f"{pad}  age: |")
    lines += [f"{pad}    {line}" for line in value.armor.rstrip("\n").split("\n")]
    return lines


def _last_line(node: yaml.Node) -> int:
    """The last line that holds part of ``node`` (a block collection's end mark lies at the
    next token, past any comment lines that follow it: descend to its last scalar)."""
    if (
        isinstance(node, yaml.MappingNode | yaml.SequenceNode)
        and node.value
        and not node.flow_style
    ):
        last = node.value[-1]
        return _last_line(last[1] if isinstance(last, tuple) else last)
    return node.end_mark.line if node.end_mark.column > 0 else node.end_mark.line - 1


def _pair_lines(key: yaml.Node, value: yaml.Node) -> tuple[int, int]:
    """The lines (first, last inclusive) a ``key: value`` pair occupies."""
    return key.start_mark.line, max(_last_line(value), key.start_mark.line)


def _scalar(node: yaml.Node) -> Any:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def place(
    text: str,
    resource_id: str,
    value: Sealed,
    *,
    new: Mapping[str, str] | None = None,
    file: str = "the file",
) -> str:
    """``text`` with resource ``resource_id`` holding ``value`` as ``sealed:``.

    An existing resource loses its ``value``/``content``/``source``/``sealed`` and gains
    the new ``sealed:`` in their place; otherwise ``new`` (``kind`` and ``key`` or
    ``path``, optionally ``mode``) describes the resource to append. Everything else in
    the text is kept byte for byte.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise SealingError(f"{file}: not valid YAML ({exc}); fix it first") from None
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    resources: yaml.Node | None = None
    resources_key: yaml.Node | None = None
    if root is not None:
        if not isinstance(root, yaml.MappingNode):
            raise SealingError(f"{file}: the file must hold a mapping")
        for k, v in root.value:
            if _scalar(k) == "resources":
                resources_key, resources = k, v
    existing = None
    if isinstance(resources, yaml.SequenceNode):
        for item in resources.value:
            if isinstance(item, yaml.MappingNode) and any(
                _scalar(k) == "id" and _scalar(v) == resource_id for k, v in item.value
            ):
                existing = item
    if existing is not None:
        if existing.flow_style:
            raise SealingError(
                f"{file}: resource {resource_id!r} is written in flow style ({{...}});"
                " write it as a block mapping, or paste the sealed value by hand"
            )
        pairs = [(k, v) for k, v in existing.value if _scalar(k) in _REPLACED]
        spans = sorted((_pair_lines(k, v) for k, v in pairs), reverse=True)
        column = existing.value[0][0].start_mark.column
        at = min((s[0] for s in spans), default=existing.end_mark.line)
        if not spans:
            last = existing.value[-1]
            at = _pair_lines(*last)[1] + 1
        for first, last_line in spans:
            del lines[first : last_line + 1]
        lines[at:at] = yaml_lines(value, column)
    else:
        if new is None:
            raise SealingError(
                f"{file}: no resource {resource_id!r}; to add one, say what it is:"
                " --key KEY (a setting) or --path PATH (a file)"
            )
        # JSON strings are YAML double-quoted scalars: any key or path stays what it is.
        body = [
            f"id: {json.dumps(resource_id)}",
            *(f"{k}: {json.dumps(v)}" for k, v in new.items()),
        ]
        if (
            isinstance(resources, yaml.SequenceNode)
            and resources.value
            and not resources.flow_style
        ):
            dash = resources.start_mark.column
            at = _last_line(resources) + 1
        else:
            if resources is not None and resources_key is not None:
                if not (isinstance(resources, yaml.SequenceNode) and not resources.value):
                    raise SealingError(f"{file}: 'resources' must be a list")
                first, last_line = _pair_lines(resources_key, resources)
                del lines[first : last_line + 1]
                at = first
            else:
                at = len(lines)
            lines[at:at] = ["resources:"]
            at += 1
            dash = 2
        item = [f"{' ' * dash}- {body[0]}", *(f"{' ' * (dash + 2)}{b}" for b in body[1:])]
        item += yaml_lines(value, dash + 2)
        lines[at:at] = item
    result = "\n".join(lines) + "\n"
    _check_placed(result, resource_id, value, file)
    return result


def _check_placed(text: str, resource_id: str, value: Sealed, file: str) -> None:
    """Read the edited text back: the resource must hold exactly ``value``."""
    try:
        document = safeyaml.load(text.encode("utf-8"))
        items = document.get("resources") or []
        found = [r for r in items if isinstance(r, dict) and r.get("id") == resource_id]
        raw = found[0]["sealed"]
        back = sealed.from_map(
            {"age": sealed.normal_armor(raw["age"]), "recipients": raw["recipients"]}, "sealed"
        )
    except (safeyaml.YamlError, SchemaError, AttributeError, IndexError, KeyError, TypeError):
        back = None
    if back != value:
        raise SealingError(
            f"{file}: could not place the sealed value safely; nothing was written."
            " Run without --write and paste the printed value by hand"
        )
