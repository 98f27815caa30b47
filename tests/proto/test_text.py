"""Text from the other side: control characters dropped at ingest (pure)."""

from __future__ import annotations

from setpoint.proto import text


def test_clean_drops_controls_and_keeps_tab_and_newline() -> None:
    assert text.clean("ok\x1b[2K\r\x07\x9b31m\u202eevil\tand\nmore") == "ok[2K31mevil\tand\nmore"
    plain = "nothing to do here"
    assert text.clean(plain) is plain
