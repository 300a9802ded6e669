"""Streamed text that says nothing, read at a pace.

A stream's text waits to be spoken within a bound (the ElevenLabs socket's buffer, the
Wyoming stream's lookahead), which paces its client to the speech. Text with nothing to say
(an emoji, a code fence, a run of "。") is dropped once split into sentences, so it never
waits, and nothing paced it: a socket that sent 60 KB of "。" per message kept the HTTP
loop splitting it (7 us a character, 19,990 sentences a message) for every client of the
loop, as fast as it could send. So a connection's dropped characters are counted, forgiven
at CHARS_PER_S, and past FREE_CHARS its next message is read only once they are forgiven:
the client is slowed (TCP holds what it sends), not refused. An LLM's reply streams at tens
to hundreds of tokens a second, and a code block of a few thousand characters fits in
FREE_CHARS: a client that sends more than that at once waits a few seconds before its next
message is read, while what it sent before is spoken.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from cosyvoiced import logs

log = logs.get_logger("cosyvoiced.intake.unsaid")

CHARS_PER_S = 1_000.0
FREE_CHARS = 4_000.0


class Unsaid:
    """One connection's dropped characters, as they are forgiven (its loop only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._held = 0.0
        self._at = clock()
        self._paced = False  # it had to wait once: logged, once per connection

    def add(self, chars: int) -> None:
        self._held = self._held_now() + chars

    def wait_s(self) -> float:
        """How long to wait before reading the connection's next message."""
        return max(0.0, self._held_now() - FREE_CHARS) / CHARS_PER_S

    async def pace(self, **connection: Any) -> None:
        """Wait before the next message, if it must (`connection`: who, for the log)."""
        wait_s = self.wait_s()
        if not wait_s:
            return
        if not self._paced:
            self._paced = True
            log.warning("unsaid_text_paced", chars_per_s=CHARS_PER_S, wait_s=round(wait_s, 3),
                        message="a client sends text that says nothing faster than this: "
                                "its messages are read at that pace", **connection)
        await asyncio.sleep(wait_s)

    def _held_now(self) -> float:
        """The characters not forgiven yet."""
        now = self._clock()
        self._held = max(0.0, self._held - (now - self._at) * CHARS_PER_S)
        self._at = now
        return self._held
