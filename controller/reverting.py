"""The controller's own ``git revert`` of a halted rollout's change.

:func:`revert` writes a revert commit of one change to a branch with dulwich: a
three-way merge of the branch head with the change undone (the first parent is the
mainline for a merge commit, like ``git revert -m 1``), authored by the controller, the
ref moved only if it did not move meanwhile. The message names the halt, and
:func:`find_revert` looks for that name first, so a revert is written once.

Writes to the git repository (the rollouts' shell, :mod:`rolling`, calls it for the
reverts the decision asked for).
"""

from __future__ import annotations

import logging
import time
from typing import Final

from dulwich.merge import three_way_merge
from dulwich.objects import Commit
from dulwich.repo import Repo

log = logging.getLogger(__name__)

REVERT_AUTHOR: Final = "setpoint controller <setpoint@localhost>"
HALT_TRAILER: Final = "Setpoint-Halt"


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
