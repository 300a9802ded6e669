"""Timing the supervisor's ticks (pure: the clock is passed in)."""

from __future__ import annotations

import structlog

from cosyvoiced.tickclock import LOG_INTERVAL_S, SLOW_TICK_S, TickClock, slow_steps


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _tick(tick_clock: TickClock, clock: _Clock, steps: dict[str, float]) -> None:
    with tick_clock.timing() as timed:
        for step, seconds in steps.items():
            timed.run(step, _take, clock, seconds)


def _take(clock: _Clock, seconds: float) -> None:
    clock.now += seconds


def test_a_slow_tick_names_the_steps_that_took_its_time() -> None:
    assert slow_steps([("signals", 0.001), ("intakes", 0.9), ("settle", 0.2),
                       ("report", 0.05)], 1.151) == {"intakes": 900.0, "settle": 200.0}


def test_every_tick_is_observed_and_slow_ones_are_logged_once_per_interval() -> None:
    clock, observed = _Clock(), list[float]()
    tick_clock = TickClock(observed.append, clock)
    with structlog.testing.capture_logs() as logged:
        _tick(tick_clock, clock, {"intakes": 0.01, "settle": 0.02})
        assert len(observed) == 1
        assert abs(observed[0] - 0.03) < 1e-9
        assert not logged  # a quick tick is only observed
        _tick(tick_clock, clock, {"intakes": SLOW_TICK_S + 0.2, "settle": 0.01})
        for _ in range(3):  # within the interval: counted, not logged
            _tick(tick_clock, clock, {"settle": 2 * SLOW_TICK_S})
        clock.now += LOG_INTERVAL_S
        _tick(tick_clock, clock, {"workers": SLOW_TICK_S})
    slow = [line for line in logged if line["event"] == "tick_slow"]
    assert len(observed) == 6
    assert len(slow) == 2
    assert slow[0]["steps"] == {"intakes": 700.0}
    assert slow[0]["slow_ticks"] == 1
    assert (slow[1]["slow_ticks"], slow[1]["worst_s"]) == (4, 2 * SLOW_TICK_S)
    assert slow[1]["steps"] == {"workers": SLOW_TICK_S * 1000}
