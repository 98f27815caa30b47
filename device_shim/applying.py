"""Applying: run the planned steps, one executor per kind, all or nothing.

:func:`apply` takes the steps :func:`planning.plan` made and does them. Before it touches
anything it backs up every file it will change (and the settings file) into the state
directory and writes a journal naming them; if a step fails, :func:`rollback` puts every
original back, removes the files and directories the apply created, and the error goes up
as a :class:`~setpoint.device_shim.errors.TemporaryApplyError` or
:class:`~setpoint.device_shim.errors.PermanentApplyError`. A journal still on disk when
the shim starts means an apply was cut short (a kill, a power cut): :func:`recover` rolls
it back, unless the state file shows it had already been committed.

Every file operation goes through :class:`RootFS`, which walks the path from the real
root one component at a time with ``O_NOFOLLOW``: nothing is ever read, written or
deleted outside the root or through a symlink, even if the tree changes between
observation and action. Files are written to a temp file in the same directory, fsync'ed,
given their mode (and, when running as root, the previous owner), renamed over the
target, and the directory is fsync'ed.

Settings live in one JSON object in ``<root>/.setpoint/settings.json`` (keys sorted,
written atomically, mode 0600 when any desired setting is secret, else 0644).

Sealed values are opened (decrypted) before anything is backed up or touched: a value this
device cannot open (:class:`~setpoint.proto.errors.NotARecipient`, or
:class:`~setpoint.proto.errors.SealedInvalid` for a tampered ciphertext) stops the apply
with nothing changed. Each plaintext is written with its resource's mode, its keyed MAC
goes into :attr:`Applied.macs` for the ledger, and no reference to it outlives the apply.

Commands run last, only where the device's policy allows (checked again here), with the
policy's timeout cap; a failing apply command, or a check that still fails after it,
fails the apply (temporary: retried with backoff).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from setpoint.proto.errors import NotARecipient, SealedInvalid
from setpoint.proto.sealed import Sealed

from .config import SETTINGS_FILE, DevicePolicy
from .errors import ApplyError, PermanentApplyError, StateError, TemporaryApplyError
from .observing import Resolver
from .planning import (
    CHANGES,
    Blocked,
    CommandFact,
    DeleteManaged,
    RemoveSetting,
    RunCommand,
    SetMode,
    SetSetting,
    Skip,
    Step,
    Wait,
    WriteFile,
)
from .running import CommandRunner
from .state import BACKUP_DIR, StateStore
from .unsealing import Unsealer, setting_bytes

JOURNAL_SCHEMA: Final = 1
_BACKUP_NAME: Final = re.compile(r"[0-9]{1,6}\.bak")
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts(rel: str) -> list[str]:
    """The components of a normalised relative path; anything else is refused."""
    if (
        not rel
        or rel.startswith("/")
        or "\x00" in rel
        or os.path.normpath(rel) != rel
        or rel == ".."
        or rel.startswith("../")
    ):
        raise PermanentApplyError(f"path {rel!r} is not a normalised path inside the root")
    return rel.split("/")


class RootFS:
    """File operations confined to one directory tree; every component walked with O_NOFOLLOW."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._counter = 0

    @contextlib.contextmanager
    def parent(
        self, rel: str, *, create: bool = False, created: list[str] | None = None
    ) -> Iterator[tuple[int, str]]:
        """Open the directory holding ``rel``; yield ``(dir_fd, name)``."""
        parts = _parts(rel)
        fd = os.open(self.root, _DIR_FLAGS)
        walked: list[str] = []
        try:
            for part in parts[:-1]:
                walked.append(part)
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    if created is not None:
                        created.append("/".join(walked))
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise PermanentApplyError(
                            f"{rel}: {'/'.join(walked)} is a symlink or not a directory;"
                            " setpoint never writes through symlinks"
                        ) from exc
                    raise
                os.close(fd)
                fd = nxt
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def lstat(self, rel: str) -> os.stat_result | None:
        try:
            with self.parent(rel) as (fd, name):
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def missing_dirs(self, rel: str) -> list[str]:
        """The parent directories of ``rel`` that do not exist yet, outermost first."""
        parts = _parts(rel)[:-1]
        for i in range(len(parts)):
            prefix = "/".join(parts[: i + 1])
            st = self.lstat(prefix)
            if st is None:
                return ["/".join(parts[: j + 1]) for j in range(i, len(parts))]
        return []

    def read(self, rel: str) -> tuple[bytes, os.stat_result]:
        with self.parent(rel) as (dfd, name):
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd
            )
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise PermanentApplyError(f"{rel} is not a regular file")
                return fh.read(), st

    def copy_to(self, rel: str, dest: str) -> os.stat_result:
        """Copy the regular file ``rel`` to the absolute path ``dest`` (fsync'ed)."""
        with self.parent(rel) as (dfd, name):
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd
            )
            with os.fdopen(fd, "rb") as src:
                st = os.fstat(src.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise PermanentApplyError(f"{rel} is not a regular file")
                out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(out, "wb") as dst:
                    while chunk := src.read(1 << 16):
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
                return st

    def write_atomic(
        self,
        rel: str,
        content: bytes,
        mode: int,
        *,
        owner: tuple[int, int] | None = None,
        created: list[str] | None = None,
    ) -> None:
        with self.parent(rel, create=True, created=created) as (dfd, name):
            try:
                old = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            if old is not None and not (stat.S_ISREG(old.st_mode) or stat.S_ISLNK(old.st_mode)):
                raise PermanentApplyError(f"{rel} exists and is not a regular file")
            if old is not None and stat.S_ISLNK(old.st_mode):
                raise PermanentApplyError(f"{rel} is a symlink; setpoint never writes through one")
            if owner is None and old is not None and os.geteuid() == 0:
                owner = (old.st_uid, old.st_gid)
            self._counter += 1
            tmp = f".{name}.setpoint-{os.getpid()}-{self._counter}"
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dfd,
            )
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(content)
                    fh.flush()
                    if owner is not None and os.geteuid() == 0:
                        with contextlib.suppress(OSError):
                            os.fchown(fh.fileno(), *owner)
                    os.fchmod(fh.fileno(), mode)
                    os.fsync(fh.fileno())
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            os.fsync(dfd)

    def chmod(self, rel: str, mode: int) -> None:
        with self.parent(rel) as (dfd, name):
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd
            )
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise PermanentApplyError(f"{rel} is not a regular file")
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)

    def unlink(self, rel: str) -> bool:
        """Remove a file or symlink (never a directory); False if there was nothing."""
        try:
            with self.parent(rel) as (dfd, name):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise PermanentApplyError(f"{rel} is a directory; setpoint removes files only")
                os.unlink(name, dir_fd=dfd)
                os.fsync(dfd)
                return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def rmdir(self, rel: str) -> bool:
        """Remove an empty directory; False if it is not empty or not there."""
        try:
            with self.parent(rel) as (dfd, name):
                os.rmdir(name, dir_fd=dfd)
                return True
        except OSError:
            return False


