"""The repository status the controller publishes for operators (retained JSON).

One retained message on ``<prefix>/repository/status`` says, for each branch the controller
tracks, which head commit it last looked at, whether it accepted it, and if not, every problem
with the file and line that caused it. A refused commit is then visible to anyone who looks
(``setpoint status``, the dashboard, ``mosquitto_sub``), not only in the controller's log.

Pure; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from . import codec
from .errors import SchemaError

SCHEMA: Final = 1
MAX_REPOSITORY_STATUS_BYTES: Final = 256 * 1024
MAX_PROBLEMS: Final = 50
MAX_MESSAGE: Final = 1024


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a commit: the file (relative to the repository), the line when
    known, and the message (which names the item and the fix)."""

    file: str | None
    line: int | None
    message: str

    def __str__(self) -> str:
        if self.file is None:
            return self.message
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return self.message if self.message.startswith(self.file) else f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class BranchStatus:
    """The controller's verdict on one branch's head commit."""

    branch: str
    head: str
    accepted: bool
    checked_at: float
    subject: str = ""
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True, slots=True)
class RepositoryStatus:
    """Every tracked branch's verdict, keyed by branch name."""

    branches: dict[str, BranchStatus]

    def with_branch(self, status: BranchStatus) -> RepositoryStatus:
        return RepositoryStatus({**self.branches, status.branch: status})

    @property
    def refused(self) -> tuple[BranchStatus, ...]:
        return tuple(b for _, b in sorted(self.branches.items()) if not b.accepted)

    def to_json(self) -> bytes:
        return codec.dumps_json(to_dict(self))


def to_dict(status: RepositoryStatus) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "branches": {
            name: {
                "branch": b.branch,
                "head": b.head,
                "accepted": b.accepted,
                "subject": b.subject[:MAX_MESSAGE],
                "checked_at": b.checked_at,
                "problems": [
                    {"file": p.file, "line": p.line, "message": p.message[:MAX_MESSAGE]}
                    for p in b.problems[:MAX_PROBLEMS]
                ],
            }
            for name, b in sorted(status.branches.items())
        },
    }


def from_json(data: bytes) -> RepositoryStatus:
    """Decode a repository status; raise SchemaError when it is not one."""
    raw = codec.loads_json(data, max_size=MAX_REPOSITORY_STATUS_BYTES)
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        raise SchemaError(f"repository status is not a schema {SCHEMA} object")
    branches = raw.get("branches")
    if not isinstance(branches, dict):
        raise SchemaError("repository status has no 'branches' object")
    try:
        return RepositoryStatus({str(name): _branch(item) for name, item in branches.items()})
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"repository status is malformed: {exc!r}") from exc


def _branch(item: Any) -> BranchStatus:
    if not isinstance(item, dict):
        raise TypeError("branch entry is not an object")
    accepted = item["accepted"]
    if not isinstance(accepted, bool):
        raise TypeError("'accepted' is not a boolean")
    problems = item.get("problems", [])
    if not isinstance(problems, list) or len(problems) > MAX_PROBLEMS:
        raise ValueError("'problems' is not a list of at most 50 entries")
    return BranchStatus(
        branch=str(item["branch"]),
        head=str(item["head"]),
        accepted=accepted,
        checked_at=float(item["checked_at"]),
        subject=str(item.get("subject", "")),
        problems=tuple(_problem(p) for p in problems),
    )


def _problem(item: Any) -> Problem:
    if not isinstance(item, dict):
        raise TypeError("problem is not an object")
    file, line = item.get("file"), item.get("line")
    if file is not None and not isinstance(file, str):
        raise TypeError("problem 'file' is not a string")
    if line is not None and (not isinstance(line, int) or isinstance(line, bool)):
        raise TypeError("problem 'line' is not an integer")
    return Problem(file=file, line=line, message=str(item["message"]))
