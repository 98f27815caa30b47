"""Packets as bytes, without a connection: for tools that write a pre-encoded stream.

The ingest benchmark's publisher encodes its whole stream first and writes it with one
``sendall`` so that it is never the limit; these are gmqtt's packet builders (the same
codec as :mod:`.client`), driven without a connection. MQTT 3.1.1 or 5.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import gmqtt
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.mqtt.package import DisconnectPacket, LoginPackageFactor, PublishPacket

VERSIONS: Final = {"5": MQTTv50, "3.1.1": MQTTv311}


class _Ids:
    """Packet ids 1-65535 in turn (a pre-encoded stream's acknowledgements are only
    counted, so ids may repeat after 65,535 messages)."""

    def __init__(self) -> None:
        self.last = 0

    def next_id(self) -> int:
        self.last = self.last % 0xFFFF + 1
        return self.last


class _Codec:
    """What gmqtt's builders read from a protocol object."""

    proto_name = b"MQTT"

    def __init__(self, version: str) -> None:
        if version not in VERSIONS:
            raise ValueError(f"MQTT version must be one of {', '.join(VERSIONS)}, got {version!r}")
        self.proto_ver = VERSIONS[version]
        self.id_generator = _Ids()


def connect(client_id: str, *, keepalive: int = 60, version: str = "3.1.1") -> bytes:
    """A CONNECT with a clean session and no credentials."""
    packet: bytes = LoginPackageFactor.build_package(
        client_id, None, None, True, keepalive, _Codec(version)
    )
    return bytes(packet)


def publishes(messages: Iterable[tuple[str, bytes, int, bool]], *, version: str = "3.1.1") -> bytes:
    """PUBLISH packets of ``(topic, payload, qos, retain)``, one after the other."""
    codec = _Codec(version)
    out = bytearray()
    for topic, payload, qos, retain in messages:
        _mid, packet = PublishPacket.build_package(
            gmqtt.Message(topic, payload, qos=qos, retain=retain), codec
        )
        out += packet
    return bytes(out)


def disconnect(*, version: str = "3.1.1") -> bytes:
    return bytes(DisconnectPacket.build_package(_Codec(version)))