@dataclass
class ApplyContext:
    """What the executors work with during one apply."""

    fs: RootFS
    resolver: Resolver
    policy: DevicePolicy
    runner: CommandRunner | None = None
    settings_mode: int = 0o644
    checked: dict[str, CommandFact] = field(default_factory=dict)
    created_dirs: list[str] = field(default_factory=list)
    done: list[Step] = field(default_factory=list)
    unsealer: Unsealer | None = None
    opened: dict[str, bytes] = field(default_factory=dict, repr=False)
    macs: dict[str, str] = field(default_factory=dict)
    _settings: dict[str, Any] | None = None
    _settings_dirty: bool = False

    def settings(self) -> dict[str, Any]:
        if self._settings is None:
            self._settings = read_settings(self.fs)
        return self._settings

    def flush_settings(self) -> None:
        if not self._settings_dirty or self._settings is None:
            return
        data = json.dumps(self._settings, sort_keys=True, indent=1).encode() + b"\n"
        self.fs.write_atomic(SETTINGS_FILE, data, self.settings_mode, created=self.created_dirs)
        self._settings_dirty = False

    def mark_settings_dirty(self) -> None:
        self._settings_dirty = True

    def open_sealed(self, steps: Sequence[Step]) -> None:
        """Decrypt every sealed value the steps need, before anything is touched."""
        for step in steps:
            value = getattr(step, "sealed", None)
            if value is None or value.digest() in self.opened:
                continue
            rid = getattr(step, "resource_id", None)
            if self.unsealer is None:
                raise NotARecipient("this shim has no age identity", rid)
            plaintext = self.unsealer.open(value, rid)
            if isinstance(step, SetSetting):
                try:
                    plaintext.decode("utf-8")
                except UnicodeDecodeError:
                    raise SealedInvalid("a sealed setting must be UTF-8 text", rid) from None
            self.opened[value.digest()] = plaintext

    def plaintext(self, value: Sealed) -> bytes:
        return self.opened[value.digest()]

    def check_path(self, rel: str) -> None:
        """Refuse a path that resolves anywhere but itself under the root, or is reserved."""
        resolved = self.resolver.resolve(rel)
        if resolved.condition != "ok" or resolved.real != rel:
            raise PermanentApplyError(f"{rel}: refused ({resolved.condition} {resolved.detail})")


