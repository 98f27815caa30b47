"""setpoint's Mosquitto configurations and the helper that starts a private broker."""

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
