"""Who may see the dashboard: listen addresses and tokens. Pure; no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from setpoint.dashboard import access
from setpoint.dashboard.access import AccessError, Listen


@pytest.mark.parametrize(
    ("text", "host", "port", "loopback"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, True),
        ("127.0.0.2:0", "127.0.0.2", 0, True),
        ("localhost:1", "localhost", 1, True),
        ("[::1]:8080", "::1", 8080, True),
        ("0.0.0.0:8080", "0.0.0.0", 8080, False),
        ("192.0.2.7:80", "192.0.2.7", 80, False),
        ("dash.example:80", "dash.example", 80, False),
    ],
)
def test_parse_listen(text: str, host: str, port: int, loopback: bool) -> None:
    listen = access.parse_listen(text)
    assert (listen.host, listen.port, listen.loopback) == (host, port, loopback)


@pytest.mark.parametrize("text", ["8080", ":8080", "host:", "host:99999", "host:http"])
def test_bad_listen_says_the_form(text: str) -> None:
    with pytest.raises(AccessError, match=r"use HOST:PORT, e\.g\. 127\.0\.0\.1:8080"):
        access.parse_listen(text)


def test_off_loopback_needs_a_token_or_mutual_tls() -> None:
    public = Listen("0.0.0.0", 8080)
    with pytest.raises(AccessError, match=r"not a loopback address.*--token-file"):
        access.check_listen(public, token=False, mutual_tls=False)
    access.check_listen(public, token=True, mutual_tls=False)
    access.check_listen(public, token=False, mutual_tls=True)
    access.check_listen(Listen("127.0.0.1", 1), token=False, mutual_tls=False)


def test_token_file(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("  0123456789abcdef  \n")
    assert access.read_token(tmp_path / "t") == "0123456789abcdef"
    (tmp_path / "short").write_text("abc")
    with pytest.raises(AccessError, match="3 characters, use at least 16"):
        access.read_token(tmp_path / "short")
    with pytest.raises(AccessError, match=r"--token-file .*missing"):
        access.read_token(tmp_path / "missing")


def test_tokens_and_bearer_headers() -> None:
    assert access.token_matches("secret-token-123456", "secret-token-123456")
    assert not access.token_matches("secret-token-123456", "secret-token-12345")
    assert not access.token_matches("secret-token-123456", None)
    assert not access.token_matches("secret-token-123456", "sécret")
    assert access.bearer("Bearer abc") == "abc"
    assert access.bearer("bearer  abc ") == "abc"
    assert access.bearer("Basic abc") is None and access.bearer("Bearer ") is None
    assert access.bearer(None) is None


def test_urls() -> None:
    assert Listen("::1", 80).url() == "http://[::1]:80/"
    assert Listen("127.0.0.1", 443).url(tls=True) == "https://127.0.0.1:443/"
