"""Start a private mosquitto from the project's configuration, on a free loopback port.

Tests, ``setpoint demo`` and the benchmarks use this; setpoint never relies on a broker the
machine happens to run. ``Broker`` is a context manager::

    with Broker() as broker:
        print(broker.url)        # mqtt://127.0.0.1:PORT
        broker.kill()            # SIGKILL, as a power cut would
        broker.start()           # same port, same data directory
        broker.wipe()            # lose the persisted retained messages (broker stopped)
        with broker.stalled():   # SIGSTOP: open sockets, nothing read or answered

``python -m setpoint.mosquitto.broker`` runs one in the foreground and prints its URL.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

INSTALL_HINT = (
    "mosquitto is not installed. Install it with:\n"
    "    sudo apt-get install -y mosquitto mosquitto-clients\n"
    "(`make demo` and `make test` do this themselves when run as root.)"
)

SEARCH_PATH = ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/usr/local/bin")


class BrokerError(RuntimeError):
    """The private broker could not be started or stopped."""


class BrokerNotInstalled(BrokerError):
    """No ``mosquitto`` binary on this machine; the message says how to install it."""

    def __init__(self) -> None:
        super().__init__(INSTALL_HINT)


def find_mosquitto() -> str:
    """The path of the ``mosquitto`` binary (``$SETPOINT_MOSQUITTO`` wins), or raise."""
    return find_program("mosquitto", "SETPOINT_MOSQUITTO", BrokerNotInstalled, BrokerError)


def find_program(
    name: str,
    variable: str,
    missing: Callable[[], Exception],
    error: Callable[[str], Exception],
) -> str:
    """The path of the program ``name`` (``$variable`` wins, then ``PATH``, then the sbin
    folders a Debian package uses), else raise ``missing()``."""
    explicit = os.environ.get(variable)
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise error(f"{variable}={explicit} is not an executable file")
    found = shutil.which(name)
    if found:
        return found
    for directory in SEARCH_PATH:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    raise missing()


def end_process(proc: subprocess.Popen[Any] | None, *, timeout: float = 10.0, hard: bool) -> None:
    """SIGKILL (``hard``) or SIGTERM then, after ``timeout``, SIGKILL; reap it and close
    its stderr pipe."""
    if proc is None:
        return
    if proc.poll() is None:
        if hard:
            proc.kill()
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def config_template(name: str = "setpoint.conf", *, package: str | None = None) -> str:
    """The text of a configuration shipped in this package (or in ``package``)."""
    source = package or __package__ or "setpoint.mosquitto"
    return resources.files(source).joinpath(name).read_text(encoding="utf-8")


def render(template: str, values: Mapping[str, object]) -> str:
    """Replace ``@KEY@`` placeholders; an unknown placeholder left behind is an error."""
    text = template
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    leftover = [line for line in text.splitlines() if "@" in line and not line.startswith("#")]
    if leftover:
        raise BrokerError(f"configuration placeholders left unfilled: {leftover}")
    return text


def tail(log: Path, lines: int) -> str:
    """The last ``lines`` lines of the server log ``log`` (``(no log written)`` if none)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


