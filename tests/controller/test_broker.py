"""The reconnect backoff (pure) and the barrier topic."""

from __future__ import annotations

import pytest

from setpoint.controller.broker import Backoff, new_client_id
from setpoint.kit.backoff import Retry
from setpoint.proto.topics import Topics, validate_id


class Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_the_links_retry_doubles_up_to_the_cap_then_resets() -> None:
    retry = Retry(Backoff(base=0.1, cap=1.0), Fixed(1.0))  # the top of each jitter range
    assert [round(retry.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    retry.reset()
    assert retry.next() == 0.1


def test_the_links_retry_jitters_between_half_and_the_whole_delay() -> None:
    assert Retry(Backoff(base=1.0), Fixed(0.0)).next() == 0.5
    assert Retry(Backoff(base=1.0), Fixed(1.0)).next() == 1.0


def test_client_ids_are_valid_ids_for_the_barrier_topic() -> None:
    client_id = new_client_id()
    assert validate_id(client_id) == client_id and client_id != new_client_id()
    assert Topics("x/v1").barrier(client_id) == f"x/v1/clients/{client_id}/barrier"


async def test_inbox_drops_what_exceeds_its_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiomqtt

    from setpoint.controller import broker

    monkeypatch.setattr(broker, "MAX_INBOX_BYTES", 3000)
    inbox = broker._Inbox()

    def message(size: int) -> aiomqtt.Message:
        return aiomqtt.Message("t/x", b"x" * size, qos=0, retain=False, mid=1, properties=None)

    for _ in range(5):
        inbox.put_nowait(message(1000))
    assert inbox.qsize() == 3 and inbox.dropped == 2 and inbox.held == 3000
    assert (await inbox.get()).payload == b"x" * 1000
    assert inbox.held == 2000
    inbox.put_nowait(message(1000))  # room again
    assert inbox.qsize() == 3 and inbox.dropped == 2
