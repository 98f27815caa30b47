"""The webhook endpoint: git hosts (and ``setpoint notify``) tell the controller to fetch.

A deliberately small HTTP/1.1 server on asyncio streams: ``POST`` only, bounded headers
and body, one request per connection. A request is accepted when it is signed with the
shared secret, in any of the forms the usual hosts send:

* ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`` (GitHub, Gitea, Forgejo,
  Gogs, Bitbucket Server, ``setpoint notify``);
* ``X-Gitea-Signature`` / ``X-Gogs-Signature: <hex HMAC-SHA256>``;
* ``X-Gitlab-Token: <the secret itself>`` (GitLab sends the token, not an HMAC).

The body is not trusted for anything: any accepted request (a push of any branch, a
``ping``, an empty body) only wakes the level-triggered reconcile loop, which fetches and
looks at every branch itself. So a forged payload cannot steer it, and a lost or repeated
delivery does not matter.

Nobody unauthenticated may cost the controller much: at most ``MAX_CONNECTIONS`` requests
are served at once (one more is answered 503 and closed at once, so held connections never
use up the controller's file descriptors), the body is hashed as it streams in and never
kept (``CHUNK_BYTES`` at a time), and a request must arrive whole within ``READ_TIMEOUT``.

Pure verification (:func:`verify`), plus the server (:func:`serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Mapping
from typing import Final

from .errors import ConfigError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES: Final = 16 * 1024
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
CHUNK_BYTES: Final = 64 * 1024
MAX_CONNECTIONS: Final = 32
READ_TIMEOUT: Final = 10.0
OVERLOAD_LOG_INTERVAL: Final = 60.0
_HMAC_HEADERS: Final = ("x-hub-signature-256", "x-gitea-signature", "x-gogs-signature")


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Verifier:
    """The signature check of one request, fed the body piece by piece (nothing is kept)."""

    def __init__(self, headers: Mapping[str, str], secret: bytes) -> None:
        self._secret = secret
        self._mac = hmac.new(secret, b"", hashlib.sha256)
        self._headers = headers

    def update(self, chunk: bytes) -> None:
        self._mac.update(chunk)

    def ok(self) -> bool:
        if not self._secret:
            return False
        expected = self._mac.hexdigest()
        for name in _HMAC_HEADERS:
            value = self._headers.get(name)
            if value is not None:
                given = value.strip().removeprefix("sha256=").lower()
                return hmac.compare_digest(given.encode("ascii", "replace"), expected.encode())
        token = self._headers.get("x-gitlab-token")
        if token is not None:
            return hmac.compare_digest(token.strip().encode("utf-8", "replace"), self._secret)
        return False


def verify(headers: Mapping[str, str], body: bytes, secret: bytes) -> bool:
    """True if the request carries a valid signature (or token) made with ``secret``."""
    verifier = Verifier(headers, secret)
    verifier.update(body)
    return verifier.ok()


def describe(headers: Mapping[str, str], body: bytes) -> str:
    """A short description of a delivery for the log (event kind and ref, if any)."""
    kind = (
        headers.get("x-github-event")
        or headers.get("x-gitea-event")
        or headers.get("x-gitlab-event")
        or headers.get("x-event-key")
        or "push"
    )
    ref = ""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        payload = json.loads(body) if body else {}
        if isinstance(payload, dict) and isinstance(payload.get("ref"), str):
            ref = f" {payload['ref']}"
    return f"{kind}{ref}"


async def _respond(writer: asyncio.StreamWriter, status: int, reason: str, text: str) -> None:
    body = (json.dumps({"status": status, "message": text}) + "\n").encode()
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()


_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\n"
    b"Connection: close\r\n\r\n"
)


class _Refused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


async def _read_request(
    reader: asyncio.StreamReader, secret: bytes
) -> tuple[str, dict[str, str], bool]:
    """``(path, headers, signed)`` of one POST, the body hashed as it arrives and dropped;
    :class:`_Refused` with the status otherwise."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _Refused(431, "headers too large") from None
    except asyncio.IncompleteReadError:
        raise _Refused(400, "incomplete request") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Refused(400, "not an HTTP/1.x request")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _Refused(400, "malformed header")
        headers[name.strip().lower()] = value.strip()
    if parts[0] != "POST":
        raise _Refused(405, "use POST")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _Refused(411, "send Content-Length, not chunked")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _Refused(400, "bad Content-Length") from None
    if length < 0 or length > MAX_BODY_BYTES:
        raise _Refused(413, "body too large")
    verifier = Verifier(headers, secret)
    left = length
    while left:
        chunk = await reader.read(min(left, CHUNK_BYTES))
        if not chunk:
            raise _Refused(400, "incomplete body")
        verifier.update(chunk)
        left -= len(chunk)
    return parts[1], headers, verifier.ok()


async def serve(
    host: str,
    port: int,
    secret: bytes,
    wake: Callable[[str], None],
    *,
    started: Callable[[int], None] | None = None,
) -> None:
    """Serve until cancelled; every accepted delivery calls ``wake``."""
    active = 0
    overloaded_logged = -OVERLOAD_LOG_INTERVAL
    refused_since_log = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active, overloaded_logged, refused_since_log
        if active >= MAX_CONNECTIONS:
            # Busy: answer at once and let the descriptor go. Logged once per interval.
            refused_since_log += 1
            now = asyncio.get_running_loop().time()
            if now - overloaded_logged >= OVERLOAD_LOG_INTERVAL:
                log.warning(
                    "webhook: %d request(s) refused with 503, %d already being served",
                    refused_since_log, MAX_CONNECTIONS,
                )  # fmt: skip
                overloaded_logged, refused_since_log = now, 0
            writer.write(_BUSY)
            writer.close()  # sends what was written, then lets the descriptor go
            return
        active += 1
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    path, headers, signed = await _read_request(reader, secret)
            except _Refused as refused:
                await _respond(writer, refused.status, "Error", refused.text)
                return
            if not signed:
                log.warning("webhook: refused a request to %s without a valid signature", path)
                await _respond(writer, 401, "Unauthorized", "missing or bad signature")
                return
            log.info("webhook: %s", describe(headers, b""))
            wake("webhook")
            await _respond(writer, 202, "Accepted", "fetching")
        except TimeoutError:
            await _respond(writer, 408, "Request Timeout", "too slow")
        except ConnectionError:
            pass
        finally:
            active -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    try:
        server = await asyncio.start_server(handle, host, port, limit=MAX_HEADER_BYTES)
    except OSError as exc:
        raise ConfigError(f"webhook: cannot listen on {host}:{port}: {exc.strerror}") from exc
    bound = server.sockets[0].getsockname()[1]
    log.info("webhook listening on http://%s:%d/", host, bound)
    if started is not None:
        started(bound)
    async with server:
        await server.serve_forever()
