"""setpoint's Mosquitto configurations and the helper that starts a private broker.

The names below are loaded from :mod:`setpoint.mosquitto.broker` on first use, not when
the package is imported: ``python -m setpoint.mosquitto.broker`` then runs that module
fresh (``runpy`` warns when the module it is asked to run was already imported by its
package).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from setpoint.mosquitto.broker import (
        Broker,
        BrokerError,
        BrokerNotInstalled,
        SecureBroker,
        find_mosquitto,
        free_port,
    )

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerNotInstalled",
    "SecureBroker",
    "find_mosquitto",
    "free_port",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("setpoint.mosquitto.broker"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
