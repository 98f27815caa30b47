"""``setpoint validate PATH``: the controller's checks, for a pre-commit hook or CI.

Checks the files in the work tree at PATH (or, with ``--rev``, a committed branch or
commit of the repository at PATH) exactly as the controller does before publishing, and
exits non-zero with one line per problem, with the line in the file where it is known:
``groups/kiosk.yaml:7: resource 'motd': unknown kind 'fiel' (known: command, file, setting)``.
A tree with no groups and no devices is a problem here as it is for the controller (the
wrong folder, files never committed, or a commit that deletes everything without
``allow_empty: true``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ._common import require_controller


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        type=Path,
        nargs="?",
        default=Path("."),
        help="the fleet repository (default: the current directory)",
    )
    parser.add_argument("--rev", help="check this branch or commit id instead of the work tree")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _note_uncommitted(path: Path) -> None:
    """Say which fleet files the controller does not see yet: it publishes commits only."""
    if not (path / ".git").exists():
        return
    repository = require_controller("setpoint.controller.repository")
    errors = require_controller("setpoint.controller.errors")
    fleet = require_controller("setpoint.controller.fleet")
    tops = (fleet.FLEET_FILE, f"{fleet.GROUPS_DIR}/", f"{fleet.DEVICES_DIR}/", "files/")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            repo = repository.Repository(str(path), Path(scratch))
            try:
                changed = [p for p in repo.uncommitted() if p.startswith(tops)]
                branch = repo.default_branch() or "HEAD"
            finally:
                repo.close()
    except (errors.ConfigError, errors.RepositoryUnavailable):
        return
    if changed:
        shown = ", ".join(changed[:10]) + (
            f" and {len(changed) - 10} more" if len(changed) > 10 else ""
        )
        print(
            f"note: not committed: {shown}; the controller publishes commits only: commit"
            f" them, or check what is committed with `setpoint validate {path} --rev {branch}`",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    fleet = require_controller("setpoint.controller.fleet")
    if args.rev is None:
        trees = require_controller("setpoint.controller.trees")
        if not args.path.is_dir():
            print(f"setpoint validate: {args.path} is not a directory", file=sys.stderr)
            return 2
        snapshot = fleet.load(trees.DirectoryTree(args.path))
        where = f"work tree {args.path}"
        _note_uncommitted(args.path)
    else:
        repository = require_controller("setpoint.controller.repository")
        errors = require_controller("setpoint.controller.errors")
        try:
            with tempfile.TemporaryDirectory() as scratch:
                repo = repository.Repository(str(args.path), Path(scratch))
                try:
                    commit = repo.resolve(args.rev)
                    info, snapshot = repo.load(commit)
                finally:
                    repo.close()
        except (errors.ConfigError, errors.RepositoryUnavailable) as exc:
            print(f"setpoint validate: {exc}", file=sys.stderr)
            return 2
        where = f"{args.rev} ({info.id[:12]})"
    problems = [p.located() for p in snapshot.problems]
    warnings = [w.located() for w in snapshot.warnings]
    if args.json:
        print(
            json.dumps(
                {
                    "ok": not problems,
                    "problems": [
                        {"file": p.file, "line": p.line, "message": p.message}
                        for p in snapshot.problems
                    ],
                    "warnings": [
                        {"file": w.file, "line": w.line, "message": w.message}
                        for w in snapshot.warnings
                    ],
                    "groups": sorted(snapshot.groups),
                    "devices": sorted(snapshot.devices),
                },
                indent=2,
            )
        )
        return 1 if problems else 0
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{len(problems)} problem(s) in {where}", file=sys.stderr)
    else:
        print(f"ok: {len(snapshot.groups)} group(s), {len(snapshot.devices)} device(s) in {where}")
    return 1 if problems else 0
