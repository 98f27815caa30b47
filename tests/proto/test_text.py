"""Text from the other side: controls dropped at ingest, escaped when shown (pure)."""

from __future__ import annotations

from setpoint.proto import text


def test_clean_drops_controls_and_keeps_tab_and_newline() -> None:
    assert text.clean("ok\x1b[2K\r\x07\x9b31m\u202eevil\tand\nmore") == "ok[2K31mevil\tand\nmore"
    plain = "nothing to do here"
    assert text.clean(plain) is plain


def test_shown_escapes_every_unprintable_character() -> None:
    assert text.shown("a\nb\x1b[0m\u202e") == "a\\x0ab\\x1b[0m\\u202e"
    assert text.shown("plain text") == "plain text"
