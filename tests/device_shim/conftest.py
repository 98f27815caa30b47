"""Fixtures for the shim's tests: ``fleet`` (a stand-in controller with a report watcher)
and ``shims`` (agents in threads); the helpers live in ``shimkit``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from shimkit import Fleet, Shims


@pytest.fixture
def fleet(broker: Any, unique_prefix: str, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(broker.host, broker.port, unique_prefix, tmp_path)
    yield f
    f.close()


@pytest.fixture
def shims(fleet: Fleet, tmp_path: Path) -> Iterator[Shims]:
    s = Shims(fleet, tmp_path)
    yield s
    s.close()