class ClosedOnExit:
    """A private server (or cluster of them) as a context manager: ``__enter__`` starts it
    (each its own way), the end of the ``with`` block calls :meth:`close`."""

    def close(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Broker(ClosedOnExit):
    """One private mosquitto process: its port, data directory, log and lifecycle."""

    host = "127.0.0.1"

    def __init__(
        self,
        directory: Path | str | None = None,
        *,
        port: int | None = None,
        template: str = "setpoint.conf",
        autosave_changes: int = 1,
        extra: Mapping[str, object] | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="setpoint-broker-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binary = find_mosquitto()
        self.port = port or free_port(self.host)
        self.startup_timeout = startup_timeout
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        self.db = self.dir / "mosquitto.db"
        values: dict[str, object] = {
            "PORT": self.port,
            "DATADIR": self.dir,
            "AUTOSAVE": autosave_changes,
            "USER": getpass.getuser(),
            **(extra or {}),
        }
        self.conf.write_text(render(config_template(template), values), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Broker:
        """Start mosquitto and return once it accepts TCP connections."""
        if self.running:
            return self
        # stderr goes to a file, not a pipe: a pipe nobody reads while the broker runs
        # would stop mosquitto the moment it wrote more than the pipe holds.
        errors = self.dir / "stderr.log"
        with errors.open("wb") as sink:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=sink,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                stderr = errors.read_text(encoding="utf-8", errors="replace")
                self.proc = None
                raise BrokerError(
                    f"mosquitto exited at start (port {self.port}): "
                    f"{stderr.strip() or self.tail_log()}"
                )
            if self._accepts():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"mosquitto did not accept connections on {self.url} within "
                    f"{self.startup_timeout:.0f}s: {self.tail_log()}"
                )
            time.sleep(0.005)

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.2)
            return probe.connect_ex((self.host, self.port)) == 0

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM): mosquitto writes its database and exits."""
        end_process(self.proc, timeout=timeout, hard=False)
        self.proc = None

    def kill(self) -> None:
        """Kill hard (SIGKILL): nothing is flushed, as on a crash or a power cut."""
        end_process(self.proc, hard=True)
        self.proc = None

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        """The broker process stopped (SIGSTOP) for the ``with`` block: it neither reads
        nor answers, yet its sockets stay open, as a broker stuck on a disk would."""
        assert self.proc is not None, "the broker is not running"
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> Broker:
        """Stop cleanly and start again on the same port with the same data."""
        self.stop()
        return self.start()

    def wipe(self) -> None:
        """Forget every persisted message and subscription (only while stopped)."""
        if self.running:
            raise BrokerError("wipe() needs the broker stopped")
        self.db.unlink(missing_ok=True)

    def tail_log(self, lines: int = 20) -> str:
        return tail(self.log, lines)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self.start()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Broker {self.url} {state} dir={self.dir}>"


CONTROLLER_IDENTITY = "setpoint:controller"  # the CNs `setpoint pki init` issues
OPERATOR_IDENTITY = "setpoint:operator"


class SecureBroker(Broker):
    """A private mosquitto from ``secure.conf``: mutual TLS with the certificates of a PKI
    directory made by ``setpoint pki init`` (``ca.pem``, ``broker.pem``, ``broker.key``,
    ``crl.pem``) and the ACL of ``secure.acl`` for topic prefix ``prefix``::

        with SecureBroker(tmp / "broker", pki_dir) as broker:
            broker.url        # mqtts://127.0.0.1:PORT
            broker.reload()   # SIGHUP: re-read the ACL and the CRL after `pki revoke`
    """

    def __init__(
        self,
        directory: Path | str | None = None,
        pki_dir: Path | str | None = None,
        *,
        prefix: str = "setpoint/v1",
        template: str = "secure.conf",
        acl_template: str = "secure.acl",
        extra: Mapping[str, object] | None = None,
        **kw: object,
    ) -> None:
        if pki_dir is None:
            raise BrokerError("SecureBroker needs pki_dir (make one with `setpoint pki init`)")
        self.pki_dir = Path(pki_dir)
        files = {
            "CAFILE": self.pki_dir / "ca.pem",
            "CERTFILE": self.pki_dir / "broker.pem",
            "KEYFILE": self.pki_dir / "broker.key",
            "CRLFILE": self.pki_dir / "crl.pem",
        }
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise BrokerError(f"PKI files missing: {missing}; run `setpoint pki init {pki_dir}`")
        self.prefix = prefix
        super().__init__(directory, template=template, extra={**files, **(extra or {})}, **kw)  # type: ignore[arg-type]
        self.acl = self.dir / "setpoint.acl"
        acl = render(
            config_template(acl_template),
            {"PREFIX": prefix, "CONTROLLER": CONTROLLER_IDENTITY, "OPERATOR": OPERATOR_IDENTITY},
        )
        self.acl.write_text(acl, encoding="utf-8")

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its ACL file (and, per listener, the CRL)."""
        if self.proc is None or self.proc.poll() is not None:
            raise BrokerError("reload() needs the broker running")
        self.proc.send_signal(signal.SIGHUP)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM, SIGINT or SIGHUP. The servers these harnesses start run in
    sessions of their own (no terminal signal reaches them), so the foreground process must
    stop them on SIGTERM as it does on Ctrl-C."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    return stop


class Closable(Protocol):
    def close(self) -> None: ...


S = TypeVar("S", bound=Closable)


def serve_in_foreground(
    start: Callable[[], S],
    error: type[Exception],
    url: Callable[[S], str],
    running: Callable[[S], bool],
) -> int:
    """A ``python -m`` harness's main loop: ``start()`` the server, print its ``url``, and
    close it once ``running`` says it stopped or a signal came (:func:`stop_on_signals`).
    Returns 0, or 2 (with the message on stderr) if ``start`` raised ``error``."""
    stop = stop_on_signals()
    try:
        server = start()
    except error as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        print(url(server), flush=True)
        while running(server) and not stop.wait(0.5):
            pass
    finally:
        server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m setpoint.mosquitto.broker",
        description="Run setpoint's private mosquitto in the foreground until Ctrl-C or"
        " SIGTERM (both stop mosquitto too).",
    )
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--dir", type=Path, default=None, help="data directory (default: temp)")
    parser.add_argument(
        "--config",
        choices=("setpoint.conf", "large-fleet.conf"),
        default="setpoint.conf",
        help="the shipped configuration to start from: setpoint.conf saves the retained"
        " database after every change, large-fleet.conf once a second (docs/performance.md)",
    )
    args = parser.parse_args(argv)
    return serve_in_foreground(
        lambda: Broker(args.dir, port=args.port, template=args.config).start(),
        BrokerError,
        lambda broker: broker.url,
        lambda broker: broker.running,
    )


if __name__ == "__main__":
    sys.exit(main())
