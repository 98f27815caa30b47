"""The controller's link given every node of a 3-node NATS cluster: its node is killed
(``kill -9``), it moves to another node and finds there what the cluster retained
(shared state, unlike two separate mosquittos), and publishes there.

Opt-in with the other fault tests (``make test-cluster``, SETPOINT_CLUSTER_FAULTS=1): a
fresh cluster per test, and the engine needs a few seconds to elect new stream leaders.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from setpoint.controller.broker import (
    Backoff,
    BrokerSettings,
    Fact,
    Link,
    Message,
    Subscription,
)
from setpoint.controller.errors import BrokerUnavailable
from setpoint.engines import NatsCluster
from setpoint.proto.topics import Topics

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(
        not os.environ.get("SETPOINT_CLUSTER_FAULTS"),
        reason="cluster fault tests run with `make test-cluster` (SETPOINT_CLUSTER_FAULTS=1)",
    ),
]


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    return host, int(port)


@pytest.mark.timeout(300)
async def test_the_link_moves_to_another_node_when_its_node_is_killed(
    nats_cluster_fresh: NatsCluster, unique_prefix: str
) -> None:
    cluster = nats_cluster_fresh
    topics = Topics(unique_prefix)
    first, *others = [host_port(url) for url in cluster.urls]
    settings = BrokerSettings(*first, others=tuple(others), connect_timeout=3.0, keepalive=2)
    facts: list[Fact] = []
    link = Link(
        settings,
        topics,
        [Subscription(topics.all_group_desired())],
        facts.append,
        backoff=Backoff(0.1, 1.0),
        publish_timeout=20.0,
    )
    task = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(60):
            before = await link.wait_connected()
        assert before.node == f"{first[0]}:{first[1]}"
        await link.publish(topics.group_desired("g"), b"kept by the cluster", retain=True)
        cluster.nodes[0].kill()
        async with asyncio.timeout(120):
            await before.lost.wait()
            while True:  # the engine may refuse subscriptions while it elects leaders
                now = await link.wait_connected()
                try:
                    await link.barrier()
                    break
                except Exception:
                    await asyncio.sleep(0.5)
        assert now.node != before.node
        connected = next(i for i, f in enumerate(facts) if getattr(f, "session", None) is now)
        kept = [f.payload for f in facts[connected:] if isinstance(f, Message)]
        assert kept == [b"kept by the cluster"]
        # And it publishes there, acknowledged by a node that answers (the one it is on now,
        # or the next, should this one stall while the engine still elects).
        async with asyncio.timeout(120):
            while True:
                try:
                    await link.publish(topics.group_desired("h"), b"after the kill", retain=True)
                    break
                except BrokerUnavailable:
                    await link.wait_connected()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
