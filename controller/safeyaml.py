"""Loading operators' YAML safely: no anchors or aliases, no duplicate keys, a size cap.

PyYAML's ``SafeLoader`` builds no arbitrary objects, but it still expands aliases, so a
few hundred bytes of nested aliases ("billion laughs") become gigabytes in memory. This
loader refuses the first anchor or alias it meets, before anything is expanded, so such a
file is rejected in microseconds. It also refuses duplicate mapping keys (PyYAML keeps the
last one silently), reads dates as plain strings, and reads a ``mode:`` value as written
(``0644`` and ``644`` both mean octal, as with chmod).

Mappings come back as :class:`Located` (a plain ``dict`` that also knows the line it starts
on and the line of each key), so validation can name the line of what it refuses.

Errors are :class:`YamlError` with a one-line message naming the line (and ``line`` set);
the caller adds the file name.

Pure; no I/O (it parses bytes it is given).
"""

from __future__ import annotations

from typing import Any, Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

MAX_YAML_BYTES: Final = 256 * 1024
_INT_TAG: Final = "tag:yaml.org,2002:int"
_STR_TAG: Final = "tag:yaml.org,2002:str"
_TIMESTAMP_TAG: Final = "tag:yaml.org,2002:timestamp"
_KEEP_TEXT_KEYS: Final = frozenset({"mode"})


class YamlError(ValueError):
    """A YAML document that cannot be accepted; the message names the line and the fix."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class Located(dict[Any, Any]):
    """A mapping from the document, with the (1-based) line it starts on and of each key."""

    __slots__ = ("key_lines", "line")

    def __init__(self) -> None:
        super().__init__()
        self.line: int | None = None
        self.key_lines: dict[Any, int] = {}

    def line_of(self, key: Any) -> int | None:
        """The line of ``key`` if it is in the mapping, else the mapping's own line."""
        try:
            return self.key_lines.get(key, self.line)
        except TypeError:
            return self.line


def line_of(value: Any, key: Any = None) -> int | None:
    """The line of ``value`` (a mapping from :func:`load`), or of its ``key``; None if unknown."""
    if not isinstance(value, Located):
        return None
    return value.line if key is None else value.line_of(key)


def _line(node_or_event: Any) -> int | None:
    mark = getattr(node_or_event, "start_mark", None)
    return mark.line + 1 if mark is not None else None


def _where(node_or_event: Any) -> str:
    line = _line(node_or_event)
    return f"line {line}" if line is not None else "somewhere"


class _Loader(yaml.SafeLoader):
    # Implicit resolvers without timestamps: `2024-01-01` stays the string it looks like.
    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            raise YamlError(
                f"{_where(event)}: aliases (*{event.anchor}) are not allowed; write the value out",
                _line(event),
            )
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise YamlError(
                f"{_where(event)}: anchors (&{anchor}) are not allowed; write the value out",
                _line(event),
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlError(
                    f"{_where(key_node)}: merge keys (<<) are not allowed", _line(key_node)
                )
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError as exc:
                raise YamlError(
                    f"{_where(key_node)}: a mapping key must be a scalar", _line(key_node)
                ) from exc
            if duplicate:
                raise YamlError(
                    f"{_where(key_node)}: duplicate key {key!r}; keep one of them", _line(key_node)
                )
            seen.add(key)
            if (
                key in _KEEP_TEXT_KEYS
                and isinstance(value_node, ScalarNode)
                and value_node.tag == _INT_TAG
            ):
                value_node.tag = _STR_TAG
        return super().construct_mapping(node, deep=deep)

    def construct_located(self, node: MappingNode) -> Any:
        data = Located()
        data.line = _line(node)
        yield data
        data.update(self.construct_mapping(node))
        for key_node, _value in node.value:
            line = _line(key_node)
            if isinstance(key_node, ScalarNode) and line is not None:
                data.key_lines.setdefault(key_node.value, line)


_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_located)


def load(data: bytes, *, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Parse one YAML document from ``data``; an empty document is ``None``."""
    if len(data) > max_bytes:
        raise YamlError(f"{len(data)} bytes is over the {max_bytes}-byte limit for a YAML file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(f"not UTF-8 text (byte {exc.start})") from exc
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    except YamlError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = ", ".join(part for part in (exc.context, exc.problem) if part) or "error"
        raise YamlError(f"invalid YAML: {line}{problem}", mark.line + 1 if mark else None) from exc
    except yaml.YAMLError as exc:
        raise YamlError(f"invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise YamlError("invalid YAML: nested too deeply") from exc
    finally:
        loader.dispose()
