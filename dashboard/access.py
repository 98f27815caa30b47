"""Who may see the dashboard: where it listens, and the token that lets a browser in.

Safe by default: it listens on loopback. A non-loopback ``--listen`` is refused unless the
dashboard asks for a token (``--token-file``: a bearer token, or the login form that sets a
cookie) or serves mutual TLS (``--tls-cert``/``--tls-key`` with ``--tls-client-ca``), so
the fleet's state is never on the network for anyone who asks. Tokens are compared in
constant time.

Pure; no I/O but :func:`read_token`.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

MIN_TOKEN: Final = 16
COOKIE: Final = "setpoint_dashboard"


class AccessError(ValueError):
    """A refused listen address or token file; the message says what to pass instead."""


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: we cannot tell where it resolves, so not loopback

    def url(self, tls: bool = False) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if tls else 'http'}://{host}:{self.port}/"


def parse_listen(text: str) -> Listen:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise AccessError(f"--listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
    return Listen(host, int(port))


def check_listen(listen: Listen, *, token: bool, mutual_tls: bool) -> None:
    """Refuse to serve the fleet off loopback to whoever connects."""
    if listen.loopback or token or mutual_tls:
        return
    raise AccessError(
        f"--listen {listen.host}:{listen.port} is not a loopback address: anyone who can reach"
        " it would see the fleet. Pass --token-file FILE (a bearer token or the login form),"
        " or serve mutual TLS (--tls-cert, --tls-key and --tls-client-ca), or listen on"
        " 127.0.0.1"
    )


def read_token(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace dropped); at least 16 characters."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AccessError(f"--token-file {path}: {exc}") from None
    if len(token) < MIN_TOKEN:
        raise AccessError(
            f"--token-file {path}: the token has {len(token)} characters, use at least"
            f" {MIN_TOKEN} (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def token_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison (no early exit on the first differing byte)."""
    if given is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, if that is what it is."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
