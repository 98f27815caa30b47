"""Log output for the controller: plain lines by default, one JSON object per line on request.

Nothing the controller logs contains key material or setting values (bundles are logged
by target, version, commit and author only), so no filtering is needed here; this module
only decides the format.
"""

from __future__ import annotations

import logging
import sys
from typing import Final

from setpoint.kit.logjson import JsonFormatter

PLAIN_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup(*, json_lines: bool = False, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # watchfiles is chatty at INFO; its warnings still show. (gmqtt's loggers are quieted
    # by the transport, which raises typed errors instead.)
    for name in ("watchfiles", "watchfiles.main"):
        logging.getLogger(name).setLevel(logging.WARNING)
