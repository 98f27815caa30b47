"""The transport's typed errors: every failure of an MQTT connection is one of these."""

from __future__ import annotations

# CONNACK return codes of MQTT 3.1.1 and reason codes of MQTT 5 (the ones a broker sends).
CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x9F: "connection rate exceeded",
}

SUBACK_REASONS = {
    0x80: "unspecified error (a 3.1.1 broker's only refusal: usually its ACL)",
    0x83: "implementation specific error",
    0x87: "not authorized",
    0x8F: "topic filter invalid",
    0x91: "packet identifier in use",
    0x97: "quota exceeded",
    0x9E: "shared subscriptions not supported",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}


class TransportError(Exception):
    """Something went wrong with the MQTT connection; the message says what and where."""


class ConnectionLost(TransportError):
    """The connection ended (closed by the broker or the network, or never answered)."""


class Unreachable(ConnectionLost):
    """No connection was made at all (the TCP or TLS connect failed): nothing answered, so
    another protocol version would not be answered either."""


class ConnectRefused(TransportError):
    """The broker answered the CONNECT with a refusal."""

    def __init__(self, host: str, port: int, code: int) -> None:
        self.code = code
        reason = CONNACK_REASONS.get(code, "unknown reason")
        hint = ""
        if code in (4, 5, 0x86, 0x87):
            hint = "; check the user name, password or client certificate for this client"
        super().__init__(
            f"the broker at {host}:{port} refused the connection: {reason} (code {code:#x}){hint}"
        )


class SubscriptionRefused(TransportError):
    """The SUBACK refused one of the filters of a SUBSCRIBE."""

    def __init__(self, topic_filter: str, code: int) -> None:
        self.topic_filter = topic_filter
        self.code = code
        reason = SUBACK_REASONS.get(code, "refused")
        super().__init__(
            f"the broker refused the subscription to {topic_filter!r}: {reason}"
            f" (code {code:#x}); check the broker's ACL for this client"
        )


class ProtocolViolation(TransportError):
    """The broker sent bytes that are not MQTT (malformed packet, impossible length)."""
