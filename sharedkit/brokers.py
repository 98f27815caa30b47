"""Where and how a client reaches the broker: one settings class for every side."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Host, port, TLS files and credentials; the password is never part of a repr.

    ``others``: the other nodes of a cluster, tried in turn after ``host``/``port``;
    ``protocol``: ``auto`` (MQTT 5, then 3.1.1 on an engine that refuses 5), ``5`` or
    ``3.1.1``, for the clients that choose (the dashboard)."""

    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    client_id: str = ""
    keepalive: int = 30
    connect_timeout: float = 10.0
    protocol: str = "auto"
    others: tuple[tuple[str, int], ...] = ()

    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"