def read_settings(fs: RootFS) -> dict[str, Any]:
    """The settings file as a dict ({} if missing or corrupt: it is rewritten whole)."""
    try:
        content, _st = fs.read(SETTINGS_FILE)
        raw = json.loads(content)
    except (OSError, ValueError, PermanentApplyError):
        return {}
    return raw if isinstance(raw, dict) else {}


# One executor per kind of step.


def _write_file(step: WriteFile, ctx: ApplyContext) -> None:
    ctx.check_path(step.path)
    content = step.content if step.sealed is None else ctx.plaintext(step.sealed)
    ctx.fs.write_atomic(step.path, content, step.mode, created=ctx.created_dirs)
    if step.sealed is not None and ctx.unsealer is not None:
        ctx.macs[step.sealed.digest()] = ctx.unsealer.mac_new(content)


def _set_mode(step: SetMode, ctx: ApplyContext) -> None:
    ctx.check_path(step.path)
    st = ctx.fs.lstat(step.path)
    if st is not None and st.st_nlink > 1:
        # A hard link may share its inode with a file outside the root: replace, never chmod.
        content, _st = ctx.fs.read(step.path)
        ctx.fs.write_atomic(step.path, content, step.mode)
    else:
        ctx.fs.chmod(step.path, step.mode)


def _delete_managed(step: DeleteManaged, ctx: ApplyContext) -> None:
    ctx.check_path(step.path)
    st = ctx.fs.lstat(step.path)
    if st is not None and stat.S_ISREG(st.st_mode):
        ctx.fs.unlink(step.path)
    # Anything else there now (a symlink, a directory) was not made by the shim: left alone.


def _set_setting(step: SetSetting, ctx: ApplyContext) -> None:
    value = step.value
    if step.sealed is not None and ctx.unsealer is not None:
        value = ctx.plaintext(step.sealed).decode("utf-8")
        ctx.macs[step.sealed.digest()] = ctx.unsealer.mac_new(setting_bytes(value))
    ctx.settings()[step.key] = value
    ctx.mark_settings_dirty()


def _remove_setting(step: RemoveSetting, ctx: ApplyContext) -> None:
    ctx.settings().pop(step.key, None)
    ctx.mark_settings_dirty()


