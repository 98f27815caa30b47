"""A DNS server on loopback for tests of ``mqtt+srv://``: real DNS over UDP, on 127.0.0.1.

:class:`DnsServer` answers SRV queries from a table the test sets (``zone[name] = [(priority,
weight, port, target), ...]``; a name not in the table is NXDOMAIN; a name mapped to ``[]``
exists with no SRV records) and counts the queries it was asked. Messages are parsed and
built with dnspython. Point ``setpoint`` at it with ``SETPOINT_DNS_SERVER=127.0.0.1:PORT``
(:attr:`DnsServer.env`).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self) -> None:
        self.zone: dict[str, list[tuple[int, int, int, str]]] = {}
        self.queries: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"SETPOINT_DNS_SERVER": self.address}

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            self.queries.append(name)
            records = self.zone.get(name)
            if records is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif records and question.rdtype == dns.rdatatype.SRV:
                texts = [f"{p} {w} {port} {target}" for p, w, port, target in records]
                response.answer.append(
                    dns.rrset.from_text_list(question.name, 60, "IN", "SRV", texts)
                )
            self._sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@contextmanager
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    try:
        yield server
    finally:
        server.close()


@contextmanager
def silent_resolver() -> Iterator[str]:
    """A UDP port on loopback that takes queries and never answers: ``IP:PORT``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
