"""``setpoint init DIR``: a new fleet repository with an example fleet committed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._common import require_controller


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="where to create the repository")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    examples = require_controller("setpoint.controller.examples")
    try:
        commit = examples.create(args.directory)
    except FileExistsError as exc:
        print(f"setpoint init: {exc}; choose a new directory", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"directory": str(args.directory), "branch": examples.DEFAULT_BRANCH,
                          "commit": commit, "files": sorted(examples.FILES)}))  # fmt: skip
        return 0
    print(
        f"created fleet repository {args.directory} (branch {examples.DEFAULT_BRANCH},"
        f" commit {commit[:12]})"
    )
    for name in sorted(examples.FILES):
        print(f"  {name}")
    print(f"check changes with: setpoint validate {args.directory}")
    return 0
