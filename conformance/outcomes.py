"""Outcomes: one line per requirement the kit checked, and the verdict over all of them.

An :class:`Outcome` names the SPEC section, the requirement's level (``MUST`` or ``SHOULD``,
as in RFC 2119), whether it held (``PASS``, ``FAIL``, or ``SKIP`` when the kit was not given
what it needs to check it) and what the kit saw. The run passes when no ``MUST`` failed.

Text that came from the device (details, errors) is escaped before it is shown: a device
under test is not trusted to write to the operator's terminal.

Pure; no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

Level = Literal["MUST", "SHOULD"]
Verdict = Literal["PASS", "FAIL", "SKIP"]
MAX_SEEN = 300


def shown(text: object, limit: int = MAX_SEEN) -> str:
    """``text`` made safe for one terminal line: control characters escaped, length capped."""
    raw = str(text)
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Outcome:
    section: str  # e.g. "§8", "§6.6"
    level: Level
    requirement: str
    verdict: Verdict
    seen: str

    def line(self) -> str:
        return (
            f"{self.section:<6} {self.level:<6} {self.verdict:<4}  {self.requirement}"
            f" — {shown(self.seen)}"
        )


def passed(outcomes: Sequence[Outcome]) -> bool:
    """True when every MUST that was checked passed."""
    return not any(o.level == "MUST" and o.verdict == "FAIL" for o in outcomes)


def summary(outcomes: Sequence[Outcome]) -> str:
    def count(level: Level, verdict: Verdict) -> int:
        return sum(1 for o in outcomes if o.level == level and o.verdict == verdict)

    parts = []
    for level in ("MUST", "SHOULD"):
        checked = count(level, "PASS") + count(level, "FAIL")
        parts.append(f"{level} {count(level, 'PASS')}/{checked} met")
    skipped = sum(1 for o in outcomes if o.verdict == "SKIP")
    tail = f", {skipped} not checked" if skipped else ""
    verdict = "CONFORMS" if passed(outcomes) else "DOES NOT CONFORM"
    return f"conformance: {verdict} ({'; '.join(parts)}{tail})"


def to_json(device: str, outcomes: Sequence[Outcome]) -> str:
    return json.dumps(
        {
            "device": device,
            "conforms": passed(outcomes),
            "results": [asdict(o) for o in outcomes],
        },
        indent=1,
        sort_keys=True,
    )
