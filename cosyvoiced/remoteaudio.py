"""The audio of a whole reply made by another host, as it arrives: `part` events of
clusterwire.PART_BYTES at most, then the `done` outcome.

A `done` event carried the whole reply's audio: 100 MB of float32 for a 20,000 character
text, written to Redis in one command by the serving host and read in one by the receiving
host, whose event reader took up to 16 of them at once (1.6 GB in the supervisor after a
restart). In parts, each is kept as it comes (replyaudio.py puts a long reply on disk) and
nothing holds more than a batch of parts.

The parts are sent one command each, not in the outcome's transaction (that would hold
them all in memory at once), so a serving host that dies or loses Redis half way leaves
some behind, and the host that serves the job again sends its own from the first. Parts
stay in Redis until their outcome is acted on: a receiving host restarted half way reads
them again, and ones read twice (a replay of the stream) are told by their entry ids.
Whether a part is kept is decided here, without I/O (`part_action`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class PartAction(enum.Enum):
    KEEP = "keep"  # the next part: keep its audio
    RESTART = "restart"  # the first part of another try: what came before goes
    SKIP = "skip"  # read before (the stream is read again after a restart): kept already
    BREAK = "break"  # a part is missing: the reply cannot be whole


@dataclass
class Arriving:
    """The parts of one job's audio acted on so far, from one try of one host."""

    sender: str = ""
    entries: list[str] = field(default_factory=list)  # deleted from Redis with the outcome
    last_entry: tuple[int, int] = (0, 0)
    frames: int = 0
    broken: bool = False

    def begin_again(self) -> list[str]:
        """Another try's first part came: the entries of what came before, to delete."""
        gone = self.entries
        self.sender, self.entries, self.last_entry = "", [], (0, 0)
        self.frames, self.broken = 0, False
        return gone

    def kept(self, sender: str, entry: str, frames: int) -> None:
        self._acted_on(entry)
        self.sender = sender
        self.frames += frames

    def noted(self, entry: str) -> None:
        """A part that cannot be kept (one before it is missing): deleted with the rest."""
        self._acted_on(entry)
        self.broken = True

    def _acted_on(self, entry: str) -> None:
        self.entries.append(entry)
        self.last_entry = entry_order(entry)

    def whole(self, sender: str, frames: int) -> bool:
        """The parts that came make the reply `sender`'s outcome says it sent."""
        if not self.entries:  # a reply with no audio sends no part
            return frames == 0
        return not self.broken and self.sender == sender and self.frames == frames


def entry_order(entry: str) -> tuple[int, int]:
    """A Redis stream entry id ("<ms>-<seq>") as what orders it."""
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


def part_action(arriving: Arriving, sender: str, entry: str, seq: int) -> PartAction:
    if arriving.entries and entry_order(entry) <= arriving.last_entry:
        return PartAction.SKIP
    if seq == 0:
        return PartAction.RESTART if arriving.entries else PartAction.KEEP
    if arriving.broken or sender != arriving.sender or seq != len(arriving.entries):
        return PartAction.BREAK
    return PartAction.KEEP
