"""Which of the chunks due at a batched step are made now: a job's first audio goes before
the later chunks of streams that are already playing.

In a batched worker every flow call of a step delays every stream's next token, so a job
that has not spoken yet waits not only for its own first hop of tokens but for the later
chunks of every other stream made meanwhile. On a compute-bound device (a CPU) that is
most of a newcomer's wait. So while some stream is still before its job's first audio, the
later chunks of streamed segments give way, each for at most `patience` steps: a playing
stream is held back by that many tokens' time at most, and is never starved. A stream's
chunk boundaries do not depend on when the chunk is made, so its audio is the same.

Segments that are not streamed (the whole file at once) neither give way nor make others
give way: nobody is listening to them yet.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DueChunk:
    """A chunk due at this step, as the ordering rule sees it."""

    opening: bool  # the job's first audio: a streamed job's first segment, its first chunk
    streamed: bool
    waited: int  # steps it has already given way


def makes_now(chunk: DueChunk, someone_opening: bool, patience: int) -> bool:
    """Whether `chunk` is made at this step; `someone_opening`: a streamed job in the batch
    has not had its first audio yet (it may be `chunk`'s own)."""
    if chunk.opening or not chunk.streamed or not someone_opening:
        return True
    return chunk.waited >= patience
