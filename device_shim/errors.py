"""The shim's own errors, grouped by what the agent does about them.

Bad data from the other side (signatures, rollback, expiry, malformed payloads) raise the
protocol's errors from :mod:`setpoint.proto.errors`; the agent refuses and reports them.
What is left is the device's own business::

    SetpointError                      (setpoint.proto.errors)
    ├── ProtocolError                  bad data from the other side: refuse, report, never retry
    ├── TransportError                 broker gone: the link retries with backoff and jitter
    └── ShimError
        ├── ConfigError                bad configuration: say what to fix, do not start
        ├── StateError                 the state directory is unusable or corrupt: do not start
        └── ApplyError                 a step failed; what the bundle changed is put back
            ├── TemporaryApplyError    retry later, with exponential backoff
            └── PermanentApplyError    no retry until a new version arrives

Pure; no I/O.
"""

from __future__ import annotations

from setpoint.proto.errors import SetpointError


class ShimError(SetpointError):
    """Base of the errors the device shim raises about itself."""


class ConfigError(ShimError, ValueError):
    """The shim's configuration is wrong; the message says what to change."""


class StateError(ShimError):
    """The state directory cannot be used (unreadable, corrupt, locked by another shim)."""


class ApplyError(ShimError):
    """A step of an apply failed; ``resource_id`` names the resource, if any."""

    permanent = False

    def __init__(self, message: str, *, resource_id: str | None = None) -> None:
        super().__init__(message)
        self.resource_id = resource_id


class TemporaryApplyError(ApplyError):
    """Might work later (disk full, command failed or timed out): retry with backoff."""


class PermanentApplyError(ApplyError):
    """Will not work until the bundle changes (path outside the root, through a symlink)."""

    permanent = True