def _run_command(step: RunCommand, ctx: ApplyContext) -> None:
    refusal = ctx.policy.refuses_command(step.check, step.apply)
    if refusal is not None:
        raise PermanentApplyError(refusal, resource_id=step.resource_id)
    if ctx.runner is None:
        raise PermanentApplyError("no command runner", resource_id=step.resource_id)
    ctx.flush_settings()  # a command sees the settings this apply wrote
    result = ctx.runner.run(step.apply, ctx.policy.timeout(step.timeout))
    if not result.ok:
        ctx.checked[step.resource_id] = CommandFact(False, f"apply {result.describe()}")
        raise TemporaryApplyError(f"apply {result.describe()}", resource_id=step.resource_id)
    check = ctx.runner.run(step.check, ctx.policy.timeout(step.timeout))
    if not check.ok:
        detail = f"check still fails after apply: {check.describe()}"
        ctx.checked[step.resource_id] = CommandFact(False, detail)
        raise TemporaryApplyError(detail, resource_id=step.resource_id)
    ctx.checked[step.resource_id] = CommandFact(True)


def _nothing(step: Skip | Wait, ctx: ApplyContext) -> None:
    return None


def _blocked(step: Blocked, ctx: ApplyContext) -> None:
    error = PermanentApplyError if step.permanent else TemporaryApplyError
    raise error(step.why, resource_id=step.resource_id)


EXECUTORS: Final[Mapping[type, Callable[[Any, ApplyContext], None]]] = {
    WriteFile: _write_file,
    SetMode: _set_mode,
    DeleteManaged: _delete_managed,
    SetSetting: _set_setting,
    RemoveSetting: _remove_setting,
    RunCommand: _run_command,
    Skip: _nothing,
    Wait: _nothing,
    Blocked: _blocked,
}


def _touched_paths(steps: Sequence[Step]) -> dict[str, bool]:
    """Each path the steps change, and whether only a DeleteManaged touches it."""
    paths: dict[str, bool] = {}
    for step in steps:
        if isinstance(step, WriteFile | SetMode | DeleteManaged):
            only_delete = isinstance(step, DeleteManaged)
            paths[step.path] = paths.get(step.path, True) and only_delete
    if any(isinstance(s, SetSetting | RemoveSetting) for s in steps):
        paths[SETTINGS_FILE] = False
    return paths


def _prepare(
    steps: Sequence[Step], ctx: ApplyContext, store: StateStore, meta: Mapping[str, Any]
) -> dict[str, Any]:
    """Back up what the steps will change and write the journal; nothing is touched yet."""
    backup_dir = store.fresh_backup_dir()
    entries: list[dict[str, Any]] = []
    dirs: list[str] = []
    for n, (rel, only_delete) in enumerate(_touched_paths(steps).items()):
        for d in ctx.fs.missing_dirs(rel):
            if d not in dirs:
                dirs.append(d)
        st = ctx.fs.lstat(rel)
        if st is None:
            entries.append({"path": rel, "existed": False})
            continue
        if only_delete and not stat.S_ISREG(st.st_mode):
            continue  # the delete leaves it alone
        if stat.S_ISLNK(st.st_mode):
            raise PermanentApplyError(f"{rel} is a symlink; setpoint never writes through one")
        if not stat.S_ISREG(st.st_mode):
            raise PermanentApplyError(f"{rel} exists and is not a regular file")
        name = f"{n}.bak"
        st = ctx.fs.copy_to(rel, str(backup_dir / name))
        entries.append(
            {
                "path": rel,
                "existed": True,
                "backup": name,
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
            }
        )
    journal = {
        "schema": JOURNAL_SCHEMA,
        "started_at": time.time(),
        "files": entries,
        "dirs": dirs,
        **meta,
    }
    store.write_journal(journal)
    return journal


