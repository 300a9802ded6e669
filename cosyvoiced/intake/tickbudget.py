"""How much of one supervisor tick a network intake's messages may take.

Each message is handled on the supervisor's thread, and a job's text is cleaned up and
split there (about 2.5 microseconds a character: 50 ms for 20,000). A burst of long texts
handled in one tick held everything else (workers, the other intakes, WATCHDOG=1) for
seconds; past the budget, the rest wait for the next tick, which comes at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MESSAGES_PER_TICK = 64
CHARS_PER_TICK = 200_000  # of text: about half a second of clean-up and splitting


@dataclass
class TickBudget:
    messages: int = MESSAGES_PER_TICK
    chars: int = CHARS_PER_TICK

    def spend(self, text: Any) -> bool:
        """Count one message with this text (anything but a string: none); False once the
        budget is spent. The message that spends it is still handled: one always goes."""
        self.messages -= 1
        if isinstance(text, str):
            self.chars -= len(text)
        return self.messages > 0 and self.chars > 0
