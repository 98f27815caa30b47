"""Log output for the controller: plain lines by default, one JSON object per line on request.

Nothing the controller logs contains key material or setting values (bundles are logged
by target, version, commit and author only), so no filtering is needed here; this module
only decides the format.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final

PLAIN_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


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


def setup(*, json_lines: bool = False, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # paho/aiomqtt and watchfiles are chatty at INFO; their warnings still show.
    for name in ("setpoint.controller.mqtt", "watchfiles", "watchfiles.main"):
        logging.getLogger(name).setLevel(logging.WARNING)
