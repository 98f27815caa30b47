"""The audit trail: one JSON line per publication, in ``<state dir>/audit.jsonl``.

Each line says when, which target, which version, from which commit and author, the
SHA-256 of the exact envelope published, and why (``change``, ``restore``, ``refresh``,
``adopted``, ``removed``, or a rollout's decision: ``approved``, ``batch-released``,
``rollout-halted``, ... with its particulars in ``detail``). One schema, one writer.
Lines are appended after the broker acknowledged, in batches, with one fsync per batch.
``setpoint history`` reads it back.

Appends to and reads one file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from setpoint.kit.files import append_lines

AUDIT_FILE: Final = "audit.jsonl"


@dataclass(frozen=True, slots=True)
class Entry:
    time: float
    target: str
    kind: str
    id: str
    version: int | None
    commit: str | None
    author: str
    digest: str | None
    reason: str
    branch: str | None = None
    content_digest: str | None = None
    detail: Mapping[str, Any] | None = None  # a rollout decision's particulars

    def to_json(self) -> str:
        body = asdict(self)
        if self.detail is None:
            del body["detail"]
        return json.dumps(body, sort_keys=True, separators=(",", ":"))


class AuditLog:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / AUDIT_FILE

    def append(self, entries: Iterable[Entry]) -> None:
        append_lines(self.path, [entry.to_json() for entry in entries])


def read(path: Path, target: str | None = None) -> Iterator[dict[str, Any]]:
    """The entries of the audit log at ``path``, oldest first; ``target`` filters by
    ``group/<id>``, ``device/<id>`` or a bare id (either kind)."""
    try:
        fh = path.open(encoding="utf-8")
    except FileNotFoundError:
        return
    with fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(entry, dict) and _matches(entry, target):
                yield entry


def _matches(entry: Mapping[str, Any], target: str | None) -> bool:
    if target is None:
        return True
    return target in (entry.get("target"), entry.get("id"))
