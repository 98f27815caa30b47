"""Writing files so that a crash leaves the old or the new content, never a mix.

:func:`write_atomic` writes a temporary file next to the target (opened with
``O_NOFOLLOW``: a symlink planted there is refused, not followed), gives it its mode from
the start, fsyncs it, renames it over the target and fsyncs the directory.
:func:`append_lines` appends whole lines with one fsync (an audit log).

Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(directory: Path) -> None:
    """Make a rename or creation in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``) so that a reader sees the old or
    the new file, whole. ``sync=False`` skips the fsyncs (content-addressed files whose
    loss a later fsync'd write would notice)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, _CREATE | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # whatever the umask: the mode from the start
            fh.write(data)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(path.parent)


def append_lines(path: Path, lines: Iterable[str], *, mode: int = 0o600) -> None:
    """Append ``lines`` (each gets a newline) to ``path`` with one write and one fsync."""
    text = "".join(line + "\n" for line in lines)
    if not text:
        return
    fd = os.open(path, _CREATE | os.O_APPEND, mode)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
