"""The one JSON log line format of every setpoint process (``--log-json``).

One object per line, keys sorted: ``time`` (Unix seconds, ms), ``iso`` (UTC), ``level``,
``logger``, ``message`` and, with a traceback, ``exception``.

Stdlib only.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": round(record.created, 3),
            "iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, sort_keys=True)
