"""Loading operators' YAML: one test per thing the loader refuses."""

from __future__ import annotations

import time

import pytest

from setpoint.controller import safeyaml
from setpoint.controller.safeyaml import YamlError


def test_plain_mapping_loads() -> None:
    assert safeyaml.load(b"a: 1\nb: [x, y]\n") == {"a": 1, "b": ["x", "y"]}


def test_empty_document_is_none() -> None:
    assert safeyaml.load(b"") is None
    assert safeyaml.load(b"# only a comment\n") is None


def test_alias_bomb_is_rejected_in_milliseconds() -> None:
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 12):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        levels.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    bomb = ("\n".join(levels) + "\n").encode()
    started = time.perf_counter()
    with pytest.raises(YamlError, match="anchors"):
        safeyaml.load(bomb)
    assert time.perf_counter() - started < 0.05


def test_alias_without_anchor_is_rejected() -> None:
    with pytest.raises(YamlError):
        safeyaml.load(b"a: *nowhere\n")


def test_anchor_alone_is_rejected() -> None:
    with pytest.raises(YamlError, match="line 1: anchors"):
        safeyaml.load(b"a: &x 1\n")


def test_merge_key_is_rejected() -> None:
    with pytest.raises(YamlError, match="merge keys"):
        safeyaml.load(b"<<: {a: 1}\n")


def test_duplicate_key_is_rejected_with_its_line() -> None:
    with pytest.raises(YamlError, match="line 3: duplicate key 'mode'"):
        safeyaml.load(b"mode: enforce\nresources: []\nmode: observe\n")


def test_size_cap_is_checked_before_parsing() -> None:
    with pytest.raises(YamlError, match="over the 100-byte limit"):
        safeyaml.load(b"a: " + b"x" * 200, max_bytes=100)


def test_invalid_yaml_names_line_and_column() -> None:
    with pytest.raises(
        YamlError, match=r"invalid YAML: line \d+, column \d+: while parsing a flow sequence"
    ):
        safeyaml.load(b"a: 1\nb: [unclosed\n")


def test_two_documents_are_rejected() -> None:
    with pytest.raises(YamlError, match="invalid YAML"):
        safeyaml.load(b"a: 1\n---\nb: 2\n")


def test_not_utf8_is_rejected() -> None:
    with pytest.raises(YamlError, match="not UTF-8"):
        safeyaml.load(b"a: \xff\xfe\n")


def test_deep_nesting_is_rejected_not_crashing() -> None:
    with pytest.raises(YamlError):
        safeyaml.load(b"[" * 50_000 + b"]" * 50_000)


def test_dates_stay_strings() -> None:
    assert safeyaml.load(b"value: 2024-01-31\n") == {"value": "2024-01-31"}


def test_mode_is_read_as_written() -> None:
    assert safeyaml.load(b"mode: 0644\nother: 0644\n") == {"mode": "0644", "other": 420}
    assert safeyaml.load(b"mode: 644\n") == {"mode": "644"}


def test_python_tags_are_refused() -> None:
    with pytest.raises(YamlError):
        safeyaml.load(b"a: !!python/object/apply:os.system ['true']\n")
