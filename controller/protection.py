"""Which branch speaks for the rollout rules: rings, gates and the operators' keys.

The default branch (``main``) is the one most people may write: it decides what each group
tracks and which group each device is in. If it also decided the gates, a writer of
``main`` could drop ``approval: true`` or add their own operator key. So ``rings:`` and
``operators:`` are read from the **protected branch**: ``--config-branch`` when given,
otherwise the most protected ring declared the first time rings were seen (the end of the
longest chain of gates), remembered in the state directory (``config-branch``) so that a
later commit to ``main`` cannot move it. Everything else in ``fleet.yaml`` (``bundle_ttl``,
``allow_empty``) still comes from the default branch.

:func:`most_protected` and :func:`apply` are pure; :class:`Memory` reads and writes the one
small file.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Final

from .fleet import FleetSettings
from .gating import Rings
from .rendering import Render, View
from .state import write_atomic

log = logging.getLogger(__name__)

MEMORY_FILE: Final = "config-branch"


def most_protected(rings: Rings) -> str | None:
    """The ring at the end of the longest chain of gates (the last declared on a tie), or
    None when no ring has a gate."""
    sources = {r.branch: r.gate.source for r in rings.rings if r.gate is not None}
    best: tuple[int, int, str] | None = None
    for index, ring in enumerate(rings.rings):
        depth, node, seen = 0, ring.branch, set()
        while node in sources and node not in seen:
            seen.add(node)
            node = sources[node]
            depth += 1
        if depth and (best is None or (depth, index) > best[:2]):
            best = (depth, index, ring.branch)
    return best[2] if best else None


def apply(render: Render, protected: View | None) -> Render:
    """``render`` with rings and operators from the protected branch's ``fleet.yaml`` (none
    if it has none), and that branch's head among ``heads``."""
    if protected is None or render.head is None:
        return render
    rules = protected.snapshot.settings or FleetSettings()
    base = render.settings or FleetSettings()
    settings = base.model_copy(update={"rings": rules.rings, "operators": rules.operators})
    heads = {**render.heads}
    heads.setdefault(protected.branch, protected.commit)
    return dataclasses.replace(render, settings=settings, heads=heads)


class Memory:
    """The protected branch, once chosen, in ``<state dir>/config-branch``."""

    def __init__(self, state_dir: Path, configured: str | None) -> None:
        self.path = state_dir / MEMORY_FILE
        self.configured = configured

    def branch(self, default_settings: FleetSettings | None, default_branch: str) -> str | None:
        """The protected branch: configured, remembered, or chosen now from the default
        branch's rings (and remembered). None while no ring has a gate."""
        if self.configured:
            return self.configured
        try:
            remembered = self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            remembered = ""
        if remembered:
            return remembered
        rings = default_settings.ring_list() if default_settings else Rings()
        chosen = most_protected(rings)
        if chosen is None or chosen == default_branch:
            return None
        write_atomic(self.path, chosen.encode("utf-8") + b"\n")
        log.warning(
            "rings, gates and operator keys are read from branch %r from now on (recorded in"
            " %s; pass --config-branch to choose another)",
            chosen,
            self.path,
        )
        return chosen