def _read_backup(store: StateStore, name: str) -> bytes:
    fd = os.open(store.backup_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def rollback(journal: Mapping[str, Any], fs: RootFS, store: StateStore) -> list[str]:
    """Put back everything the journal names; return the errors (empty when complete)."""
    errors: list[str] = []
    for entry in reversed(journal.get("files", [])):
        rel = entry["path"]
        try:
            if entry["existed"]:
                name = str(entry["backup"])
                if not _BACKUP_NAME.fullmatch(name):
                    raise StateError(f"journal names backup {name!r}, outside {BACKUP_DIR}/")
                content = _read_backup(store, name)
                fs.write_atomic(
                    rel, content, int(entry["mode"]), owner=(int(entry["uid"]), int(entry["gid"]))
                )
            else:
                fs.unlink(rel)
        except (OSError, ApplyError, StateError) as exc:
            errors.append(f"{rel}: {exc}")
    for d in reversed(journal.get("dirs", [])):
        fs.rmdir(d)
    return errors


@dataclass(frozen=True, slots=True)
class Applied:
    """What a successful apply did (the caller commits it by saving state, then the journal)."""

    done: tuple[Step, ...]
    created_dirs: tuple[str, ...]
    checked: Mapping[str, CommandFact]
    # Ciphertext digest -> keyed MAC of the plaintext written (for the ledger).
    macs: Mapping[str, str] = field(default_factory=dict)


def apply(
    steps: Sequence[Step],
    ctx: ApplyContext,
    store: StateStore,
    meta: Mapping[str, Any],
) -> Applied:
    """Run ``steps`` all or nothing. On success the journal stays until the caller commits.

    Raises ApplyError after putting back what was changed; SealedError (a sealed value
    this device cannot open) before changing anything.
    """
    for step in steps:
        if isinstance(step, Blocked):
            _blocked(step, ctx)  # before anything is touched
    if not any(isinstance(s, (*CHANGES, RunCommand)) for s in steps):
        return Applied(tuple(steps), (), {})
    try:
        ctx.open_sealed(steps)  # before anything is touched, too
        return _apply(steps, ctx, store, meta)
    finally:
        ctx.opened.clear()


def _apply(
    steps: Sequence[Step], ctx: ApplyContext, store: StateStore, meta: Mapping[str, Any]
) -> Applied:
    try:
        journal = _prepare(steps, ctx, store, meta)
    except ApplyError:
        store.clear_journal()
        raise
    except OSError as exc:
        store.clear_journal()
        raise TemporaryApplyError(f"cannot back up before applying: {exc}") from exc
    current: Step | None = None
    try:
        for step in steps:
            current = step
            EXECUTORS[type(step)](step, ctx)
            ctx.done.append(step)
        current = None
        ctx.flush_settings()
    except (ApplyError, OSError) as exc:
        rid = getattr(current, "resource_id", None)
        if isinstance(exc, ApplyError):
            error: ApplyError = exc
            if error.resource_id is None:
                error.resource_id = rid
        else:
            error = TemporaryApplyError(f"{type(exc).__name__}: {exc}", resource_id=rid)
        problems = rollback(journal, ctx.fs, store)
        if problems:
            # Keep the journal: the next pass (or the next start) tries the rollback again.
            raise StateError(
                f"apply failed ({error}) and the rollback is incomplete: {'; '.join(problems)}"
            ) from exc
        store.clear_journal()
        raise error from exc
    return Applied(tuple(ctx.done), tuple(ctx.created_dirs), dict(ctx.checked), dict(ctx.macs))


def recover(
    store: StateStore, fs: RootFS, committed: Callable[[Mapping[str, Any]], bool]
) -> str | None:
    """Finish an apply cut short: roll it back unless ``committed(journal)``. Say what was done."""
    journal = store.read_journal()
    if journal is None:
        return None
    if committed(journal):
        store.clear_journal()
        return "found the journal of an apply that had committed; cleared it"
    problems = rollback(journal, fs, store)
    if problems:
        raise StateError(f"cannot roll back the interrupted apply: {'; '.join(problems)}")
    store.clear_journal()
    return f"rolled back an interrupted apply of {journal.get('label', 'a bundle')}"
