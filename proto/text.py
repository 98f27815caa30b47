"""Text from the other side, made safe to keep and to show.

A device's own report text (``detail``, ``failure.error``, refusal reasons) travels to
operators' terminals through drift statuses and events. Terminal control sequences in it
could write a fake "all devices in sync" line, set the window title or the clipboard.

* :func:`clean` (at ingest): drops C0 controls other than tab and newline, DEL, the C1
  range (which holds CSI and OSC) and the bidirectional overrides that reorder text.
* :func:`shown` (when printing on one line): escapes every character that is not printable,
  newline and tab included, as ``\\xNN`` / ``\\uNNNN``, so that nothing the other side sent
  can move the cursor or end a line.

Pure; no I/O.
"""

from __future__ import annotations

import re
from typing import Final

_UNSAFE: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """``text`` without control characters (tab and newline kept)."""
    return _UNSAFE.sub("", text) if _UNSAFE.search(text) else text


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: str) -> str:
    """``text`` for one line of a terminal: every unprintable character escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)
