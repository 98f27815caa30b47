"""The gate that keeps a failed version from looping, on the kit's backoff.

:class:`Backoff` (exponential, jittered) lives in :mod:`setpoint.kit.backoff` and is
re-exported here.

:class:`RetryGate` remembers the last failed apply: which target it was (a key made of the
versions and digests of the bundles), whether the error was permanent, how many attempts
it took and when the next may start. A permanent failure is not retried until the key
changes (a new version); a temporary one waits out the backoff. The gate is kept in the
persisted state, so a restart does not turn into a retry.

Pure; no I/O. Clocks and randomness are passed in, so tests drive them by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from setpoint.kit.backoff import Backoff, Random

__all__ = ["Backoff", "Random", "RetryGate"]


@dataclass(frozen=True, slots=True)
class RetryGate:
    """The last failed apply and when it may be tried again."""

    key: str
    permanent: bool
    attempts: int
    next_at: float
    target: str
    kind: str
    version: int
    error: str
    at: float
    resource: str | None = None

    def allows(self, key: str, now: float, cap: float) -> bool:
        """May ``key`` be applied at ``now``?"""
        if key != self.key:
            return True  # a new version: always worth one try
        if self.permanent:
            return False
        # A clock that jumped backwards (a device without RTC) must not stall us forever.
        return now >= self.next_at or self.next_at - now > cap * 1.5

    def due(self) -> float | None:
        """When the gate next opens (None if it never does for this key)."""
        return None if self.permanent else self.next_at

    @staticmethod
    def after_failure(
        previous: RetryGate | None,
        *,
        key: str,
        permanent: bool,
        now: float,
        backoff: Backoff,
        target: str,
        kind: str,
        version: int,
        error: str,
        resource: str | None = None,
        rng: Random | None = None,
    ) -> RetryGate:
        attempts = previous.attempts + 1 if previous is not None and previous.key == key else 1
        next_at = now + backoff.delay(attempts - 1, rng)
        return RetryGate(
            key=key,
            permanent=permanent,
            attempts=attempts,
            next_at=next_at,
            target=target,
            kind=kind,
            version=version,
            error=error,
            at=now,
            resource=resource,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "permanent": self.permanent,
            "attempts": self.attempts,
            "next_at": self.next_at,
            "target": self.target,
            "kind": self.kind,
            "version": self.version,
            "error": self.error,
            "at": self.at,
            "resource": self.resource,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RetryGate:
        return cls(
            key=str(raw["key"]),
            permanent=bool(raw["permanent"]),
            attempts=int(raw["attempts"]),
            next_at=float(raw["next_at"]),
            target=str(raw["target"]),
            kind=str(raw["kind"]),
            version=int(raw["version"]),
            error=str(raw["error"]),
            at=float(raw["at"]),
            resource=None if raw.get("resource") is None else str(raw["resource"]),
        )
