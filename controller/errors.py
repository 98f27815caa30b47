"""The controller's errors, grouped by what the caller should do.

Third-party exceptions (dulwich, the MQTT transport's, PyYAML, pydantic) are converted
where they are called and chained with ``raise ... from``, so nothing above an adapter
knows them::

    SetpointError                          (setpoint.proto.errors)
    ├── ControllerError
    │   ├── ConfigError                    bad flags, key file or state dir: fix and restart
    │   ├── FleetError                     the fleet repository is wrong: report, keep last good
    │   │                                  (carries every Problem found, each naming file and fix)
    │   └── RepositoryUnavailable          cannot read or fetch the repository: retry later
    └── TransportError                     (setpoint.proto.errors)
        └── BrokerUnavailable              the broker went away or did not ack: reconnect, retry

Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from setpoint.proto.errors import SetpointError, TransportError


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in the fleet repository: where it is and what to do about it.

    ``line`` (1-based) is set where the YAML loader knows it; ``str()`` stays the standard
    ``file: item: message`` and :attr:`where` adds the line (``groups/kiosks.yaml:7``)."""

    file: str
    message: str
    line: int | None = None

    @property
    def where(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"

    def located(self) -> str:
        """``file:line: message`` (compiler style, for editors), or ``str(self)``."""
        return f"{self.where}: {self.message}" if self.file else self.message

    def __str__(self) -> str:
        return f"{self.file}: {self.message}" if self.file else self.message


class ControllerError(SetpointError):
    """Base of the controller's own errors."""


class ConfigError(ControllerError):
    """The controller cannot start as configured (flags, key, state directory)."""


class FleetError(ControllerError):
    """The fleet repository does not validate; ``problems`` lists every finding."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems) or "invalid fleet")


class RepositoryUnavailable(ControllerError):
    """The repository cannot be opened or fetched right now (retry with backoff)."""


class BrokerUnavailable(TransportError):
    """The broker is unreachable, disconnected, or did not acknowledge in time."""
