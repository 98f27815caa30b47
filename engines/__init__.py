"""Clustered MQTT engines setpoint is tried on, beside the single mosquitto of
:mod:`setpoint.mosquitto`: their shipped configurations and the helper that starts one.

Today: a 3-node NATS cluster with JetStream and MQTT (``nats-cluster.conf``), started by
:class:`NatsCluster` on free loopback ports. The names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from setpoint.engines.cluster import (
        EngineError,
        EngineNotInstalled,
        NatsCluster,
        NatsNode,
        find_nats_server,
    )

__all__ = [
    "EngineError",
    "EngineNotInstalled",
    "NatsCluster",
    "NatsNode",
    "find_nats_server",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("setpoint.engines.cluster"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
