"""How long the supervisor's ticks take, and which step of a slow one took the time.

Everything the supervisor does happens in its tick, one step after another (supervisor.py),
and the tick also pings the watchdog: a tick that takes long holds every worker, intake and
client, and a budget that under-counts some input (a text that is slow to split, a large
prompt, many repeats from the cache) shows as a slow tick first. Every tick's time goes to
a histogram (`cosyvoiced_tick_seconds`); one of SLOW_TICK_S or more is logged (`tick_slow`,
at most once per LOG_INTERVAL_S, with how many there were since the last line) with the
steps that took most of it, so that an operator sees where the time went without a
profiler.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from cosyvoiced import logs

log = logs.get_logger("cosyvoiced.tickclock")

SLOW_TICK_S = 0.5
LOG_INTERVAL_S = 10.0
STEP_SHARE = 0.1  # a step that took this share of a slow tick is named in its line


def slow_steps(laps: list[tuple[str, float]], total_s: float) -> dict[str, float]:
    """The steps (name: milliseconds) that took at least STEP_SHARE of `total_s`, slowest
    first; `laps` are each step's seconds, in the tick's order."""
    taken = sorted((lap for lap in laps if lap[1] >= STEP_SHARE * total_s),
                   key=lambda lap: lap[1], reverse=True)
    return {name: round(seconds * 1000, 1) for name, seconds in taken}


class TickLaps:
    """One tick's steps, timed as they end."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.started = self._last = clock()
        self.laps: list[tuple[str, float]] = []

    def run(self, step: str, act: Callable[..., object], *args: object) -> None:
        """Do one step of the tick, and time it."""
        act(*args)
        self.lap(step)

    def lap(self, step: str) -> None:
        """`step` just ended."""
        now = self._clock()
        self.laps.append((step, now - self._last))
        self._last = now

    @property
    def total_s(self) -> float:
        return self._last - self.started


class TickClock:
    def __init__(self, observe: Callable[[float], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._observe = observe
        self._clock = clock
        self._slow = 0  # slow ticks since the last line
        self._worst_s = 0.0
        self._next_line_at = 0.0

    @contextlib.contextmanager
    def timing(self) -> Iterator[TickLaps]:
        """One tick: its steps are timed with the laps this yields; `end` when it ends."""
        laps = TickLaps(self._clock)
        yield laps
        self.end(laps)

    def end(self, laps: TickLaps) -> None:
        total_s = laps.total_s
        self._observe(total_s)
        if total_s < SLOW_TICK_S:
            return
        self._slow += 1
        self._worst_s = max(self._worst_s, total_s)
        if laps.started + total_s < self._next_line_at:
            return
        log.warning("tick_slow", tick_s=round(total_s, 3), steps=slow_steps(laps.laps, total_s),
                    slow_ticks=self._slow, worst_s=round(self._worst_s, 3),
                    slow_tick_s=SLOW_TICK_S,
                    message="the supervisor's tick (workers, intakes, the watchdog) was held")
        self._slow, self._worst_s = 0, 0.0
        self._next_line_at = laps.started + total_s + LOG_INTERVAL_S
