"""Running a command resource's check or apply: ``/bin/sh -c``, a timeout, short output.

Each command runs in its own session (process group) with stdin closed, in the device
root, with a small environment: ``PATH``, ``HOME``, ``LANG``, ``TZ`` from the shim's own,
plus ``SETPOINT_DEVICE``, ``SETPOINT_ROOT`` and ``SETPOINT_SETTINGS``. Nothing else is
passed on (the shim's environment may hold the MQTT password). Output goes to an
anonymous temporary file, never to memory, and only its tail is kept, so a chatty or
runaway command cannot exhaust a small device. On timeout, or when the shim stops, the
whole process group is killed.

This module does I/O (processes); it decides nothing about whether a command may run:
that is :class:`~setpoint.device_shim.config.DevicePolicy`'s job, checked by the planner
and again by the executor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

MAX_OUTPUT: Final = 400
_TAIL_BYTES: Final = 4096
_PASSED_ENV: Final = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
_DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class CommandResult:
    returncode: int | None  # None: killed (timeout or shutdown)
    output: str  # the tail of stdout and stderr together
    timed_out: bool = False
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.timed_out:
            head = f"timed out after {self.duration:.0f}s"
        elif self.returncode is None:
            head = "killed (the shim is stopping)"
        else:
            head = f"exit {self.returncode}"
        return f"{head}: {self.output}" if self.output else head


def _tail(text: str, limit: int) -> str:
    text = " ".join(text.split())  # one line: reports and logs stay readable
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


class CommandRunner:
    """Runs shell commands one at a time; :meth:`stop` kills the current one."""

    def __init__(
        self, cwd: Path, extra_env: Mapping[str, str], *, max_output: int = MAX_OUTPUT
    ) -> None:
        self._cwd = cwd
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        env.setdefault("PATH", _DEFAULT_PATH)
        env.update(extra_env)
        self._env = env
        self._max_output = max_output
        self._lock = threading.Lock()
        self._current: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def run(self, command: str, timeout: float) -> CommandResult:
        started = time.monotonic()
        with tempfile.TemporaryFile() as out:
            with self._lock:
                if self._stopped:
                    return CommandResult(None, "not started: the shim is stopping")
                try:
                    proc = subprocess.Popen(
                        ["/bin/sh", "-c", command],
                        cwd=self._cwd,
                        env=self._env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        close_fds=True,
                    )
                except OSError as exc:
                    return CommandResult(127, f"cannot start /bin/sh: {exc.strerror}")
                self._current = proc
            timed_out = False
            try:
                returncode: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                self._kill(proc)
                returncode = None
            finally:
                with self._lock:
                    self._current = None
            if returncode is not None and returncode < 0:
                returncode = None  # killed by a signal (our stop(), or someone else's)
            out.seek(0, os.SEEK_END)
            size = out.tell()
            out.seek(max(0, size - _TAIL_BYTES))
            text = out.read().decode("utf-8", errors="replace")
        return CommandResult(
            returncode,
            _tail(text, self._max_output),
            timed_out,
            time.monotonic() - started,
        )

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """Kill the running command (if any) and refuse to start new ones."""
        with self._lock:
            self._stopped = True
            proc = self._current
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
