"""The webhook: signature checks (pure) and the server over a real socket."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator

import pytest

from setpoint.commands import notify
from setpoint.controller import webhooks

SECRET = b"s3cret"
BODY = b'{"ref": "refs/heads/main"}'


def hub(body: bytes = BODY, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def test_github_signature_good() -> None:
    assert webhooks.verify({"x-hub-signature-256": hub()}, BODY, SECRET)


def test_github_signature_bad() -> None:
    assert not webhooks.verify({"x-hub-signature-256": hub(secret=b"other")}, BODY, SECRET)


def test_signature_over_another_body_is_refused() -> None:
    assert not webhooks.verify({"x-hub-signature-256": hub(b"{}")}, BODY, SECRET)


def test_gitea_signature_without_prefix() -> None:
    digest = hmac.new(SECRET, BODY, hashlib.sha256).hexdigest()
    assert webhooks.verify({"x-gitea-signature": digest}, BODY, SECRET)


def test_gitlab_token() -> None:
    assert webhooks.verify({"x-gitlab-token": "s3cret"}, BODY, SECRET)
    assert not webhooks.verify({"x-gitlab-token": "guess"}, BODY, SECRET)


def test_unsigned_request_is_refused() -> None:
    assert not webhooks.verify({}, BODY, SECRET)


def test_empty_secret_refuses_everything() -> None:
    assert not webhooks.verify({"x-hub-signature-256": hub(secret=b"")}, BODY, b"")


def test_describe_names_event_and_ref() -> None:
    assert webhooks.describe({"x-github-event": "ping"}, b"{}") == "ping"
    assert webhooks.describe({}, BODY) == "push refs/heads/main"


@contextlib.asynccontextmanager
async def server(wakes: list[str]) -> AsyncIterator[int]:
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        webhooks.serve("127.0.0.1", 0, SECRET, wakes.append, started=started.set_result)
    )
    try:
        yield await asyncio.wait_for(started, 5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def request(port: int, raw: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return int(status_line.split()[1])


def post(body: bytes, headers: dict[str, str]) -> bytes:
    lines = ["POST /webhook HTTP/1.1", "Host: x", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_server_accepts_a_signed_push_and_wakes() -> None:
    wakes: list[str] = []
    async with server(wakes) as port:
        assert await request(port, post(BODY, {"X-Hub-Signature-256": hub()})) == 202
    assert wakes == ["webhook"]


async def test_server_accepts_a_signed_ping_with_empty_body() -> None:
    wakes: list[str] = []
    async with server(wakes) as port:
        status = await request(
            port, post(b"", {"X-GitHub-Event": "ping", "X-Hub-Signature-256": hub(b"")})
        )
    assert status == 202 and wakes == ["webhook"]


async def test_server_refuses_a_bad_signature_and_does_not_wake() -> None:
    wakes: list[str] = []
    async with server(wakes) as port:
        assert await request(port, post(BODY, {"X-Hub-Signature-256": hub(secret=b"x")})) == 401
        assert await request(port, post(BODY, {})) == 401
    assert wakes == []


async def test_server_refuses_get_and_oversized_bodies() -> None:
    wakes: list[str] = []
    async with server(wakes) as port:
        assert await request(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == 405
        big = f"POST / HTTP/1.1\r\nContent-Length: {10**9}\r\n\r\n".encode()
        assert await request(port, big) == 413
        assert await request(port, b"garbage\r\n\r\n") == 400
    assert wakes == []


async def test_notify_posts_a_signed_request(monkeypatch: pytest.MonkeyPatch) -> None:
    wakes: list[str] = []
    async with server(wakes) as port:
        monkeypatch.setenv("SETPOINT_WEBHOOK_SECRET", SECRET.decode())
        args = argparse.Namespace(
            controller=f"http://127.0.0.1:{port}/",
            secret_file=None,
            ref=["refs/heads/main"],
            hook=False,
            timeout=5.0,
            json=False,
        )
        assert await asyncio.to_thread(notify.run, args) == 0
        monkeypatch.setenv("SETPOINT_WEBHOOK_SECRET", "wrong")
        assert await asyncio.to_thread(notify.run, args) == 1
    assert wakes == ["webhook"]
