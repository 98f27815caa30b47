"""The controller's lean ingest connection on the secure broker: mutual TLS, the ACL."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest
from kit import Client

from setpoint.controller.broker import BrokerSettings, Fact, Link, Message, Subscription
from setpoint.controller.errors import BrokerUnavailable
from setpoint.controller.ingesting import IngestConnection, IngestStats, Routes
from setpoint.controller.pki import Credentials, Pki
from setpoint.mosquitto import SecureBroker
from setpoint.proto.topics import Topics


def settings(broker: SecureBroker, creds: Credentials) -> BrokerSettings:
    return BrokerSettings(
        broker.host, broker.port, tls=True, ca=str(creds.ca), cert=str(creds.cert),
        key=str(creds.key),
    )  # fmt: skip


async def test_reports_come_in_over_tls_with_the_controllers_certificate(
    secure_broker: SecureBroker, pki: Pki
) -> None:
    topics = Topics(secure_broker.prefix)
    seen: list[tuple[str, bytes]] = []

    def take(fact: Fact) -> None:
        if isinstance(fact, Message):
            seen.append((fact.topic, fact.payload))

    link = Link(
        settings(secure_broker, pki.controller),
        topics,
        [Subscription(topics.all_reported(), bulk=True)],
        take,
    )
    task = asyncio.create_task(link.run())
    device = Client(secure_broker, pki.device("dev1"), "dev1")
    try:
        async with asyncio.timeout(15):
            await link.wait_connected()
        assert device.publish(topics.device_reported("dev1"), b"report", retain=False) == 0
        await link.barrier()  # through both connections
        assert seen == [(topics.device_reported("dev1"), b"report")]
        assert link.ingest_stats.received >= 1
    finally:
        device.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_without_a_client_certificate_the_ingest_connection_is_refused(
    secure_broker: SecureBroker, pki: Pki
) -> None:
    topics = Topics(secure_broker.prefix)
    no_cert = ssl.create_default_context(cafile=str(pki.controller.ca))
    with pytest.raises(BrokerUnavailable, match="ingest connection"):
        await IngestConnection.open(
            host=secure_broker.host,
            port=secure_broker.port,
            client_id="setpoint-controller-nocert-in",
            routes=Routes(),
            filters=[(topics.all_reported(), 0)],
            barrier_topic=topics.barrier("setpoint-controller-nocert-in"),
            stats=IngestStats(),
            ssl_context=no_cert,
            timeout=10,
        )
