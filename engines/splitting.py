"""A network split between NATS nodes on loopback, without root: every route connection of
a cluster goes through a small TCP relay that can cut one node off from the others.

Each node's cluster port gets a relay port in front of it; the nodes' ``routes`` name the
relay ports, and each node *advertises* its relay port (``cluster { advertise }``), so the
routes the nodes learn from each other's gossip go through the relays too. A route is a TCP
connection between two servers; each sends an ``INFO`` with its ``server_name`` first, so a
relay learns which two nodes a connection joins from its first bytes. ``cut("n1")`` closes
every route connection that has n1 at either end and refuses new ones until ``heal("n1")``;
n1 keeps running and keeps its clients (the split a client of n1 sees: a live node that
lost its cluster). MQTT and monitoring ports are not relayed.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable

NAME = re.compile(rb'"server_name":"([^"]+)"')
SNIFF = 64 * 1024  # bytes of each direction read for a server_name before giving up


class _Link:
    """One relayed connection: the server that dialled (``source``, once its INFO is seen)
    and the node behind the relay port (``target``)."""

    def __init__(self, outer: socket.socket, inner: socket.socket, target: str) -> None:
        self.outer, self.inner, self.target = outer, inner, target
        self.source: str | None = None
        self.closed = threading.Event()

    def ends(self) -> set[str]:
        return {self.target} | ({self.source} if self.source else set())

    def close(self) -> None:
        self.closed.set()
        for sock in (self.outer, self.inner):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class RouteSplitter:
    """Relays for the route ports of named nodes; :meth:`cut` and :meth:`heal` one node."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._lock = threading.Lock()
        self._cut: set[str] = set()
        self._links: list[_Link] = []
        self._listeners: list[socket.socket] = []
        self._stop = threading.Event()

    def relay(self, name: str, port: int, target: Callable[[], int]) -> None:
        """Listen on ``port`` and relay each connection to the node ``name`` on the port
        ``target()`` gives at that moment (a node may get new ports when restarted)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, port))
        listener.listen(16)
        self._listeners.append(listener)
        threading.Thread(
            target=self._accept, args=(listener, name, target), name=f"relay-{name}", daemon=True
        ).start()

    def cut(self, name: str) -> None:
        """Close every route of ``name`` and refuse its new ones."""
        with self._lock:
            self._cut.add(name)
            doomed = [link for link in self._links if name in link.ends()]
        for link in doomed:
            link.close()

    def heal(self, name: str) -> None:
        with self._lock:
            self._cut.discard(name)

    def routes_of(self, name: str) -> int:
        """How many relayed connections with ``name`` at one end are open now."""
        with self._lock:
            live = [link for link in self._links if not link.closed.is_set()]
            return sum(1 for link in live if name in link.ends())

    def close(self) -> None:
        self._stop.set()
        for listener in self._listeners:
            listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def _accept(self, listener: socket.socket, name: str, target: Callable[[], int]) -> None:
        while not self._stop.is_set():
            try:
                outer, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                refused = name in self._cut
            if refused:
                outer.close()
                continue
            try:
                inner = socket.create_connection((self.host, target()), timeout=5)
            except OSError:
                outer.close()
                continue
            inner.settimeout(None)
            link = _Link(outer, inner, name)
            with self._lock:
                self._links = [k for k in self._links if not k.closed.is_set()] + [link]
            for src, dst, sniff in ((outer, inner, True), (inner, outer, False)):
                threading.Thread(
                    target=self._pump, args=(link, src, dst, sniff), daemon=True
                ).start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, sniff: bool) -> None:
        seen = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if sniff and link.source is None and len(seen) < SNIFF:
                    seen += data
                    found = NAME.search(seen)
                    if found:
                        link.source = found.group(1).decode(errors="replace")
                        with self._lock:
                            refused = link.source in self._cut
                        if refused:
                            break
                dst.sendall(data)
        except OSError:
            pass
        link.close()
