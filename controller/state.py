"""The controller's state directory: what it published, version floors, and a lock.

Layout::

    <state dir>/lock          held (flock) while a controller runs: one per state dir
    <state dir>/fleet.json    the fleet the state belongs to: repository, broker, prefix
    <state dir>/state.json    per target: version, content digest, commit, author, times,
                              and the digest of its bundle payload; version floors of
                              removed targets
    <state dir>/state.journal the entries that changed since state.json was written, one
                              JSON line per target, appended after each publication
    <state dir>/bundles/<sha256>   the bundle payloads (msgpack), content-addressed
    <state dir>/audit.jsonl   the audit log (see :mod:`audit`)
    <state dir>/mirror.git    the mirror of a remote repository (see :mod:`repository`)

``state.json`` is written atomically (temp file, fsync, ``os.replace``, fsync of the
directory) after the payloads it names. A save after a few publications appends their
entries to ``state.journal`` (one write, one fsync) instead of writing ``state.json``
whole: work proportional to what changed. The journal is folded into ``state.json`` (then
removed) by the first save of a run and once it holds as many lines as there are targets.
Loading replays it over ``state.json``, each target's last line winning: replaying it
again over a ``state.json`` that already holds it (a crash between the two steps of
folding) gives the same, and a line cut short by a crash is skipped. A payload lost in a
crash only costs the ability to restore that one bundle from here; its version floor is
kept, and the retained bundle on the broker gives it back. Losing the whole directory is
survivable too: the controller recovers versions and bundles from the broker's retained
topics.

A state directory belongs to one fleet: a fleet is its repository, its broker and its topic
prefix (:class:`FleetIdentity`). The default directory is one per fleet
(:func:`default_dir`), and a directory records its fleet in ``fleet.json`` on first use and
refuses any other (two fleets sharing one would stamp each other's commits on bundles,
share version floors and mix their audit logs).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from setpoint.kit.files import append_lines, write_atomic
from setpoint.proto import bundles
from setpoint.proto.errors import ProtocolError

from .errors import ConfigError
from .planning import Current
from .rendering import Target

log = logging.getLogger(__name__)

STATE_FILE: Final = "state.json"
JOURNAL_FILE: Final = "state.journal"
JOURNAL_MIN: Final = 1000  # lines before the journal is folded into state.json at least
INTENT_FILE: Final = "publishing.json"
BUNDLES_DIR: Final = "bundles"
LOCK_FILE: Final = "lock"
IDENTITY_FILE: Final = "fleet.json"
SCHEMA: Final = 1


@dataclass(frozen=True, slots=True)
class FleetIdentity:
    """What makes a fleet: its repository (an absolute path, or a URL without password),
    its broker (``mqtt://host:port``) and its topic prefix."""

    repository: str
    broker: str
    prefix: str

    def key(self) -> str:
        """A directory name for this fleet: readable, and unique by its digest."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", self.repository.rstrip("/").rsplit("/", 1)[-1])
        return f"{name.strip('.-')[:40] or 'fleet'}-{digest[:12]}"

    def __str__(self) -> str:
        return f"repository {self.repository}, broker {self.broker}, prefix {self.prefix}"


def default_dir(base: Path, identity: FleetIdentity) -> Path:
    """The default state directory of one fleet under ``base`` (one directory per fleet)."""
    return base / identity.key()


@dataclass(frozen=True, slots=True)
class Intent:
    """A publication about to be made (see :meth:`StateStore.intend`)."""

    version: int
    content_digest: str
    author: str
    branch: str | None


class StateStore:
    """Load and save what the controller published, under an exclusive lock."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock_fd: int | None = None
        # Per bundle object saved, the digest of its stored payload (the object is kept, so
        # its id is not reused): a save encodes only the bundles that changed since.
        # Per target, the entry last saved and its lines of state.json: a save encodes and
        # hashes only what changed (work proportional to what changed).
        self._saved: dict[Target, tuple[Current, str, str]] = {}
        self._floor_lines: dict[Target, tuple[int, str]] = {}
        self._files: set[str] | None = None  # bundle payloads on disk (None: not listed yet)
        self._journal: int | None = None  # lines in state.journal (None: not folded yet)

    # --- Lock -----------------------------------------------------------------------

    def lock(self) -> None:
        """Create the directory (0700) and take its lock, or refuse if another holds it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            # A directory made by someone else (systemd's StateDirectory= makes it 0755)
            # would show the mirror and the published bundles to every local account.
            self.directory.chmod(0o700)
            (self.directory / BUNDLES_DIR).mkdir(exist_ok=True, mode=0o700)
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"state directory {self.directory}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"state directory {self.directory} is in use by another controller; give each"
                " controller its own --state-dir"
            ) from None
        self._lock_fd = fd

    def claim(self, identity: FleetIdentity) -> None:
        """Record ``identity`` in a new state directory, or refuse one of another fleet."""
        path = self.directory / IDENTITY_FILE
        try:
            raw = json.loads(path.read_bytes())
            recorded = FleetIdentity(**{k: str(raw[k]) for k in ("repository", "broker", "prefix")})
        except FileNotFoundError:
            write_atomic(path, json.dumps(asdict(identity), indent=1).encode("utf-8") + b"\n")
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"state directory {self.directory}: {IDENTITY_FILE} is unreadable ({exc});"
                " give this controller its own --state-dir"
            ) from exc
        if recorded != identity:
            raise ConfigError(
                f"state directory {self.directory} belongs to another fleet ({recorded}), not"
                f" this one ({identity}): give this controller its own --state-dir (without"
                " --state-dir and SETPOINT_STATE_DIR each fleet gets its own directory). If"
                " this is the same fleet at a new address, move"
                f" {self.directory / IDENTITY_FILE} aside to keep its versions and history"
            )

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- Load / save ----------------------------------------------------------------

    def load(self) -> tuple[dict[Target, Current], dict[Target, int]]:
        """What was published (with its bundles) and the version floor of every target."""
        path = self.directory / STATE_FILE
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}, {}
        except (OSError, ValueError) as exc:
            log.warning("state file %s is unreadable (%s); starting from the broker", path, exc)
            return {}, {}
        current: dict[Target, Current] = {}
        floors: dict[Target, int] = {}
        try:
            for key, version in raw.get("floors", {}).items():
                floors[Target.parse(key)] = int(version)
            for key, entry in raw.get("targets", {}).items():
                target = Target.parse(key)
                floors[target] = max(floors.get(target, 0), int(entry["version"]))
                loaded = self._load_current(target, entry)
                if loaded is not None:
                    current[target] = loaded
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("state file %s is malformed (%s); starting from the broker", path, exc)
            return {}, floors
        for key, (entry, floor) in self._journaled().items():
            try:
                target = Target.parse(key)
                if floor is not None:
                    floors[target] = max(floors.get(target, 0), int(floor))
                current.pop(target, None)
                if entry is not None:
                    floors[target] = max(floors.get(target, 0), int(entry["version"]))
                    loaded = self._load_current(target, entry)
                    if loaded is not None:
                        current[target] = loaded
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("%s: the line of %s is malformed (%s); ignored", JOURNAL_FILE, key, exc)
        return current, floors

    def _journaled(self) -> dict[str, tuple[Any, Any]]:
        """Per target, the last line of the journal about it: its entry (None: removed)
        and its version floor. A line cut short (a crash while appending) is skipped."""
        path = self.directory / JOURNAL_FILE
        try:
            text = path.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("%s is unreadable (%s); ignored", path, exc)
            return {}
        last: dict[str, tuple[Any, Any]] = {}
        for line in text.splitlines():
            try:
                record = json.loads(line)
                last[str(record["target"])] = (record.get("entry"), record.get("floor"))
            except (ValueError, KeyError, TypeError):
                log.warning("%s: a line cut short or malformed is skipped", path)
        return last

    def _load_current(self, target: Target, entry: Mapping[str, Any]) -> Current | None:
        digest = str(entry["payload"])
        path = self.directory / BUNDLES_DIR / digest
        try:
            payload = path.read_bytes()
            if hashlib.sha256(payload).hexdigest() != digest:
                raise ValueError("digest mismatch")
            bundle = bundles.decode(payload)
        except (OSError, ValueError, ProtocolError) as exc:
            log.warning(
                "stored bundle of %s is unusable (%s); the broker's copy is used", target, exc
            )
            return None
        if bundle.kind != target.kind or bundle.target != target.id:
            log.warning("stored bundle of %s names another target; ignored", target)
            return None
        return Current(
            bundle,
            str(entry.get("author", "")),
            entry.get("branch"),
            float(entry.get("published_at", 0.0)),
        )

    # --- Write-ahead of publications --------------------------------------------------

    @staticmethod
    def _entry_line(bundles_dir: Path, target: Target, entry: Current) -> tuple[Current, str, str]:
        """``entry``'s payload written (if new) and its fields (JSON), the value of its
        line in state.json and in the journal."""
        bundle = entry.bundle
        payload = bundles.encode(bundle)
        digest = hashlib.sha256(payload).hexdigest()
        path = bundles_dir / digest
        if not path.exists():
            write_atomic(path, payload, sync=False)
        fields = {
            "version": bundle.version,
            "content_digest": entry.content_digest,
            "commit": bundle.commit,
            "author": entry.author,
            "branch": entry.branch,
            "issued_at": bundle.issued_at,
            "expires_at": bundle.expires_at,
            "published_at": entry.published_at,
            "payload": digest,
        }
        return entry, digest, json.dumps(fields, sort_keys=True)

    def intend(self, intents: Mapping[Target, Intent]) -> None:
        """Record the publications about to be made, before the first PUBLISH: a
        controller killed between the broker's PUBACK and :meth:`save` finds them at its
        next start, and announces what it adopts from the broker as published (event and
        audit) instead of as a silent take-over."""
        document = {
            str(t): {
                "version": i.version,
                "content_digest": i.content_digest,
                "author": i.author,
                "branch": i.branch,
            }
            for t, i in sorted(intents.items())
        }
        write_atomic(self.directory / INTENT_FILE, json.dumps(document, sort_keys=True).encode())

    def intents(self) -> dict[Target, Intent]:
        """The publications recorded by :meth:`intend` and not yet saved (none if unreadable)."""
        try:
            raw = json.loads((self.directory / INTENT_FILE).read_bytes())
            return {
                Target.parse(k): Intent(
                    int(v["version"]), str(v["content_digest"]), str(v["author"]), v["branch"]
                )
                for k, v in raw.items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s is unreadable (%s); ignored", INTENT_FILE, exc)
            return {}

    def save(
        self,
        current: Mapping[Target, Current],
        floors: Mapping[Target, int],
        changed: Collection[Target] | None = None,
    ) -> None:
        """Record ``current`` and ``floors``: ``changed``, the only targets whose entry or
        floor moved since the last save, are appended to the journal (their payloads
        written first, the payloads they replace removed after); otherwise (None, the
        first save of a run, or a journal as long as the fleet) everything is written to
        ``state.json``, the journal is removed, unreferenced payloads are dropped."""
        bundles_dir = self.directory / BUNDLES_DIR
        limit = max(JOURNAL_MIN, len(current))
        if changed is not None and self._journal is not None and self._journal < limit:
            self._append(bundles_dir, current, floors, changed)
            return
        self._fold(current, floors)

    def _append(
        self,
        bundles_dir: Path,
        current: Mapping[Target, Current],
        floors: Mapping[Target, int],
        changed: Collection[Target],
    ) -> None:
        assert self._files is not None and self._journal is not None
        lines: list[str] = []
        replaced: list[str] = []
        for target in sorted(changed):
            entry = current.get(target)
            before = self._saved.pop(target, None)
            fields = "null"
            if entry is not None:
                known = before
                if known is None or known[0] is not entry:
                    known = self._entry_line(bundles_dir, target, entry)
                self._saved[target] = known
                self._files.add(known[1])
                fields = known[2]
            if before is not None and (entry is None or before[1] != self._saved[target][1]):
                replaced.append(before[1])
            floor = floors.get(target)
            if floor is None:
                self._floor_lines.pop(target, None)
            else:
                self._floor_lines[target] = (floor, f"{json.dumps(str(target))}: {floor}")
            key = json.dumps(str(target))
            lines.append(f'{{"target": {key}, "entry": {fields}, "floor": {json.dumps(floor)}}}')
        if lines:
            append_lines(self.directory / JOURNAL_FILE, lines)
            self._journal += len(lines)
        for stale in replaced:  # a payload names its target: no other entry refers to it
            self._files.discard(stale)
            (bundles_dir / stale).unlink(missing_ok=True)
        (self.directory / INTENT_FILE).unlink(missing_ok=True)  # all of it is recorded now

    def _fold(self, current: Mapping[Target, Current], floors: Mapping[Target, int]) -> None:
        """Write the payloads, then ``state.json`` atomically, then remove the journal;
        drop unreferenced payloads. Only the entries that changed since the last save are
        encoded (their bundle, their line); the file is then the saved lines joined."""
        bundles_dir = self.directory / BUNDLES_DIR
        saved: dict[Target, tuple[Current, str, str]] = {}
        keep: set[str] = set()
        for target, entry in current.items():
            known = self._saved.get(target)
            if known is None or known[0] is not entry:
                known = self._entry_line(bundles_dir, target, entry)
            saved[target] = known
            keep.add(known[1])
        floor_lines: dict[Target, tuple[int, str]] = {}
        for target, version in floors.items():
            line = self._floor_lines.get(target)
            if line is None or line[0] != version:
                line = (version, f"{json.dumps(str(target))}: {version}")
            floor_lines[target] = line
        text = (
            f'{{"schema": {SCHEMA},\n"targets": {{\n'
            + ",\n".join(f"{json.dumps(str(t))}: {line}" for t, (_e, _d, line) in saved.items())
            + '\n},\n"floors": {\n'
            + ",\n".join(line for _v, line in floor_lines.values())
            + "\n}}\n"
        )
        write_atomic(self.directory / STATE_FILE, text.encode("utf-8"))
        (self.directory / JOURNAL_FILE).unlink(missing_ok=True)  # state.json holds it all
        self._journal = 0
        self._saved, self._floor_lines = saved, floor_lines
        if self._files is None:
            self._files = {f.name for f in bundles_dir.iterdir() if not f.name.startswith(".")}
        for stale in self._files - keep:
            (bundles_dir / stale).unlink(missing_ok=True)
        self._files = keep
        (self.directory / INTENT_FILE).unlink(missing_ok=True)  # all of it is recorded now
