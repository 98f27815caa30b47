"""Unauthenticated clients against the webhook of the real ``setpoint controller``: many
connections that declare large bodies, and many that say nothing at all. Neither may cost
the controller memory or file descriptors beyond a small cap."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import LiveController, commit
from shimkit import wait_for

from setpoint.controller.pki import Pki
from setpoint.mosquitto import SecureBroker, free_port

pytestmark = pytest.mark.broker

DECLARED = 4 * 1024 * 1024  # the body size each attacker connection announces


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Hook(LiveController):
    """The controller with its webhook on a loopback port, settled on its first commit."""

    def __init__(self, broker: SecureBroker, pki: Pki, tmp: Path) -> None:
        (tmp / "hook.secret").write_text("s3cret\n")
        self.port = free_port()
        super().__init__(
            broker, pki, tmp, "--webhook-listen", f"127.0.0.1:{self.port}",
            "--webhook-secret-file", str(tmp / "hook.secret"),
        )  # fmt: skip
        wait_for(self._listening, 30, "the webhook listening")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), 1).close()
        except OSError:
            return False
        return True


@pytest.fixture
def hook(secure_broker: SecureBroker, pki: Pki, tmp_path: Path) -> Iterator[Hook]:
    h = Hook(secure_broker, pki, tmp_path)
    yield h
    h.close()


def _open(port: int, count: int, head: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), 10)
        if head:
            s.sendall(head)
        socks.append(s)
    return socks


def _turned_away(socks: list[socket.socket], timeout: float = 30) -> int:
    """How many of ``socks`` the server answered 503 (busy) within ``timeout``."""
    done: set[socket.socket] = set()
    with selectors.DefaultSelector() as sel:
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)

        def poll() -> bool:
            for key, _ in sel.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except (ConnectionError, BlockingIOError):
                    data = b""
                if data.startswith(b"HTTP/1.1 503"):
                    done.add(sock)  # turned away at once: the server kept no descriptor
                sel.unregister(sock)
            return False

        with contextlib.suppress(AssertionError):
            wait_for(lambda: poll() or len(done) >= len(socks) - 32, timeout, "answers")
    return len(done)


def test_webhook_connections_declaring_large_bodies_cost_no_memory(hook: Hook) -> None:
    before = hook.rss_mib()
    head = (
        f"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: {DECLARED}\r\n"
        "X-Hub-Signature-256: sha256=00\r\n\r\n"
    ).encode()
    socks = _open(hook.port, 100, head)
    try:
        body = b"\0" * (1 << 20)
        for s in socks:
            try:
                for _ in range(3):  # 3 MiB of the declared 4: the request stays open
                    s.sendall(body)
            except OSError:
                pass  # over the cap: answered 503 and closed
        grown = hook.rss_mib() - before
    finally:
        for s in socks:
            s.close()
    assert grown < 50, f"the controller grew by {grown:.0f} MiB for unauthenticated bodies"


def test_idle_webhook_connections_cannot_use_up_descriptors(hook: Hook) -> None:
    before = _fds(hook.proc.pid)
    socks = _open(hook.port, 400, b"")
    try:
        answered = _turned_away(socks)
        held = _fds(hook.proc.pid) - before
        assert answered >= 400 - 32, f"only {answered} of 400 over the cap were turned away"
        assert held <= 40, f"the controller holds {held} more descriptors for idle clients"
        # Meanwhile the controller does its job: a commit goes out while they are held.
        commit(hook.repo, "two")
        hook.wait_motd(b"two")
    finally:
        for s in socks:
            s.close()


def test_webhook_listen_without_a_host_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "setpoint", "controller", "--repo", str(tmp_path),
         "--broker", "mqtt://127.0.0.1:1", "--key", str(tmp_path / "k"),
         "--webhook-listen", ":8780"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "127.0.0.1:8780 (this machine only) or 0.0.0.0:8780 (every interface)" in (result.stderr)
