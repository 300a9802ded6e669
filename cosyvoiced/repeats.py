"""Repeats found in the result cache, waiting for the tick to play them (service.settle).

A repeat needs no worker: the supervisor plays it from the cache itself. That costs the tick
(the cached audio read, resampled and converted: 0.1-0.17 s for 280 s of audio asked for at
48 kHz) and memory (the entry, then its audio waiting for the encoder), and a repeat takes no
place in the queue. 64 repeats of one long cached text a tick, from each network intake, held
the tick for seconds and gave the encoder gigabytes to hold. So:

- the repeats waiting hold at most MAX_WAITING_BYTES of cached audio; past it a repeat is
  synthesized as if it were not cached (within the queue's places, like any job);
- a tick plays repeats for PLAY_S at most (one always), the rest at the next tick;
- one whose whole file goes to the encoder waits while the encoder holds `room_bytes` of
  audio (unless it holds none: one always goes); the encoder wakes the tick when a file is
  made;
- a stop waits for them as for jobs in progress; past its deadline a reply's client is told
  to ask again, and a drop-folder job stays in work/ (a repeat again at the next start).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cosyvoiced.cache import Entry
from cosyvoiced.clients import Identity
from cosyvoiced.job import Job

MAX_WAITING_BYTES = 256 << 20
PLAY_S = 0.1


@dataclass(frozen=True)
class Repeat:
    job: Job
    entry: Entry
    found: float  # monotonic: when it was found in the cache

    @property
    def played_bytes(self) -> int:
        """The float32 audio it is played as: a stream at the rate the job asks for, a whole
        file at the entry's (the encoder process resamples it)."""
        entry = self.entry
        rate = (self.job.stream and self.job.sample_rate) or entry.sample_rate
        return len(entry.pcm) * 4 * rate // entry.sample_rate

    @property
    def whole_file(self) -> bool:
        """Played as one file (through the encoder, for most formats), not as a stream."""
        return not self.job.stream


class Repeats:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._waiting: deque[Repeat] = deque()
        self._entry_bytes = 0
        self._clock = clock
        self.waiting_for_encoder = False  # the first one waits for the encoder to make room

    def __len__(self) -> int:
        return len(self._waiting)

    def keep(self, job: Job, entry: Entry) -> bool:
        """Keep a repeat for the next tick to play; False when the repeats waiting hold
        MAX_WAITING_BYTES of cached audio: synthesize it instead."""
        if self._waiting and self._entry_bytes + entry.pcm.nbytes > MAX_WAITING_BYTES:
            return False
        self._waiting.append(Repeat(job, entry, self._clock()))
        self._entry_bytes += entry.pcm.nbytes
        return True

    def played_bytes(self) -> int:
        """The audio the repeats waiting will give the encoder (or a stream) when played."""
        return sum(repeat.played_bytes for repeat in self._waiting)

    def due(self, encoding_bytes: Callable[[], int], room_bytes: int) -> Iterator[Repeat]:
        """The repeats to play now, oldest first, each taken off as it is given: for PLAY_S,
        and a whole file only while the encoder holds less than `room_bytes` with it
        (`encoding_bytes`)."""
        began = self._clock()
        self.waiting_for_encoder = False
        while self._waiting:
            repeat = self._waiting[0]
            if self._clock() - began >= PLAY_S:
                return
            held = encoding_bytes()
            if repeat.whole_file and held and held + repeat.played_bytes > room_bytes:
                self.waiting_for_encoder = True
                return
            self._waiting.popleft()
            self._entry_bytes -= repeat.entry.pcm.nbytes
            yield repeat

    def cancel(self, job_id: str, identity: Identity) -> Job | None:
        """Take off the waiting repeat `job_id` if `identity` may see it: its job, or None."""
        found = next((r for r in self._waiting if r.job.id == job_id), None)
        if found is None or not identity.may_see(found.job.owner):
            return None
        self._waiting = deque(r for r in self._waiting if r is not found)
        self._entry_bytes -= found.entry.pcm.nbytes
        return found.job

    def take_all(self) -> list[Repeat]:
        """Every repeat waiting, taken off unplayed (the daemon stops past its deadline)."""
        waiting, self._waiting, self._entry_bytes = list(self._waiting), deque(), 0
        return waiting

    def more_now(self) -> bool:
        """Repeats are left for the next tick, which may come at once (it need not wait for
        the encoder)."""
        return bool(self._waiting) and not self.waiting_for_encoder
