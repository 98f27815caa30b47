"""The fleet repository through dulwich: a local repository, or a mirror of a remote one.

A local path (a work tree, its ``.git``, or a bare repository) is opened in place and read
from its object store: the work tree is never looked at, so what is published is exactly
what was committed. A URL (``file://``, ``http(s)://``, ``ssh://``, ``git://`` or scp-like
``user@host:path``) is mirrored into ``<state dir>/mirror.git``: :meth:`Repository.refresh`
fetches every branch and moves the mirror's branches to exactly where the remote has them
(a force-push is followed, a deleted branch disappears).

Every dulwich and transport error is converted here: an unreachable or unreadable
repository is :class:`RepositoryUnavailable` (retry later). The methods block; the
controller calls them from a worker thread, one at a time.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from dulwich import errors as git_errors
from dulwich import objectspec, porcelain
from dulwich.client import HTTPProxyUnauthorized, HTTPUnauthorized, get_transport_and_path
from dulwich.diff_tree import tree_changes
from dulwich.errors import NotGitRepository
from dulwich.objects import ZERO_SHA, Commit
from dulwich.repo import Repo

from . import fleet
from .commits import CommitInfo
from .errors import ConfigError, RepositoryUnavailable
from .trees import GitTree

log = logging.getLogger(__name__)

HEADS: Final = b"refs/heads/"
_URL: Final = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_SCP: Final = re.compile(r"^[^/@:]+@[^/:]+:")
MIRROR_DIR: Final = "mirror.git"
_MIRROR_URL_FILE: Final = "mirror.url"
# A commit touching more files than this is read whole (fleet.load), not worked out from the
# snapshot before it (fleet.update).
MAX_CHANGES: Final = 64


def is_remote(location: str) -> bool:
    """True for a URL or an scp-like ``user@host:path``; False for a local path."""
    return bool(_URL.match(location) or (_SCP.match(location) and not Path(location).exists()))


def redact(location: str) -> str:
    """The location without any password in it (for logs and events)."""
    return re.sub(r"(://[^/:@]+):[^/@]*@", r"\1:***@", location)


_GIT_ERRORS: Final = (
    git_errors.ChecksumMismatch,
    git_errors.WrongObjectException,
    git_errors.MissingCommitError,
    git_errors.ObjectMissing,
    git_errors.ApplyDeltaError,
    git_errors.NotGitRepository,
    git_errors.GitProtocolError,
    git_errors.FileFormatException,
    HTTPUnauthorized,
    HTTPProxyUnauthorized,
    OSError,
    KeyError,
    ValueError,
    AssertionError,
)


@contextmanager
def _converted(what: str) -> Iterator[None]:
    try:
        yield
    except RepositoryUnavailable:
        raise
    except _GIT_ERRORS as exc:
        raise RepositoryUnavailable(f"{what}: {exc.__class__.__name__}: {exc}") from exc


class Repository:
    """Read access to the fleet repository (local, or mirrored from ``location``)."""

    def __init__(self, location: str, state_dir: Path) -> None:
        self.location = location
        self.remote = is_remote(location)
        self._state_dir = state_dir
        # Any: dulwich's NewTypes for refs and ids changed between versions; plain bytes here.
        self._repo: Any
        if self.remote:
            self._repo = self._open_mirror()
        else:
            path = Path(location).expanduser()
            if not path.exists():
                raise ConfigError(f"repository {location!r} does not exist")
            try:
                self._repo = Repo(str(path))
            except NotGitRepository as exc:
                raise ConfigError(
                    f"{location!r} is not a git repository (create one with `setpoint init`)"
                ) from exc

    def __repr__(self) -> str:
        return f"Repository({redact(self.location)!r})"

    def close(self) -> None:
        self._repo.close()

    # --- Where changes show up (for watching) ---------------------------------------

    def watch_paths(self) -> tuple[Path, Path]:
        """``(refs directory, git directory)`` of a local repository: a commit, push,
        fetch or ``git gc`` changes a file under the first or directly in the second
        (``packed-refs``, ``HEAD``)."""
        common = Path(self._repo.commondir())
        return common / "refs", common

    # --- Remote mirror ----------------------------------------------------------------

    def _open_mirror(self) -> Repo:
        path = self._state_dir / MIRROR_DIR
        url_file = self._state_dir / _MIRROR_URL_FILE
        with _converted("opening the mirror"):
            if path.exists():
                recorded = url_file.read_text("utf-8").strip() if url_file.exists() else None
                if recorded == redact(self.location):
                    return Repo(str(path))
                log.warning("mirror in %s is of another repository; starting it afresh", path)
                shutil.rmtree(path)
            path.mkdir(parents=True)
            repo = Repo.init_bare(str(path))
            from .state import write_atomic  # (state imports rendering, which imports us)

            # Never the credentials: the file only tells which repository the mirror is of.
            write_atomic(url_file, (redact(self.location) + "\n").encode("utf-8"))
            return repo

    def refresh(self) -> bool:
        """Fetch a remote into the mirror; True if any branch moved. No-op when local."""
        if not self.remote:
            return False
        before = self.heads()
        with _converted(f"fetching {redact(self.location)}"):
            client, path = get_transport_and_path(self.location)
            store = self._repo.object_store

            def wants(refs: dict[bytes, bytes | None], depth: Any = None) -> list[bytes]:
                return [
                    sha
                    for name, sha in refs.items()
                    if name.startswith(HEADS) and sha and sha != ZERO_SHA and sha not in store
                ]

            result = client.fetch(path, self._repo, determine_wants=wants)  # type: ignore[arg-type]
            remote_heads = {
                name: sha
                for name, sha in result.refs.items()
                if name.startswith(HEADS) and sha and sha != ZERO_SHA
            }
            refs = self._repo.refs
            for name, sha in remote_heads.items():
                if refs.read_ref(name) != sha:
                    refs[name] = sha
            for name in list(refs.keys(HEADS)):
                full = HEADS + name
                if full not in remote_heads:
                    del refs[full]
            symrefs: dict[Any, Any] = dict(result.symrefs)
            head = symrefs.get(b"HEAD")
            if head and head.startswith(HEADS) and refs.read_ref(b"HEAD") != b"ref: " + head:
                refs.set_symbolic_ref(b"HEAD", head)
        return self.heads() != before

    # --- Reading --------------------------------------------------------------------

    def default_branch(self) -> str | None:
        """The branch HEAD points at (the repository's default branch), if any."""
        with _converted("reading HEAD"):
            value = self._repo.refs.read_ref(b"HEAD")
        if value and value.startswith(b"ref: " + HEADS):
            return value[len(b"ref: " + HEADS) :].decode("utf-8")
        return None

    def heads(self) -> dict[str, str]:
        """Every branch and the hex id of the commit it points at."""
        with _converted("reading branches"):
            refs = self._repo.refs.as_dict(HEADS)
        return {name.decode("utf-8"): sha.decode("ascii") for name, sha in refs.items()}

    def commit(self, commit_id: str) -> CommitInfo:
        with _converted(f"reading commit {commit_id[:12]}"):
            obj = self._repo.object_store[commit_id.encode("ascii")]
            if not isinstance(obj, Commit):
                raise RepositoryUnavailable(f"{commit_id} is not a commit")
            message = obj.message.decode("utf-8", "replace").strip()
            return CommitInfo(
                id=commit_id,
                author=obj.author.decode("utf-8", "replace"),
                time=int(obj.commit_time),
                summary=message.splitlines()[0] if message else "",
                tree=obj.tree,
            )

    def resolve(self, rev: str) -> str:
        """A branch, tag, commit id (full or a unique prefix of 4+ digits) or an
        expression git understands (``HEAD~1``, ``main^2``) to a commit id, by dulwich's
        own revision parsing."""
        heads = self.heads()
        if rev in heads:
            return heads[rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev):
            return rev
        spec = rev.encode("utf-8")
        # dulwich splits the work: parse_commit knows short ids and tags, parse_object
        # the ~ and ^ operators.
        for parse in (objectspec.parse_commit, objectspec.parse_object):
            try:
                found = parse(self._repo, spec)
                return str(objectspec.parse_commit(self._repo, found.id).id.decode("ascii"))
            except objectspec.AmbiguousShortId:
                raise ConfigError(
                    f"{rev!r} is the start of more than one object id: give more digits"
                ) from None
            except (KeyError, ValueError, NotImplementedError, git_errors.NotCommitError):
                continue
        raise ConfigError(
            f"no branch or commit {rev!r} in the repository (branches: {', '.join(heads)};"
            " also a commit id, a unique prefix of one, a tag, or HEAD~N)"
        )

    def tree(self, info: CommitInfo) -> GitTree:
        return GitTree(self._repo.object_store, info.tree)

    def uncommitted(self) -> list[str]:
        """Paths in a local work tree that differ from HEAD (staged, changed or untracked);
        empty for a bare repository or a mirror."""
        if self.remote or self._repo.bare:
            return []
        with _converted("reading the work tree's status"):
            found = porcelain.status(self._repo)
        paths = [*found.unstaged, *found.untracked]
        paths += [p for changed in found.staged.values() for p in changed]
        return sorted({p.decode("utf-8", "replace") if isinstance(p, bytes) else p for p in paths})

    def load(
        self,
        commit_id: str,
        *,
        engine: str | None = None,
        memo: fleet.Memo | None = None,
        since: tuple[CommitInfo, fleet.Snapshot] | None = None,
    ) -> tuple[CommitInfo, fleet.Snapshot]:
        """The commit and the validated fleet in its tree (``engine``, ``memo``: see
        fleet.load). ``since``: a commit loaded before and its snapshot; when the git tree
        diff between the two is small and touches only group or device files, the
        snapshot is worked out from that one (fleet.update) instead of read whole."""
        info = self.commit(commit_id)
        with _converted(f"reading the tree of {commit_id[:12]}"):
            tree = self.tree(info)
            if since is not None and engine is None:
                changes = self.changes(since[0], info)
                if changes is not None:
                    snapshot = fleet.update(since[1], tree, changes, memo=memo)
                    if snapshot is not None:
                        return info, snapshot
            return info, fleet.load(tree, engine=engine, memo=memo)

    def changes(
        self, old: CommitInfo, new: CommitInfo, limit: int = MAX_CHANGES
    ) -> list[tuple[str, str]] | None:
        """``(change type, path)`` per file that differs between two commits' trees (git's
        tree diff: subtrees with the same id are not walked); None past ``limit`` files."""
        found: list[tuple[str, str]] = []
        for change in tree_changes(self._repo.object_store, old.tree, new.tree):
            entry = change.new if change.new is not None else change.old
            if entry is None or entry.path is None or len(found) >= limit:
                return None
            found.append((change.type, entry.path.decode("utf-8", "replace")))
        return found
