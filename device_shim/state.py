"""What the shim keeps on the device, in its state directory, so that it survives a power cut.

Files in the state directory (mode 0700; every file 0600)::

    state.json     trust state (version floors, group), the raw envelopes of the applied
                   bundles, what the shim manages (files, directories, setting keys), the
                   last reconcile-command sequence, the retry gate of a failed apply, and
                   the reserved block of report sequence numbers
    journal.json   present only while an apply is in progress: what it will touch and
                   where the originals were backed up
    backup/        the originals named in the journal
    lock           flock'ed by the running shim, so two shims never share a directory

Every write is atomic (temp file in the same directory, fsync, ``os.replace``, fsync of the
directory), so a power cut leaves either the old or the new file, never half of one. State
is saved only after an apply succeeded, and only verified bundles ever reach it.

Report sequence numbers are reserved in blocks (``SEQ_BLOCK`` at a time), so reports stay
strictly increasing across restarts without a disk write per report; a shim that starts
with no saved state begins at the clock in milliseconds, so they keep rising even after the
state directory is lost (SPEC 6.6).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from setpoint.kit.files import fsync_dir
from setpoint.kit.files import write_atomic as atomic_write
from setpoint.proto.errors import SchemaError
from setpoint.proto.trust import TrustState

from .backoff import RetryGate
from .errors import StateError

SCHEMA: Final = 1
SEQ_BLOCK: Final = 10_000
STATE_FILE: Final = "state.json"
JOURNAL_FILE: Final = "journal.json"
BACKUP_DIR: Final = "backup"
LOCK_FILE: Final = "lock"


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise SchemaError("stored envelope is not base64 text")
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass(frozen=True, slots=True)
class ShimState:
    """Everything the shim must remember across restarts."""

    trust: TrustState
    applied_group: bytes | None = None
    applied_device: bytes | None = None
    managed_files: frozenset[str] = frozenset()
    managed_dirs: frozenset[str] = frozenset()
    managed_settings: frozenset[str] = frozenset()
    command_seq: int = 0
    report_seq: int = 0
    gate: RetryGate | None = None
    trusted_keyids: frozenset[str] = field(default_factory=frozenset)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "trust": self.trust.to_dict(),
            "applied": {"group": _b64(self.applied_group), "device": _b64(self.applied_device)},
            "managed_files": sorted(self.managed_files),
            "managed_dirs": sorted(self.managed_dirs),
            "managed_settings": sorted(self.managed_settings),
            "command_seq": self.command_seq,
            "report_seq": self.report_seq,
            "gate": None if self.gate is None else self.gate.to_dict(),
            "trusted_keyids": sorted(self.trusted_keyids),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ShimState:
        try:
            if raw.get("schema") != SCHEMA:
                raise SchemaError(f"state schema {raw.get('schema')!r} is not {SCHEMA}")
            applied = raw.get("applied") or {}
            gate = raw.get("gate")
            return cls(
                trust=TrustState.from_dict(raw["trust"]),
                applied_group=_unb64(applied.get("group")),
                applied_device=_unb64(applied.get("device")),
                managed_files=frozenset(map(str, raw.get("managed_files", []))),
                managed_dirs=frozenset(map(str, raw.get("managed_dirs", []))),
                managed_settings=frozenset(map(str, raw.get("managed_settings", []))),
                command_seq=int(raw.get("command_seq", 0)),
                report_seq=int(raw.get("report_seq", 0)),
                gate=None if gate is None else RetryGate.from_dict(gate),
                trusted_keyids=frozenset(map(str, raw.get("trusted_keyids", []))),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SchemaError(f"malformed: {exc!r}") from exc


class StateStore:
    """The state directory: state file, apply journal, backups, lock."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._lock_fd: int | None = None

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def journal_path(self) -> Path:
        return self.dir / JOURNAL_FILE

    @property
    def backup_dir(self) -> Path:
        return self.dir / BACKUP_DIR

    def open(self) -> None:
        """Create the directory (0700) and take the lock; raise StateError if held."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"state directory {self.dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StateError(
                f"state directory {self.dir} is in use by another shim (lock held);"
                " give each shim its own --state-dir"
            ) from exc
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self, device: str) -> ShimState:
        """The saved state, or a fresh one for ``device`` if there is none."""
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return ShimState(TrustState(device))
        except OSError as exc:
            raise StateError(f"{self.state_path}: {exc.strerror}") from exc
        try:
            state = ShimState.from_dict(json.loads(data))
        except (ValueError, SchemaError) as exc:
            raise StateError(
                f"{self.state_path} is corrupt ({exc}); move it aside to start afresh"
                " (the device then accepts any validly signed bundle, whatever its version)"
            ) from exc
        if state.trust.device != device:
            raise StateError(
                f"{self.state_path} belongs to device {state.trust.device!r}, not {device!r};"
                " give each device its own --state-dir"
            )
        return state

    def save(self, state: ShimState) -> None:
        data = json.dumps(state.to_dict(), sort_keys=True, indent=1).encode()
        try:
            atomic_write(self.state_path, data)
        except OSError as exc:
            raise StateError(f"cannot save {self.state_path}: {exc.strerror}") from exc

    def reserve_report_seq(self, state: ShimState, *, floor: int = 0) -> tuple[ShimState, int]:
        """Reserve a block of report sequence numbers; return the new state and the first.

        ``floor`` (the clock in milliseconds, at start) keeps reports rising after the state
        directory was lost: a device that starts afresh continues above what it sent before.
        """
        first = max(state.report_seq + 1, floor)
        updated = replace(state, report_seq=first - 1 + SEQ_BLOCK)
        self.save(updated)
        return updated, first

    # The apply journal.

    def read_journal(self) -> dict[str, Any] | None:
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            journal = json.loads(data)
        except ValueError as exc:
            # Journals are written atomically, so this is not a torn write: someone edited it.
            raise StateError(f"{self.journal_path} is corrupt: {exc}") from exc
        if not isinstance(journal, dict):
            raise StateError(f"{self.journal_path} is corrupt: not an object")
        return journal

    def write_journal(self, journal: Mapping[str, Any]) -> None:
        atomic_write(self.journal_path, json.dumps(journal, sort_keys=True).encode())

    def clear_journal(self) -> None:
        """The commit point of an apply: drop the journal, then the backups."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.journal_path)
            fsync_dir(self.dir)
        shutil.rmtree(self.backup_dir, ignore_errors=True)

    def fresh_backup_dir(self) -> Path:
        shutil.rmtree(self.backup_dir, ignore_errors=True)
        self.backup_dir.mkdir(mode=0o700)
        return self.backup_dir

    @contextlib.contextmanager
    def locked(self) -> Iterator[StateStore]:
        self.open()
        try:
            yield self
        finally:
            self.close()
