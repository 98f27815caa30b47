"""Exponential backoff with jitter: the one backoff of the tree.

:class:`Backoff` gives the delay before attempt *n*: ``x = min(cap, base * 2**n)``, then
"equal jitter" (``x/2 + uniform(0, x/2)``), so a thousand clients that lose the broker at
the same instant come back spread over time instead of in one storm, yet none retries
sooner than half the nominal delay. Used by the shim (``setpoint.device_shim.backoff``) and
the MQTT transport (``setpoint.transport``).

Pure; no I/O. Randomness is passed in, so tests drive it by hand.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol


class Random(Protocol):
    def random(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 1.0
    cap: float = 120.0
    factor: float = 2.0

    def nominal(self, attempt: int) -> float:
        """The delay before jitter: ``min(cap, base * factor**attempt)``."""
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        # Cap the exponent first: factor**attempt overflows a float long before it matters.
        exponent = min(attempt, 64)
        return float(min(self.cap, self.base * self.factor**exponent))

    def delay(self, attempt: int, rng: Random | None = None) -> float:
        """Jittered delay before retry number ``attempt`` (0 for the first retry)."""
        nominal = self.nominal(attempt)
        draw = (rng or random).random()
        return nominal / 2 + draw * nominal / 2
