"""The one backoff policy: exponential, with "equal jitter".

:class:`Backoff` gives the delay before attempt *n*: ``x = min(cap, base * factor**n)``,
then ``x/2 + uniform(0, x/2)``, so a thousand clients that lose the broker at the same
instant come back spread over time instead of in one storm, yet none retries sooner than
half the nominal delay. :class:`Retry` counts the attempts of one loop (``next``, and
``reset`` after a success). Used by the shim (``setpoint.device_shim.backoff``), the MQTT
transport (``setpoint.transport``) and the controller's link, repository and lease loops.

Pure; randomness is passed in, so tests drive it by hand.
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


class Retry:
    """The attempts of one retry loop under a :class:`Backoff`."""

    def __init__(self, backoff: Backoff, rng: Random | None = None) -> None:
        self.backoff = backoff
        self._rng = rng
        self.attempt = 0

    def next(self) -> float:
        """The delay before the next attempt (each call is one more failure)."""
        delay = self.backoff.delay(self.attempt, self._rng)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """After a success: the next failure starts from ``base`` again."""
        self.attempt = 0
