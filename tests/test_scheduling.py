"""Segments and the fair order of their turns, without processes: pure functions."""

from __future__ import annotations

import pytest

from cosyvoiced import segments
from cosyvoiced.placement import plan
from cosyvoiced.scheduler import Assignment, Priority, Waiting, assign, places

BULK, INTERACTIVE = Priority.BULK, Priority.INTERACTIVE
TEXT = ("Hello there, my friend, how are you today? \"I am fine.\" Mr. Smith said so. "
        "This sentence goes on and on, with clauses; and more clauses: and it keeps going "
        "\u2014 until it stops.\n\nA new paragraph")


@pytest.mark.parametrize("first_words", [0, 3, 5, 50])
@pytest.mark.parametrize("max_chars", [20, 60, 300])
def test_segments_joined_are_the_text(first_words: int, max_chars: int) -> None:
    assert "".join(segments.split(TEXT, max_chars, first_words)) == TEXT


def test_sentences_are_segments_and_abbreviations_do_not_end_one() -> None:
    assert segments.split(TEXT, 300) == [
        "Hello there, my friend, how are you today? ", "\"I am fine.\" ",
        "Mr. Smith said so. ",
        "This sentence goes on and on, with clauses; and more clauses: and it keeps going "
        "\u2014 until it stops.\n\n", "A new paragraph"]


def test_a_long_sentence_is_cut_at_clause_boundaries_then_between_words() -> None:
    cut = segments.split("one two three, four five six; seven eight nine ten eleven", 16)
    assert cut == ["one two three, ", "four five six; ", "seven eight ", "nine ten eleven"]
    assert all(len(piece) <= 16 for piece in cut)


def test_a_streamed_first_segment_ends_at_the_first_clause_after_a_few_words() -> None:
    first, second, *_ = segments.split(TEXT, 300, first_words=4)
    assert (first, second) == ("Hello there, my friend, ", "how are you today? ")
    # No clause boundary after enough words: the whole sentence.
    assert segments.split("Short, but no more. Next.", 300, 4)[0] == "Short, but no more. "


def test_short_sentences_share_a_segment_but_a_streamed_first_one_stays_alone() -> None:
    text = "One. Two words. Three more words. Four."
    assert segments.split(text, 300, pack_chars=24) == ["One. Two words. ",
                                                        "Three more words. Four."]
    assert segments.split(text, 300, first_words=1, pack_chars=24) == [
        "One. ", "Two words. ", "Three more words. Four."]
    assert "".join(segments.split(TEXT, 60, 3, pack_chars=100)) == TEXT


def test_cjk_text_is_cut_without_spaces_and_markup_carries_its_language_tag() -> None:
    text = "\u4f60\u597d\uff0c\u4e16\u754c\u3002\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff01"
    assert segments.split(text, 300) == [text[:6], text[6:]]
    tagged = "<|en|>Hello there. And more."  # more in tests/test_segments_markup.py
    assert segments.split(tagged, 20, 1) == ["<|en|>Hello there. ", "<|en|>And more."]


def _wait(job: str, priority: Priority, since: float, **state: object) -> Waiting:
    return Waiting(job, priority, since, **state)  # type: ignore[arg-type]


def test_interactive_goes_before_bulk_whatever_waited_longer() -> None:
    waiting = [_wait("bulk", BULK, 1.0), _wait("chat", INTERACTIVE, 5.0)]
    assert assign(waiting, [0], {}, 8) == [Assignment("chat", 0)]
    assert assign(waiting, [0, 1], {}, 8) == [Assignment("chat", 0), Assignment("bulk", 1)]


def test_jobs_of_a_class_take_turns_segment_by_segment() -> None:
    """A long job whose segment just ended (t=10) goes behind a job that arrived at t=3."""
    clock = 0.0
    served: list[str] = []
    ready = {"long": 0.0, "short": 3.0}
    left = {"long": 4, "short": 1}
    while any(left.values()):
        waiting = [_wait(job, BULK, since, started=job in served)
                   for job, since in ready.items() if left[job]]
        (choice,) = assign(waiting, [0], {}, 8)
        served.append(choice.job_id)
        clock += 10.0  # one segment
        left[choice.job_id] -= 1
        ready[choice.job_id] = clock
    assert served == ["long", "short", "long", "long", "long"]


def test_a_retried_segment_goes_first_and_back_to_an_idle_slot_of_its_last_worker() -> None:
    waiting = [_wait("old", BULK, 1.0), _wait("crashed", BULK, 9.0, retry=True),
               _wait("warm", BULK, 0.5, started=True, last_worker=2)]
    assert assign(waiting, [0, 2], {}, 8) == [Assignment("crashed", 0), Assignment("warm", 2)]


def test_only_max_active_jobs_of_a_class_are_in_progress() -> None:
    waiting = [_wait("new", BULK, 1.0), _wait("going", BULK, 5.0, started=True),
               _wait("chat", INTERACTIVE, 6.0)]
    assert assign(waiting, [0, 1, 2], {BULK: 2, INTERACTIVE: 0}, 2) == [
        Assignment("chat", 0), Assignment("going", 1)]


def test_a_batched_worker_is_listed_once_per_free_stream_least_loaded_first() -> None:
    """Slot 0 makes 4 streams and has 1 in hand, slot 1 has 4 free: new segments spread
    over both before either fills, and the scheduler hands each place out once."""
    order = places({0: 3, 1: 4}, {0: 1, 1: 0})
    assert order == [1, 0, 1, 0, 1, 0, 1]
    waiting = [_wait(f"j{n}", INTERACTIVE, float(n)) for n in range(9)]
    chosen = assign(waiting, order, {}, 16)
    assert [a.slot for a in chosen] == order
    assert len({a.job_id for a in chosen}) == 7


def test_workers_are_placed_interleaved_with_a_share_of_the_cores() -> None:
    placements = plan(["cuda:0", "cuda:1"], 2, cores=16)
    assert [p.device for p in placements] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [p.cpu_threads for p in plan(["cpu"], 2, cores=2)] == [1, 1]
    assert [p.cpu_threads for p in plan(["cpu"], 3, cores=16)] == [5, 5, 5]
    assert plan(["cpu"], 4, cores=16, threads=2)[0].cpu_threads == 2
