"""The kit: atomic files (symlinks refused, mode from the start) and the JSON log line."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from setpoint.kit.files import append_lines, write_atomic
from setpoint.kit.logjson import JsonFormatter


def test_write_atomic_replaces_whole_with_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        write_atomic(target, b"new", mode=0o600)
        write_atomic(target, b"public", mode=0o644, sync=False)
        assert stat.S_IMODE(target.stat().st_mode) == 0o644  # the umask does not narrow it
    finally:
        os.umask(old_umask)
    write_atomic(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left


def test_write_atomic_refuses_a_symlink_planted_at_its_temp_file(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    target = tmp_path / "key.pem"
    (tmp_path / f".key.pem.tmp-{os.getpid()}").symlink_to(outside)
    with pytest.raises(OSError):
        write_atomic(target, b"secret")
    assert outside.read_bytes() == b"precious" and not target.exists()


def test_append_lines_appends_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    append_lines(log, ['{"a":1}'])
    append_lines(log, [])
    append_lines(log, ['{"b":2}', '{"c":3}'])
    assert log.read_text().splitlines() == ['{"a":1}', '{"b":2}', '{"c":3}']
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_one_json_log_line_format() -> None:
    record = logging.LogRecord("setpoint.x", logging.WARNING, "f", 1, "hello %s", ("you",), None)
    line = json.loads(JsonFormatter().format(record))
    assert set(line) == {"time", "iso", "level", "logger", "message"}
    assert (line["level"], line["message"]) == ("warning", "hello you")
