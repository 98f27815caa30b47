"""A commit as the controller's decisions see it: id, author, time, subject and tree.

Kept apart from :mod:`repository` (which reads commits with dulwich) so that the pure
modules (:mod:`rendering` and what builds on it) never import git.

Pure; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CommitInfo:
    """One commit: its id, who wrote it, and the tree it records."""

    id: str
    author: str
    time: int
    summary: str
    tree: bytes
