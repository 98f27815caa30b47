"""The reconnect backoff (pure) and the barrier topic."""

from __future__ import annotations

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
