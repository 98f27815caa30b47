"""CI runs what a developer runs: `make check` (lint, format, types, layers) and `make test`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _target(name: str) -> str:
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{name}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert match, f"Makefile has no '{name}' target"
    return match.group(1)


def test_ci_runs_check_and_test() -> None:
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert "make check" in commands, ".ci/run must run 'make check'"
    assert "make test" in commands, ".ci/run must run 'make test'"
    assert commands.index("make check") < commands.index("make test")


def test_check_formats_the_whole_tree_not_two_folders() -> None:
    recipe = _target("check")
    assert re.search(r"ruff format --check \.\s*$", recipe, re.MULTILINE), recipe
    assert "ruff check ." in recipe
    assert "mypy" in recipe
    assert "lint-imports" in recipe


def test_the_tree_is_formatted() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run(
        [str(ruff), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
