"""How much of one supervisor tick the intakes' messages (and the drop folder's claims,
service.py) may take, all of them together.

Each message is handled on the supervisor's thread, and a job's text is cleaned up and
split there (about 2.5 microseconds a character: 50 ms for 20,000; three times that for a
text of one-character sentences, "a。。。"). A burst of long texts handled in one tick held
everything else (workers, the other intakes, WATCHDOG=1) for seconds. So an intake stops
taking messages once it has handled MESSAGES_PER_TICK, or CHARS_PER_TICK of text, or spent
SECONDS_PER_TICK on them, whichever comes first: the clock counts what the other two
under-count (slow texts, prompts written to the spool, repeats found in the result cache).
The rest wait for the next tick, which comes at once.

One budget serves every intake in a tick: each with a budget of its own let a tick take
each one's 0.1 s and more (the drop folder, ZeroMQ, HTTP and Wyoming each with a burst of
texts slow to split held one tick 0.57-0.73 s). They take it in turns (`in_turn`): the first
always handles one message, so none waits behind the others' floods for long.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

MESSAGES_PER_TICK = 64
CHARS_PER_TICK = 200_000  # of text: about half a second of clean-up and splitting
SECONDS_PER_TICK = 0.1


@dataclass
class TickBudget:
    messages: int = MESSAGES_PER_TICK
    chars: int = CHARS_PER_TICK
    seconds: float = SECONDS_PER_TICK
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def spend(self, text: Any) -> bool:
        """Count one message with this text (anything but a string: none); False once the
        budget is spent. The message that spends it is still handled: one always goes."""
        self.messages -= 1
        if isinstance(text, str):
            self.chars -= len(text)
        return not self.spent

    @property
    def spent(self) -> bool:
        return (self.messages <= 0 or self.chars <= 0
                or self.clock() - self.started >= self.seconds)


def in_turn(takers: Sequence[T], tick: int) -> list[T]:
    """`takers` in the order they take from tick number `tick`'s budget: each goes first in
    its turn."""
    first = tick % len(takers) if takers else 0
    return [*takers[first:], *takers[:first]]
