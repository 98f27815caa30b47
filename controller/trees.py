"""The two kinds of :class:`~setpoint.controller.fleet.Tree`: a git commit and a directory.

:class:`GitTree` reads the fleet files of one commit from the object store, never from a
work tree, so what is validated and published is exactly what was committed.
:class:`DirectoryTree` reads a checkout on disk for ``setpoint validate`` before a commit.
Both refuse symlinks (a link could point outside the repository) and files over the cap.

Reads git objects or local files; no network.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from dulwich.errors import NotTreeError
from dulwich.object_store import BaseObjectStore
from dulwich.objects import Blob, Tree

from .fleet import TreeError


class GitTree:
    """The tree of one commit, read through a dulwich object store."""

    def __init__(self, store: BaseObjectStore, tree_id: bytes) -> None:
        # Any: dulwich's NewTypes for ids changed between versions; these are plain bytes.
        self._store: Any = store
        self._tree_id = tree_id
        self._trees: dict[bytes, Tree] = {}

    def _tree(self, sha: bytes) -> Tree:
        tree = self._trees.get(sha)
        if tree is None:
            obj = self._store[sha]
            if not isinstance(obj, Tree):
                raise NotTreeError(sha)
            tree = self._trees[sha] = obj
        return tree

    def _entry(self, path: str) -> tuple[int, bytes] | None:
        mode, sha = stat.S_IFDIR, self._tree_id
        for part in path.encode("utf-8").split(b"/"):
            if not part:
                continue
            if not stat.S_ISDIR(mode):
                return None
            try:
                mode, sha = self._tree(sha)[part]
            except KeyError:
                return None
        return mode, sha

    def list_yaml(self, directory: str) -> list[str]:
        entry = self._entry(directory)
        if entry is None or not stat.S_ISDIR(entry[0]):
            return []
        tree = self._tree(entry[1])
        return [
            item.path.decode("utf-8", "replace")
            for item in tree.iteritems()
            if item.mode is not None and not stat.S_ISDIR(item.mode)
        ]

    def blob_id(self, path: str) -> bytes | None:
        """What identifies the content at ``path`` (its mode and object id), or None."""
        entry = self._entry(path)
        return None if entry is None else b"%o:%s" % entry

    def read(self, path: str, max_bytes: int) -> bytes | None:
        entry = self._entry(path)
        if entry is None:
            return None
        mode, sha = entry
        if stat.S_ISLNK(mode):
            raise TreeError(f"{path!r} is a symlink; commit the file itself")
        if not stat.S_ISREG(mode):
            raise TreeError(f"{path!r} is not a regular file")
        blob = self._store[sha]
        if not isinstance(blob, Blob):
            raise TreeError(f"{path!r} is not a file")
        data: bytes = blob.as_raw_string()
        if len(data) > max_bytes:
            raise TreeError(f"{path!r} is {len(data)} bytes, over the {max_bytes}-byte limit")
        return data


class DirectoryTree:
    """A directory on disk (a work tree); the ``.git`` directory is never read."""

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    def _path(self, path: str) -> Path:
        return self._root.joinpath(*[p for p in path.split("/") if p])

    def list_yaml(self, directory: str) -> list[str]:
        base = self._path(directory)
        try:
            entries = list(os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [e.name for e in entries if not e.is_dir(follow_symlinks=False)]

    def read(self, path: str, max_bytes: int) -> bytes | None:
        full = self._path(path)
        try:
            info = full.lstat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(info.st_mode):
            raise TreeError(f"{path!r} is a symlink; use the file itself")
        if not full.resolve().is_relative_to(self._root):
            raise TreeError(f"{path!r} leads outside the repository through a symlink")
        if not stat.S_ISREG(info.st_mode):
            raise TreeError(f"{path!r} is not a regular file")
        if info.st_size > max_bytes:
            raise TreeError(f"{path!r} is {info.st_size} bytes, over the {max_bytes}-byte limit")
        with full.open("rb") as fh:
            return fh.read(max_bytes + 1)
