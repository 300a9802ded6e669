"""Repeats from the result cache waiting for the tick (pure: the clock is passed in)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cosyvoiced.cache import Entry
from cosyvoiced.clients import LOCAL_ADMIN, anonymous
from cosyvoiced.job import Job
from cosyvoiced.repeats import MAX_WAITING_BYTES, PLAY_S, Repeats

RATE = 22050


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _entry(seconds: float) -> Entry:
    return Entry(RATE, "tone", np.zeros(int(seconds * RATE), dtype=np.int16))


def _job(n: int, stream: bool = False, sample_rate: int | None = None) -> Job:
    return Job(id=f"{n:x}", source="zmq", origin="o", text="t", stream=stream,
               sample_rate=sample_rate)


def test_the_repeats_waiting_hold_a_bounded_amount_of_cached_audio() -> None:
    repeats = Repeats()
    big = Entry(RATE, "tone", np.zeros(MAX_WAITING_BYTES // 4 + 1, dtype=np.int16))  # > half
    assert repeats.keep(_job(0), big)
    assert not repeats.keep(_job(1), big)  # over it with another: synthesized instead
    assert repeats.keep(_job(2), _entry(1.0))
    assert len(repeats) == 2
    alone = Repeats()
    too_big = Entry(RATE, "tone", np.zeros(MAX_WAITING_BYTES // 2 + 1, dtype=np.int16))
    assert alone.keep(_job(3), too_big)  # one alone always waits


def test_a_tick_plays_repeats_for_its_time_and_one_always() -> None:
    clock = _Clock()
    repeats = Repeats(clock)
    for n in range(5):
        repeats.keep(_job(n, stream=True), _entry(1.0))
    played = []
    for repeat in repeats.due(lambda: 0, 1 << 30):
        played.append(repeat.job.id)
        clock.now += PLAY_S / 2  # each takes half the tick's time
    assert played == ["0", "1"]
    assert repeats.more_now()  # the next tick may come at once
    assert [r.job.id for r in repeats.take_all()] == ["2", "3", "4"]  # a stop past its time
    assert not repeats


def test_a_whole_file_waits_while_the_encoder_is_full_and_a_stream_does_not() -> None:
    repeats = Repeats()
    seconds = 10.0
    repeats.keep(_job(0, stream=True), _entry(seconds))
    # A file at twice the rate goes to the encoder as it is, resampled there; a stream at
    # twice the rate is played at it.
    repeats.keep(_job(1, sample_rate=2 * RATE), _entry(seconds))
    repeats.keep(_job(2, stream=True, sample_rate=2 * RATE), _entry(seconds))
    file_bytes = int(seconds * RATE) * 4
    assert repeats.played_bytes() == 4 * file_bytes
    held = 100
    room = held + file_bytes - 1
    assert [r.job.id for r in repeats.due(lambda: held, room)] == ["0"]
    assert repeats.waiting_for_encoder
    assert not repeats.more_now()  # the encoder wakes the tick
    assert [r.job.id for r in repeats.due(lambda: held, room + 1)] == ["1", "2"]
    repeats.keep(_job(3, sample_rate=2 * RATE), _entry(seconds))
    assert [r.job.id for r in repeats.due(lambda: 0, 1)] == ["3"]  # an idle encoder takes it


def test_a_cancelled_repeat_leaves_and_frees_its_place_for_its_owner_only() -> None:
    repeats = Repeats()
    big = Entry(RATE, "tone", np.zeros(MAX_WAITING_BYTES // 4 + 1, dtype=np.int16))  # > half
    mine, theirs = replace(_job(0), owner="me"), replace(_job(1), owner="them")
    assert repeats.keep(mine, big)
    assert repeats.keep(theirs, _entry(1.0))
    assert repeats.cancel(mine.id, anonymous("them")) is None  # another's: as if unknown
    assert repeats.cancel("unknown", LOCAL_ADMIN) is None
    assert not repeats.keep(_job(2), big)  # no room for another big one with it
    assert repeats.cancel(mine.id, anonymous("me")) == mine
    assert repeats.keep(_job(2), big)  # its bytes were freed
    assert [r.job.id for r in repeats.take_all()] == [theirs.id, _job(2).id]
