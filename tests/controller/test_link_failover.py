"""The link over several broker nodes, against real mosquittos: a dead first node is
skipped, and a killed live node hands over to the other; pipelined publications."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from setpoint.controller.broker import (
    Backoff,
    BrokerSettings,
    Connected,
    Fact,
    Link,
    Message,
    Subscription,
)
from setpoint.controller.errors import BrokerUnavailable
from setpoint.mosquitto import Broker, free_port
from setpoint.proto.topics import Topics
from setpoint.transport import Session, Settings

pytestmark = pytest.mark.broker


@pytest.fixture
def second(tmp_path: Path) -> Any:
    with Broker(tmp_path / "second") as broker:
        yield broker


@contextlib.asynccontextmanager
async def running(link: Link) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(link.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def nodes_link(
    first: tuple[str, int], second: tuple[str, int], topics: Topics, facts: list[Fact]
) -> Link:
    settings = BrokerSettings(first[0], first[1], others=(second,), connect_timeout=2.0)
    return Link(
        settings,
        topics,
        [Subscription(topics.all_group_desired())],
        facts.append,
        backoff=Backoff(base=0.05, cap=0.3),
    )


async def retain(broker: Any, topic: str, payload: bytes) -> None:
    publisher = await Session.open(Settings(broker.host, broker.port, "failover-pub"))
    try:
        await (await publisher.publish(topic, payload, qos=1, retain=True))
    finally:
        publisher.close()


async def test_a_dead_first_node_hands_over_to_the_second(broker: Any, unique_prefix: str) -> None:
    topics = Topics(unique_prefix)
    await retain(broker, topics.group_desired("g"), b"on the live node")
    facts: list[Fact] = []
    link = nodes_link(("127.0.0.1", free_port()), (broker.host, broker.port), topics, facts)
    async with running(link):
        async with asyncio.timeout(15):
            session = await link.wait_connected()
        await link.barrier()
        assert session.node == f"{broker.host}:{broker.port}"
        assert link.failures >= 1  # the dead node was tried first
        assert [f.payload for f in facts if isinstance(f, Message)] == [b"on the live node"]


async def test_a_killed_node_hands_over_to_the_other(
    broker: Any, second: Any, unique_prefix: str
) -> None:
    topics = Topics(unique_prefix)
    await retain(second, topics.group_desired("g"), b"on the second node")
    facts: list[Fact] = []
    link = nodes_link((broker.host, broker.port), (second.host, second.port), topics, facts)
    async with running(link):
        async with asyncio.timeout(15):
            first = await link.wait_connected()
        assert first.node == f"{broker.host}:{broker.port}"
        broker.kill()
        async with asyncio.timeout(30):
            await first.lost.wait()
            now = await link.wait_connected()
        await link.barrier()
        assert now.node == f"{second.host}:{second.port}"
        assert [f for f in facts if isinstance(f, Connected)][-1].session is now
        assert [f.payload for f in facts if isinstance(f, Message)] == [b"on the second node"]
        await link.publish(topics.group_desired("h"), b"published there", retain=True)


async def test_many_publications_go_out_pipelined_and_are_all_acknowledged(
    broker: Any, unique_prefix: str
) -> None:
    topics = Topics(unique_prefix)
    link = Link(BrokerSettings(broker.host, broker.port), topics, [], lambda _f: None)
    count = 3000
    async with running(link):
        async with asyncio.timeout(15):
            session = await link.wait_connected()
        connection = session._connection
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, connection.inflight)
                await asyncio.sleep(0)

        watching = asyncio.create_task(watch())
        messages = [(topics.group_status(f"g{i}"), b"%d" % i, True) for i in range(count)]
        try:
            await link.publish_many(messages)
        finally:
            watching.cancel()
        assert connection.inflight == 0  # every PUBACK came
        assert most > 1  # more than one waited for its PUBACK at once: pipelined
        # What the broker retained is what was published, every one of them.
        reader = await Session.open(Settings(broker.host, broker.port, "failover-read"))
        try:
            await reader.subscribe([topics.all_group_status()])
            got: dict[str, bytes] = {}
            async with asyncio.timeout(30):
                while len(got) < count:
                    got.update((m.topic, m.payload) for m in await reader.take())
            assert got == {t: p for t, p, _r in messages}
        finally:
            reader.close()


async def test_publishing_without_a_session_is_broker_unavailable(unique_prefix: str) -> None:
    link = Link(BrokerSettings("127.0.0.1", free_port()), Topics(unique_prefix), [], print)
    with pytest.raises(BrokerUnavailable, match="not connected"):
        await link.publish_many([("t", b"x", False)])


async def test_a_stalled_node_ends_the_session_and_the_link_moves_on(
    broker: Any, second: Any, unique_prefix: str
) -> None:
    """The hang the link once met in the rollout tests: its QoS 1 publishes written, no
    PUBACK and no PINGRESP for minutes, an idle loop. A broker that stops reading leaves
    the link's publications in its socket buffer; the session must end at the heartbeat
    (twice the keepalive) and the link go to the other node, not wait forever."""
    topics = Topics(unique_prefix)
    settings = BrokerSettings(
        broker.host, broker.port, others=((second.host, second.port),),
        keepalive=1, connect_timeout=2.0,
    )  # fmt: skip
    facts: list[Fact] = []
    link = Link(settings, topics, [], facts.append, backoff=Backoff(0.05, 0.3))
    big = b"x" * 65536  # enough of them fill the kernel's buffers: data left unsent
    async with running(link):
        async with asyncio.timeout(15):
            first = await link.wait_connected()
        with broker.stalled():
            with pytest.raises(BrokerUnavailable):
                await link.publish_many(
                    [(topics.group_status(f"g{i}"), big, True) for i in range(200)]
                )
            async with asyncio.timeout(30):
                await first.lost.wait()
                now = await link.wait_connected()
            assert now.node == f"{second.host}:{second.port}"
            await link.publish(topics.group_status("after"), b"on the other node", retain=True)


async def test_the_replicas_lease_connection_skips_a_dead_node_and_leads(
    broker: Any, unique_prefix: str, signing_key: Path
) -> None:
    from setpoint.controller.replica import Replica, ReplicaSettings
    from setpoint.controller.signing import load_signer

    settings = BrokerSettings(
        "127.0.0.1", free_port(), others=((broker.host, broker.port),), connect_timeout=2.0
    )
    leading = asyncio.Event()

    async def lead() -> None:
        leading.set()
        await asyncio.Event().wait()

    replica = Replica(
        settings,
        Topics(unique_prefix),
        load_signer(signing_key),
        ReplicaSettings("r1", lease=3.0),
        lead,
    )
    task = asyncio.create_task(replica.run())
    reader = await Session.open(Settings(broker.host, broker.port, "lease-read"))
    try:
        await reader.subscribe([Topics(unique_prefix).controller_leader()])
        async with asyncio.timeout(30):
            await leading.wait()
            # Its signed leader record is retained on the live node.
            [record] = (await reader.take())[:1]
        assert record.payload
    finally:
        reader.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_executor_carries_a_round_out_pipelined_and_records_it_in_order(
    broker: Any, unique_prefix: str, tmp_path: Path
) -> None:
    from setpoint.controller.audit import AuditLog
    from setpoint.controller.detecting import ClearGroup, ShowGroup
    from setpoint.controller.executing import Executor
    from setpoint.proto.status import GroupStatus

    topics = Topics(unique_prefix)
    link = Link(BrokerSettings(broker.host, broker.port), topics, [], lambda _f: None)
    executor = Executor(link, topics, AuditLog(tmp_path), lambda: 0.0)
    count = 2000
    actions: list[Any] = [
        ShowGroup(f"g{i}", GroupStatus(f"g{i}", i, None, "observe", 1, {}, 100.0))
        for i in range(count)
    ]
    actions.append(ClearGroup("g0"))  # after g0's summary: the same order on the broker
    recorded: list[Any] = []
    async with running(link):
        async with asyncio.timeout(15):
            session = await link.wait_connected()
        most = 0

        def done(action: Any) -> None:
            nonlocal most
            most = max(most, session._connection.inflight)
            recorded.append(action)

        await executor.carry_out_all(actions, done)
        assert recorded == actions  # every one, in order, once acknowledged
        assert most > 1  # others were in flight while the first were recorded: pipelined
        reader = await Session.open(Settings(broker.host, broker.port, "carry-read"))
        try:
            await reader.subscribe([topics.all_group_status()])
            got: dict[str, bytes] = {}
            async with asyncio.timeout(30):
                while len(got) < count - 1:
                    got.update((m.topic, m.payload) for m in await reader.take())
            assert topics.group_status("g0") not in got  # cleared after it was shown
            assert got[topics.group_status("g7")] == actions[7].new.to_json()
        finally:
            reader.close()


def test_the_starting_line_names_every_node() -> None:
    """``setpoint controller --broker A,B`` logs both nodes it will try, not only A."""
    from types import SimpleNamespace

    from setpoint.controller.service import describe

    nodes = BrokerSettings("127.0.0.1", 1, others=(("127.0.0.1", 2),))
    config = SimpleNamespace(repo="fleet/", broker=nodes, prefix="setpoint/v1")
    line = describe(config)  # type: ignore[arg-type]
    assert "broker mqtt://127.0.0.1:1,mqtt://127.0.0.1:2," in line
