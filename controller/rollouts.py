"""What the rollout machinery remembers, and the controller's own ``git revert``.

:class:`Ledger` is kept in ``<state dir>/rollouts.json`` (written atomically whenever it
changes, before what it decided is published, so a restart neither repeats nor skips a
batch): the tree of every commit seen on a ring, the gate evidence per (ring, tree),
approvals, the rollout of each group (its batches, when each was released and completed,
a halt), paused groups, the operator commands already used, and the reverts written.

:func:`revert` writes a revert commit of one change to a branch with dulwich: a
three-way merge of the branch head with the change undone (the first parent is the
mainline for a merge commit, like ``git revert -m 1``), authored by the controller, the
ref moved only if it did not move meanwhile. The message names the halt, and
:func:`find_revert` looks for that name first, so a revert is written once.

Reads and writes the state file; :func:`revert` writes to the git repository.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from dulwich.merge import three_way_merge
from dulwich.objects import Commit
from dulwich.repo import Repo

from setpoint.kit.files import write_atomic

from .gating import Evidence

log = logging.getLogger(__name__)

LEDGER_FILE: Final = "rollouts.json"
MAX_TREES: Final = 2048
MAX_NONCES: Final = 1024
REVERT_AUTHOR: Final = "setpoint controller <setpoint@localhost>"
HALT_TRAILER: Final = "Setpoint-Halt"


@dataclass
class Rollout:
    """A group's rollout of one published version, batch by batch."""

    group: str
    branch: str
    version: int
    digest: str
    commit: str
    base: dict[str, int]  # device -> the group version it was pinned to before
    batches: list[list[str]]
    base_digest: str = ""  # content of the version rolled out from (for a walk-back)
    base_tree: str = ""
    released: list[float] = field(default_factory=list)
    completed: list[float] = field(default_factory=list)
    halted: dict[str, Any] | None = None
    done_at: float | None = None
    closed: str | None = None  # "reverted", "superseded"

    @property
    def active(self) -> bool:
        return self.done_at is None and self.closed is None

    def released_devices(self) -> set[str]:
        return {d for batch in self.batches[: len(self.released)] for d in batch}


@dataclass
class Ledger:
    trees: dict[str, str] = field(default_factory=dict)  # commit -> tree
    evidence: dict[str, Evidence] = field(default_factory=dict)  # "ring|tree"
    approvals: dict[str, dict[str, Any]] = field(default_factory=dict)  # "ring|tree"
    rollouts: dict[str, Rollout] = field(default_factory=dict)  # group -> rollout
    staged: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> next rollout
    paused: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> who, when
    nonces: list[str] = field(default_factory=list)
    reverts: dict[str, dict[str, Any]] = field(default_factory=dict)  # halt id -> revert

    @staticmethod
    def key(ring: str, tree: str) -> str:
        return f"{ring}|{tree}"

    def learn_tree(self, commit: str, tree: str) -> None:
        if self.trees.get(commit) != tree:
            self.trees[commit] = tree
            while len(self.trees) > MAX_TREES:
                self.trees.pop(next(iter(self.trees)))

    def to_json(self) -> bytes:
        document = {
            "schema": 1,
            "trees": self.trees,
            "evidence": {k: v.to_json() for k, v in self.evidence.items()},
            "approvals": self.approvals,
            "rollouts": {k: asdict(v) for k, v in self.rollouts.items()},
            "staged": self.staged,
            "paused": self.paused,
            "nonces": self.nonces[-MAX_NONCES:],
            "reverts": self.reverts,
        }
        return json.dumps(document, indent=1, sort_keys=True).encode("utf-8")

    def save(self, state_dir: Path) -> None:
        write_atomic(state_dir / LEDGER_FILE, self.to_json())

    @classmethod
    def load(cls, state_dir: Path) -> Ledger:
        path = state_dir / LEDGER_FILE
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        try:
            return cls(
                trees=dict(raw.get("trees", {})),
                evidence={k: Evidence.from_json(v) for k, v in raw.get("evidence", {}).items()},
                approvals=dict(raw.get("approvals", {})),
                rollouts={k: Rollout(**v) for k, v in raw.get("rollouts", {}).items()},
                staged=dict(raw.get("staged", {})),
                paused=dict(raw.get("paused", {})),
                nonces=list(raw.get("nonces", [])),
                reverts=dict(raw.get("reverts", {})),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            # Refusing to start is safer than forgetting which batches went out.
            raise ValueError(f"{path} is malformed ({exc}); fix or remove it") from exc


# --- Reverting ------------------------------------------------------------------------


class RevertError(Exception):
    """The revert could not be written (conflict, branch gone, not a local repository)."""


def _commit(repo: Repo, sha: str) -> Commit:
    obj = repo.object_store[sha.encode("ascii")]
    if not isinstance(obj, Commit):
        raise RevertError(f"{sha} is not a commit")
    return obj


def find_revert(repo_path: str, branch: str, halt_id: str, depth: int = 50) -> str | None:
    """The commit on ``branch`` whose message names ``halt_id``, among the last ``depth``."""
    with Repo(repo_path) as repo:
        try:
            sha = repo.refs[b"refs/heads/" + branch.encode()]
        except KeyError:
            return None
        marker = f"{HALT_TRAILER}: {halt_id}".encode()
        for _ in range(depth):
            commit = repo.object_store[sha]
            assert isinstance(commit, Commit)
            if marker in commit.message:
                return sha.decode("ascii")
            if not commit.parents:
                return None
            sha = commit.parents[0]
    return None


def revert(repo_path: str, branch: str, offending: str, halt_id: str, summary: str) -> str:
    """Write a commit to ``branch`` that undoes ``offending``; return its id."""
    existing = find_revert(repo_path, branch, halt_id)
    if existing is not None:
        return existing
    ref = b"refs/heads/" + branch.encode()
    with Repo(repo_path) as repo:
        try:
            head_sha = repo.refs[ref]
        except KeyError:
            raise RevertError(f"branch {branch!r} does not exist any more") from None
        bad = _commit(repo, offending)
        if not bad.parents:
            raise RevertError(f"{offending[:12]} is the first commit: nothing to revert to")
        parent = _commit(repo, bad.parents[0].decode("ascii"))
        head = _commit(repo, head_sha.decode("ascii"))
        if head.tree == bad.tree:
            tree_id = parent.tree  # nothing changed since: the exact previous content
        else:
            merged, conflicts = three_way_merge(repo.object_store, bad, head, parent)
            if conflicts:
                paths = ", ".join(c.decode("utf-8", "replace") for c in conflicts)
                raise RevertError(f"reverting {offending[:12]} conflicts in {paths}")
            repo.object_store.add_object(merged)
            tree_id = merged.id
        commit = Commit()
        commit.tree = tree_id
        commit.parents = [head_sha]
        commit.author = commit.committer = REVERT_AUTHOR.encode()
        commit.author_time = commit.commit_time = int(time.time())
        commit.author_timezone = commit.commit_timezone = 0
        subject = bad.message.decode("utf-8", "replace").strip().splitlines()
        title = subject[0] if subject else offending[:12]
        commit.message = (
            f'Revert "{title}"\n\n'
            f"This reverts commit {offending}.\n\n"
            f"The rollout halted: {summary}\n\n"
            f"{HALT_TRAILER}: {halt_id}\n"
        ).encode()
        repo.object_store.add_object(commit)
        if not repo.refs.set_if_equals(ref, head_sha, commit.id):
            raise RevertError(f"branch {branch!r} moved while the revert was written; retrying")
        log.info("reverted %s on %s: %s", offending[:12], branch, commit.id.decode())
        return commit.id.decode("ascii")
