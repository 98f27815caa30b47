"""setpoint's MQTT transport: one asyncio client for the controller and the simulator.

See :mod:`.client` for what it does and ``docs/decisions/0008-mqtt-transport.md`` for why
it is built on gmqtt. I/O: the pure layers (``setpoint.proto``, the controller's decisions,
the kit) never import it.
"""

from .client import (
    MAX_INBOUND_BYTES,
    MAX_INFLIGHT,
    PROTOCOLS,
    Client,
    Message,
    Protocol,
    Session,
    Settings,
    Subscription,
    Will,
)
from .errors import (
    ConnectionLost,
    ConnectRefused,
    ProtocolViolation,
    SubscriptionRefused,
    TransportError,
    Unreachable,
)

__all__ = [
    "MAX_INBOUND_BYTES",
    "MAX_INFLIGHT",
    "PROTOCOLS",
    "Client",
    "ConnectRefused",
    "ConnectionLost",
    "Message",
    "Protocol",
    "ProtocolViolation",
    "Session",
    "Settings",
    "Subscription",
    "SubscriptionRefused",
    "TransportError",
    "Unreachable",
    "Will",
]
