"""The batched worker's chunk order, without a model: a job's first audio before the later
chunks of streams already playing, and no stream held back for long."""

from __future__ import annotations

import pytest

from cosyvoiced.engines.firstaudio import DueChunk, makes_now

PATIENCE = 25


def test_a_first_chunk_is_made_at_once() -> None:
    assert makes_now(DueChunk(opening=True, streamed=True, waited=0), True, PATIENCE)


def test_a_later_chunk_gives_way_while_another_job_has_no_audio_yet() -> None:
    assert not makes_now(DueChunk(opening=False, streamed=True, waited=0), True, PATIENCE)
    assert not makes_now(DueChunk(opening=False, streamed=True, waited=PATIENCE - 1), True,
                         PATIENCE)


def test_a_later_chunk_gives_way_for_at_most_the_patience() -> None:
    assert makes_now(DueChunk(opening=False, streamed=True, waited=PATIENCE), True, PATIENCE)


def test_a_later_chunk_goes_when_nobody_waits_for_first_audio() -> None:
    assert makes_now(DueChunk(opening=False, streamed=True, waited=0), False, PATIENCE)


@pytest.mark.parametrize("someone_opening", [True, False])
def test_a_segment_not_streamed_never_waits(
        someone_opening: bool) -> None:
    assert makes_now(DueChunk(opening=False, streamed=False, waited=0), someone_opening,
                     PATIENCE)
