"""Text from the other side, made safe to keep and to show.

A device's own report text (``detail``, ``failure.error``, refusal reasons) travels to
operators' terminals through drift statuses and events. Terminal control sequences in it
could write a fake "all devices in sync" line, set the window title or the clipboard.

:func:`clean` (at ingest) drops C0 controls other than tab and newline, DEL, the C1 range
(which holds CSI and OSC) and the bidirectional overrides that reorder text. What prints
such text escapes it again (the CLI's ``_fleetview.printable``), newlines included.

Pure; no I/O.
"""

from __future__ import annotations

import re
from typing import Final

_UNSAFE: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """``text`` without control characters (tab and newline kept)."""
    return _UNSAFE.sub("", text) if _UNSAFE.search(text) else text
