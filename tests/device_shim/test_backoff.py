"""Backoff and the retry gate, on a clock and a random source driven by hand."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from setpoint.device_shim.backoff import Backoff, RetryGate


@dataclass
class FixedRandom:
    value: float

    def random(self) -> float:
        return self.value


def test_nominal_doubles_up_to_the_cap() -> None:
    b = Backoff(base=1.0, cap=30.0)
    assert [b.nominal(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert Backoff(1.0, 60.0).nominal(10_000) == 60.0


def test_negative_attempt_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        Backoff().nominal(-1)


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 4.0), (0.5, 6.0), (0.999999, 8.0)])
def test_equal_jitter_stays_between_half_and_the_whole(draw: float, expected: float) -> None:
    assert Backoff(1.0, 60.0).delay(3, FixedRandom(draw)) == pytest.approx(expected, abs=1e-4)


def test_a_thousand_devices_do_not_reconnect_together() -> None:
    # The storm test: every device loses the broker at t=0 and draws its own delay.
    rng = random.Random(7)
    b = Backoff(1.0, 120.0)
    first = sorted(b.delay(0, rng) for _ in range(1000))
    assert first[0] >= 0.5 and first[-1] <= 1.0
    # Spread evenly over the window: each of its ten 50 ms slots holds about a tenth.
    slots = [min(9, int((d - 0.5) / 0.05)) for d in first]
    assert all(60 < slots.count(s) < 140 for s in range(10))
    later = sorted(b.delay(6, rng) for _ in range(1000))
    assert later[0] >= 32 and later[-1] <= 64 and later[-1] - later[0] > 25


def gate_after(
    previous: RetryGate | None, key: str, now: float, *, permanent: bool = False
) -> RetryGate:
    return RetryGate.after_failure(
        previous,
        key=key,
        permanent=permanent,
        now=now,
        backoff=Backoff(10.0, 3600.0),
        target="kiosk",
        kind="group",
        version=3,
        error="boom",
        rng=FixedRandom(1.0),
    )


def test_temporary_failure_waits_out_the_backoff() -> None:
    gate = gate_after(None, "v3", now=1000.0)
    assert gate.attempts == 1 and gate.next_at == pytest.approx(1010.0)
    assert not gate.allows("v3", 1009.9, cap=3600)
    assert gate.allows("v3", 1010.0, cap=3600)


def test_each_retry_of_the_same_version_waits_longer() -> None:
    now, gate, waits = 0.0, None, []
    for _ in range(6):
        gate = gate_after(gate, "v3", now)
        waits.append(gate.next_at - now)
        now = gate.next_at
    assert waits == pytest.approx([10, 20, 40, 80, 160, 320])
    assert gate is not None and gate.attempts == 6


def test_a_new_version_resets_the_count_and_is_tried_at_once() -> None:
    gate = gate_after(gate_after(None, "v3", 0.0), "v3", 10.0)
    assert gate.allows("v4", 10.0, cap=3600)
    assert gate_after(gate, "v4", 11.0).attempts == 1


def test_permanent_failure_is_never_retried_for_the_same_version() -> None:
    gate = gate_after(None, "v3", 0.0, permanent=True)
    assert gate.due() is None
    for later in (10.0, 3600.0, 10 * 86400.0):
        assert not gate.allows("v3", later, cap=3600)
    assert gate.allows("v4", 1.0, cap=3600)


def test_clock_jumping_backwards_does_not_stall_retries() -> None:
    # A device without an RTC boots in 1970, then NTP fixes the clock (or the reverse).
    gate = gate_after(None, "v3", now=1_700_000_000.0)
    assert gate.allows("v3", 1000.0, cap=3600)


def test_gate_round_trips_through_the_state_file() -> None:
    gate = gate_after(None, "v3", 5.0, permanent=True)
    assert RetryGate.from_dict(gate.to_dict()) == gate
