"""A real git repository in a temporary directory, driven with the git CLI (for the
controller's tests and the security suite's rollout attacks)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

ALICE = "Alice Operator <alice@example.com>"


class GitRepo:
    """A real git repository in a temporary directory, driven with the git CLI."""

    def __init__(self, path: Path, *, bare: bool = False) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main", *(["--bare"] if bare else []))

    def git(self, *args: str, author: str = ALICE, check: bool = True) -> str:
        name, _, email = author.partition(" <")
        env = {
            **os.environ,
            "GIT_AUTHOR_NAME": name,
            "GIT_AUTHOR_EMAIL": email.rstrip(">"),
            "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email.rstrip(">"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": str(self.path),
        }
        result = subprocess.run(
            ["git", "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
            cwd=self.path,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)}: {result.stderr}")
        return result.stdout.strip()

    def write(self, files: Mapping[str, str | None]) -> None:
        for name, text in files.items():
            path = self.path / name
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")

    def commit(
        self,
        files: Mapping[str, str | None] | None = None,
        message: str = "change",
        *,
        author: str = ALICE,
        branch: str | None = None,
    ) -> str:
        """Write ``files`` (None deletes) and commit them; on ``branch`` if given."""
        if branch is not None:
            known = self.git("branch", "--list", branch)
            self.git("checkout", "-q", *([] if known else ["-b"]), branch)
        try:
            self.write(files or {})
            self.git("add", "-A")
            self.git("commit", "-q", "--allow-empty", "-m", message, author=author)
            return self.git("rev-parse", "HEAD")
        finally:
            if branch is not None:
                self.git("checkout", "-q", "main")

    def head(self, branch: str = "main") -> str:
        return self.git("rev-parse", f"refs/heads/{branch}")
