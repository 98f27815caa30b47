"""What the shim keeps on the device, in its state directory, so that it survives a power cut.

Files in the state directory (mode 0700; every file 0600)::

    state.json     trust state (version floors, group), the raw envelopes of the applied
                   bundles, what the shim manages (files, directories, setting keys), the
                   last reconcile-command sequence, the retry gate of a failed apply, and
                   the reserved block of report sequence numbers
    journal.json   present only while an apply is in progress: what it will touch and
                   where the originals were backed up, with an HMAC-SHA256 by journal.key
    journal.key    a device-local random key: a journal without its MAC is refused
    backup/        the originals named in the journal
    lock           flock'ed by the running shim, so two shims never share a directory

The directory must be private to the shim: :meth:`StateStore.open` refuses one that is
owned by another user or writable by group or others, or one below a directory another
user (not root) owns or may write (without the sticky bit): that account could swap the
state directory and plant a journal, whose rollback a root shim carries out with the
journal's modes and owners. A directory readable by others is made 0700.

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
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
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
JOURNAL_KEY_FILE: Final = "journal.key"


def check_private(directory: Path) -> None:
    """Raise StateError unless ``directory`` and every directory above it are safe from
    other accounts (see the module docstring); make ``directory`` 0700 if it is readable."""
    euid = os.geteuid()
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"state directory {directory} is not a directory (a symlink?)")
    if st.st_uid != euid:
        raise StateError(
            f"state directory {directory} is owned by uid {st.st_uid}, not by this shim"
            f" (uid {euid}); give the shim a directory of its own"
        )
    if st.st_mode & 0o022:
        raise StateError(
            f"state directory {directory} is writable by group or others (mode"
            f" {stat.S_IMODE(st.st_mode):04o}); chmod 0700 it after checking its content"
        )
    if st.st_mode & 0o077:
        os.chmod(directory, 0o700)
    for parent in Path(os.path.abspath(directory)).parents:
        pst = os.stat(parent)
        if pst.st_uid not in (0, euid):
            raise StateError(
                f"state directory {directory} is inside {parent}, owned by uid {pst.st_uid}:"
                " that account could replace it; keep the state directory outside the device"
                " root (the default: /var/lib/setpoint/DEVICE)"
            )
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            raise StateError(
                f"state directory {directory} is inside {parent}, writable by group or"
                f" others (mode {stat.S_IMODE(pst.st_mode):04o}); choose another place"
            )


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
        """Create the directory (0700), check that it is private, take the lock; raise
        StateError if it is not private or the lock is held."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            check_private(self.dir)
            fd = os.open(
                self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
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

    def _journal_key(self) -> bytes:
        path = self.dir / JOURNAL_KEY_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            atomic_write(path, secrets.token_bytes(32))
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            key = fh.read(64)
        if len(key) != 32:
            raise StateError(f"{path} is not a 32-byte key; delete it (and any journal.json)")
        return key

    def _mac(self, body: bytes) -> str:
        return hmac.new(self._journal_key(), body, hashlib.sha256).hexdigest()

    def read_journal(self) -> dict[str, Any] | None:
        """The journal of an apply in progress, once its MAC is checked (None if none)."""
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            return None
        refused = (
            f"{self.journal_path} was not written by this shim (no valid MAC by"
            f" {JOURNAL_KEY_FILE}); the shim will not act on it: inspect it, then delete it"
            f" and {BACKUP_DIR}/ to go on"
        )
        try:
            outer = json.loads(data)
        except ValueError as exc:
            # Journals are written atomically, so this is not a torn write: someone edited it.
            raise StateError(f"{self.journal_path} is corrupt: {exc}") from exc
        if not isinstance(outer, dict) or not isinstance(outer.get("body"), str):
            raise StateError(refused)
        body = outer["body"].encode("utf-8")
        if not hmac.compare_digest(str(outer.get("mac", "")), self._mac(body)):
            raise StateError(refused)
        journal = json.loads(body)
        if not isinstance(journal, dict):
            raise StateError(f"{self.journal_path} is corrupt: not an object")
        return journal

    def write_journal(self, journal: Mapping[str, Any]) -> None:
        body = json.dumps(journal, sort_keys=True)
        outer = {"body": body, "mac": self._mac(body.encode("utf-8"))}
        atomic_write(self.journal_path, json.dumps(outer, sort_keys=True).encode())

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
