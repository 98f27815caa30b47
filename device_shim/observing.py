"""Observing: what is actually on the device, cheaply, as facts for :func:`planning.plan`.

Files are looked at with ``lstat`` first; the content is read and hashed only when the
stat signature (device, inode, size, mtime, ctime, mode) differs from the one cached at
the last hash. A file modified within the last two seconds is not cached (the "racy git"
rule: a same-size edit in the same timestamp tick would otherwise go unseen).

Paths are resolved under the real device root: directory symlinks that stay inside the
root are followed, one that leads out makes the path ``escapes``; a path whose last
component is a symlink is ``symlink``; paths inside ``<root>/.setpoint`` or the state
directory are ``reserved``. Files larger than any bundle could ask for are never read.

:meth:`Observer.refresh` looks again at the changed paths only (what the watcher reported)
and keeps every other fact from the previous observation.

The path of a sealed resource is never hashed without a key: the observer computes the
keyed MAC of :mod:`unsealing` instead, and of a sealed setting's value likewise.

Command checks run only when asked (a new version, a reconcile command, or the device's
``command_check_interval``); otherwise the last result is reused.

This module reads the file system and runs check commands; it never changes anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from setpoint.proto import bundles, codec
from setpoint.proto.bundles import (
    CommandResource,
    FileResource,
    Resource,
    SettingResource,
    SettingValue,
)

from .config import DEFAULT_POLICY, RESERVED_DIR, SETTINGS_FILE, DevicePolicy
from .planning import CommandFact, FileFact, Observed, SettingsFact
from .running import CommandRunner
from .unsealing import Unsealer, setting_bytes

RACY_SECONDS: Final = 2.0
MAX_SETTINGS_BYTES: Final = 1024 * 1024
MAX_FILE_BYTES: Final = bundles.MAX_BUNDLE_BYTES

StatSignature = tuple[int, int, int, int, int, int]


def signature(st: os.stat_result) -> StatSignature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


def file_digest(content: bytes, mode: int) -> str:
    """What a device reports for a file: the same digest ``bundles.resource_digest`` gives."""
    return codec.digest({"content": content, "mode": mode})


def setting_digest(key: str, value: SettingValue) -> str:
    return codec.digest({"key": key, "value": value})


@dataclass(frozen=True, slots=True)
class Resolved:
    """A resource path resolved under the real root."""

    condition: str  # "ok", "escapes" or "reserved"
    real: str | None  # relative to the real root
    absolute: str | None
    detail: str = ""


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class Resolver:
    """Resolve resource paths under the real root; refuse what leads out or is reserved."""

    def __init__(self, root: Path, state_dir: Path) -> None:
        self.root = os.path.realpath(root)
        state_real = os.path.realpath(state_dir)
        self._reserved = [os.path.join(self.root, RESERVED_DIR)]
        if _within(state_real, self.root):
            self._reserved.append(state_real)

    def resolve(self, path: str) -> Resolved:
        full = os.path.join(self.root, path)
        parent = os.path.realpath(os.path.dirname(full))
        if not _within(parent, self.root):
            return Resolved("escapes", None, None, f"its directory resolves to {parent}")
        absolute = os.path.join(parent, os.path.basename(full))
        if absolute == self.root:
            return Resolved("reserved", None, None, "the device root itself")
        if any(_within(absolute, r) for r in self._reserved):
            return Resolved("reserved", None, None, "setpoint's own directory")
        return Resolved("ok", os.path.relpath(absolute, self.root), absolute)

    def settings_path(self) -> str:
        return os.path.join(self.root, SETTINGS_FILE)


class Observer:
    """Gathers facts about the resources of a bundle; caches hashes by stat signature."""

    def __init__(
        self,
        root: Path,
        state_dir: Path,
        *,
        policy: DevicePolicy = DEFAULT_POLICY,
        runner: CommandRunner | None = None,
        clock: Callable[[], float] = time.time,
        unsealer: Unsealer | None = None,
    ) -> None:
        self.resolver = Resolver(root, state_dir)
        self._unsealer = unsealer
        self._macs: dict[str, tuple[StatSignature, str]] = {}
        self._policy = policy
        self._runner = runner
        self._clock = clock
        self._hashes: dict[str, tuple[StatSignature, str, str]] = {}
        self._settings: tuple[StatSignature, SettingsFact] | None = None
        self._checks: dict[str, tuple[str, CommandFact]] = {}
        self.hashed = 0  # files read and hashed, for tests and curiosity
        self.checks_run = 0

    # Files.

    def file_fact(self, path: str, *, keyed: bool = False) -> FileFact:
        resolved = self.resolver.resolve(path)
        if resolved.condition != "ok" or resolved.absolute is None:
            return FileFact(path, resolved.condition, None, detail=resolved.detail)  # type: ignore[arg-type]
        real, absolute = resolved.real, resolved.absolute
        try:
            st = os.lstat(absolute)
        except FileNotFoundError:
            return FileFact(path, "missing", real)
        except NotADirectoryError:
            return FileFact(path, "not-regular", real, detail="a parent is not a directory")
        except OSError as exc:
            return FileFact(path, "error", real, detail=f"lstat: {exc.strerror}")
        if stat.S_ISLNK(st.st_mode):
            target = os.path.realpath(absolute)
            where = "inside" if _within(target, self.resolver.root) else "outside"
            return FileFact(path, "symlink", real, detail=f"points {where} the root")
        if not stat.S_ISREG(st.st_mode):
            return FileFact(path, "not-regular", real, detail="a directory or special file")
        mode = stat.S_IMODE(st.st_mode)
        sig = signature(st)
        if keyed:
            return self._keyed_fact(path, real, absolute, st, sig)
        cached = self._hashes.get(absolute)
        if cached is not None and cached[0] == sig:
            return FileFact(path, "regular", real, cached[1], mode, cached[2])
        if st.st_size > MAX_FILE_BYTES:
            # No bundle can ask for this content: it differs, and is never read into memory.
            return FileFact(
                path, "regular", real, f"size:{st.st_size}", mode, "", "larger than any bundle"
            )
        content = self._content(path, real, absolute)
        if isinstance(content, FileFact):
            return content
        sha = hashlib.sha256(content).hexdigest()
        digest = file_digest(content, mode)
        if self._clock() - st.st_mtime_ns / 1e9 > RACY_SECONDS:
            self._hashes[absolute] = (sig, sha, digest)
        else:
            self._hashes.pop(absolute, None)
        return FileFact(path, "regular", real, sha, mode, digest)

    def _keyed_fact(
        self, path: str, real: str | None, absolute: str, st: os.stat_result, sig: StatSignature
    ) -> FileFact:
        """A sealed resource's file: its keyed MAC, never an unkeyed hash of the content."""
        mode = stat.S_IMODE(st.st_mode)
        cached = self._macs.get(absolute)
        if cached is not None and cached[0] == sig:
            return FileFact(path, "regular", real, mode=mode, mac=cached[1])
        if st.st_size > MAX_FILE_BYTES or self._unsealer is None:
            return FileFact(path, "regular", real, mode=mode)
        content = self._content(path, real, absolute)
        if isinstance(content, FileFact):
            return content
        mac = self._unsealer.mac(content)
        if mac and self._clock() - st.st_mtime_ns / 1e9 > RACY_SECONDS:
            self._macs[absolute] = (sig, mac)
        else:
            self._macs.pop(absolute, None)
        return FileFact(path, "regular", real, mode=mode, mac=mac)

    def _content(self, path: str, real: str | None, absolute: str) -> bytes | FileFact:
        """The file's bytes, or the fact that says why they could not be read."""
        try:
            content = self._read(absolute)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return FileFact(path, "symlink", real, detail="became a symlink")
            return FileFact(path, "error", real, detail=f"read: {exc.strerror}")
        self.hashed += 1
        return content

    @staticmethod
    def _read(absolute: str) -> bytes:
        fd = os.open(absolute, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            chunks = []
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if sum(map(len, chunks)) > MAX_FILE_BYTES:
                    break
            return b"".join(chunks)
        finally:
            os.close(fd)

    # Settings.

    def settings_fact(self) -> SettingsFact:
        path = self.resolver.settings_path()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._settings = None
            return SettingsFact({}, readable=False)
        except OSError as exc:
            return SettingsFact({}, readable=False, detail=f"lstat: {exc.strerror}")
        sig = signature(st)
        if self._settings is not None and self._settings[0] == sig:
            return self._settings[1]
        fact = self._read_settings(path, st)
        if self._clock() - st.st_mtime_ns / 1e9 > RACY_SECONDS:
            self._settings = (sig, fact)
        else:
            self._settings = None
        return fact

    @staticmethod
    def _read_settings(path: str, st: os.stat_result) -> SettingsFact:
        if not stat.S_ISREG(st.st_mode):
            return SettingsFact({}, readable=False, detail="not a regular file")
        if st.st_size > MAX_SETTINGS_BYTES:
            return SettingsFact({}, readable=False, detail="too large")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as fh:
                raw = json.loads(fh.read(MAX_SETTINGS_BYTES + 1))
        except OSError as exc:
            return SettingsFact({}, readable=False, detail=f"read: {exc.strerror}")
        except ValueError:
            return SettingsFact({}, readable=False, detail="not valid JSON")
        if not isinstance(raw, dict):
            return SettingsFact({}, readable=False, detail="not a JSON object")
        values = {
            k: v for k, v in raw.items() if v is None or isinstance(v, str | int | float | bool)
        }
        return SettingsFact(values)

    # Commands.

    def command_fact(self, resource: CommandResource, *, check: bool) -> CommandFact:
        if self._policy.refuses_command(resource.check, resource.apply) is not None:
            return CommandFact(None, "not allowed here")
        key = bundles.resource_digest(resource)
        cached = self._checks.get(resource.id)
        if not check and cached is not None and cached[0] == key:
            return cached[1]
        if self._runner is None:
            return CommandFact(None, "no command runner")
        result = self._runner.run(resource.check, self._policy.timeout(resource.timeout))
        self.checks_run += 1
        fact = CommandFact(result.ok, "" if result.ok else f"check {result.describe()}")
        self._checks[resource.id] = (key, fact)
        return fact

    def record_check(self, resource: CommandResource, fact: CommandFact) -> None:
        """Remember a check result obtained elsewhere (the apply re-checks after running)."""
        self._checks[resource.id] = (bundles.resource_digest(resource), fact)

    # Everything at once.

    def observe(
        self,
        desired: Sequence[Resource],
        *,
        managed_files: Iterable[str] = (),
        managed_settings: Iterable[str] = (),
        check_commands: bool = False,
    ) -> Observed:
        files: dict[str, FileFact] = {}
        commands: dict[str, CommandFact] = {}
        wants_settings = bool(managed_settings)
        sealed_macs: dict[str, str] = {}
        for resource in desired:
            if isinstance(resource, FileResource):
                keyed = resource.sealed is not None
                files[resource.path] = self.file_fact(resource.path, keyed=keyed)
                if keyed:
                    sealed_macs[resource.id] = files[resource.path].mac
            elif isinstance(resource, CommandResource):
                commands[resource.id] = self.command_fact(resource, check=check_commands)
            else:
                wants_settings = True
        live = {r.id for r in desired if isinstance(r, CommandResource)}
        for stale in set(self._checks) - live:
            del self._checks[stale]
        if len(self._hashes) > len(files):
            wanted = {os.path.join(self.resolver.root, f.real) for f in files.values() if f.real}
            self._hashes = {k: v for k, v in self._hashes.items() if k in wanted}
        if len(self._macs) > len(sealed_macs):
            keep = {os.path.join(self.resolver.root, f.real) for f in files.values() if f.real}
            self._macs = {k: v for k, v in self._macs.items() if k in keep}
        settings = self.settings_fact() if wants_settings else SettingsFact()
        if self._unsealer is not None:
            sealed_macs.update(self._setting_macs(desired, settings))
        return Observed(
            files=files,
            settings=settings,
            commands=commands,
            managed_files=frozenset(managed_files),
            managed_settings=frozenset(managed_settings),
            sealed_macs=sealed_macs,
            ledger=self._unsealer.ledger() if sealed_macs and self._unsealer else {},
        )

    def refresh(
        self,
        previous: Observed,
        desired: Sequence[Resource],
        changed: Collection[str],
        *,
        managed_files: Iterable[str] = (),
        managed_settings: Iterable[str] = (),
    ) -> Observed:
        """``previous``, with the files and settings file in ``changed`` looked at again.

        ``previous`` must be an observation of the same ``desired``; paths it lacks are
        looked at too. Command facts come from the cache (checks stay on their interval).
        Sealed values are looked at through their keyed MAC, as :meth:`observe` does.
        """
        files: dict[str, FileFact] = {}
        commands: dict[str, CommandFact] = {}
        sealed_macs: dict[str, str] = {}
        wants_settings = False
        for resource in desired:
            if isinstance(resource, FileResource):
                keyed = resource.sealed is not None
                fact = previous.files.get(resource.path)
                if fact is None or resource.path in changed:
                    fact = self.file_fact(resource.path, keyed=keyed)
                files[resource.path] = fact
                if keyed:
                    sealed_macs[resource.id] = fact.mac
            elif isinstance(resource, CommandResource):
                commands[resource.id] = self.command_fact(resource, check=False)
            elif isinstance(resource, SettingResource):
                wants_settings = True
        managed_settings = frozenset(managed_settings)
        settings = previous.settings
        if (wants_settings or managed_settings) and SETTINGS_FILE in changed:
            settings = self.settings_fact()
        if self._unsealer is not None:
            sealed_macs.update(self._setting_macs(desired, settings))
        return replace(
            previous,
            files=files,
            settings=settings,
            commands=commands,
            managed_files=frozenset(managed_files),
            managed_settings=managed_settings,
            sealed_macs=sealed_macs,
            ledger=self._unsealer.ledger() if sealed_macs and self._unsealer else {},
        )

    def _setting_macs(self, desired: Sequence[Resource], settings: SettingsFact) -> dict[str, str]:
        """The keyed MAC of each sealed setting's current value ("" if absent or not text)."""
        assert self._unsealer is not None
        out: dict[str, str] = {}
        for resource in desired:
            if isinstance(resource, SettingResource) and resource.sealed is not None:
                value = settings.values.get(resource.key)
                ok = isinstance(value, str)
                out[resource.id] = self._unsealer.mac(setting_bytes(value)) if ok else ""  # type: ignore[arg-type]
        return out
