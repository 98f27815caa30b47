"""setpoint's Mosquitto configurations and the helper that starts a private broker."""

from setpoint.mosquitto.broker import (
    Broker,
    BrokerError,
    BrokerNotInstalled,
    find_mosquitto,
    free_port,
)

__all__ = ["Broker", "BrokerError", "BrokerNotInstalled", "find_mosquitto", "free_port"]
