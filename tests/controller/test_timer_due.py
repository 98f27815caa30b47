"""The loop's timer when the drift tick falls due in the same wake (controller/service.py)."""

from __future__ import annotations

from setpoint.controller.service import timer_due


def test_a_loop_deadline_that_is_due_wakes_a_pass() -> None:
    assert timer_due(10.0, 9.5, None, None) == (True, None)
    assert timer_due(10.0, 10.5, None, None) == (False, None)


def test_a_rollout_timer_that_fell_due_with_the_tick_wakes_one_pass() -> None:
    # healthy_for ran out at 9.8; the tick woke the loop at 10.0: a pass, once.
    due, woken = timer_due(10.0, None, 9.8, None)
    assert (due, woken) == (True, 9.8)
    assert timer_due(11.0, None, 9.8, woken) == (False, 9.8)  # that pass decided again
    assert timer_due(13.0, None, 12.5, woken) == (True, 12.5)  # the next timer: again


def test_a_rollout_timer_still_ahead_waits() -> None:
    assert timer_due(10.0, 12.0, 12.0, None) == (False, None)
