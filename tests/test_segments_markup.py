"""Segmentation never gives up on a text: engine tags stay with their words, and a text with
tags is still cut at sentences, clauses and words, never over `max_chars`. Pure functions."""

from __future__ import annotations

import random
import re
import time

import pytest

from cosyvoiced import segments

# The test's own idea of a tag, kept apart from the module's so that a bug there shows here.
TAG = re.compile(r"<\|[a-z0-9_]+\|>|\[[A-Za-z][A-Za-z0-9_-]*\]|</?[a-z]+>")
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india")
VOCABULARY = (*WORDS, *WORDS, "[laughter]", "[breath]", "[x]", "<|en|>", "<|zh|>",
              "<strong>", "</strong>", "<laughter>", "</laughter>", ".", ",", ";", "!", "?",
              "\u2014", "U.S.", "p.m.", "Mr.", "\u4f60", "\u597d", "\u3002", "\uff0c", "\"")
SEPARATORS = ("", " ", " ", " ", "  ", "\n", "\n\n")


def unpunctuated(chars: int, seed: int = 1) -> str:
    """Words without a single punctuation mark, about `chars` long."""
    pick = random.Random(seed)
    text = ""
    while len(text) < chars:
        text += pick.choice(WORDS) + " "
    return text[:chars]


def random_text(pick: random.Random) -> str:
    return "".join(pick.choice(VOCABULARY) + pick.choice(SEPARATORS)
                   for _ in range(pick.randrange(1, 120)))


def forbidden_cuts(text: str, max_chars: int) -> set[int]:
    """Positions where a cut would split a tag, or part a tag from the word it applies to
    (an opening tag from the word after it, a closing tag from the word before it); but
    not those of a run of them too long for one segment (a chain of tags), which has to
    be cut somewhere."""
    forbidden: set[int] = set()
    for tag in TAG.finditer(text):
        forbidden.update(range(tag.start() + 1, tag.end()))
        if tag.group().startswith("</"):
            before = len(text[:tag.start()].rstrip())
            forbidden.update(range(before, tag.start() + 1))
        else:
            after = len(text) - len(text[tag.end():].lstrip())
            forbidden.update(range(tag.end(), after + 1))
    return forbidden - set().union(*(run for run in _runs(forbidden) if len(run) >= max_chars))


def _runs(positions: set[int]) -> list[set[int]]:
    """`positions` as runs of consecutive ones."""
    runs: list[set[int]] = []
    for position in sorted(positions):
        if runs and position - 1 in runs[-1]:
            runs[-1].add(position)
        else:
            runs.append({position})
    return runs


def check(text: str, max_chars: int, first_words: int = 0, pack_chars: int = 0,
          glue: bool = True) -> list[str]:
    """The invariants of a split; returns it."""
    spans = segments.spans(text, max_chars, first_words, pack_chars)
    split = segments.split(text, max_chars, first_words, pack_chars)
    # The spans tile the text: nothing dropped, nothing repeated.
    assert "".join(text[start:end] for start, end in spans) == text
    assert all(end > start for start, end in spans)
    assert [end for _, end in spans[:-1]] == [start for start, _ in spans[1:]]
    # A segment is its slice of the text, after what it carries (a language tag...).
    assert split == [segments.carried(text, start, max_chars) + text[start:end]
                     for start, end in spans]
    assert all(end - start <= max_chars for start, end in spans), spans
    cuts = {start for start, _ in spans[1:]}
    inside_tags = {p for tag in TAG.finditer(text) for p in range(tag.start() + 1, tag.end())}
    assert not cuts & inside_tags
    if glue:
        assert not cuts & forbidden_cuts(text, max_chars), (text, split)
    return split


def test_a_tagged_text_of_2000_unpunctuated_characters_is_cut_into_many_segments() -> None:
    text = "[x] " + unpunctuated(2000)
    split = check(text, 300)
    assert len(split) >= 7
    assert split[0].startswith("[x] ")
    assert len(split[0].split()) > 2  # the tag went with the words after it


@pytest.mark.parametrize("tag", ["[laughter] ", "<|en|>", "<strong>", "[breath]"])
def test_tagged_texts_at_the_20000_character_limit_are_cut(tag: str) -> None:
    body = unpunctuated(20_000 - len(tag))
    split = check(tag + body, 300)
    assert len(split) >= 20_000 // 300
    sprinkled = " ".join(f"{tag}{word}" for word in body.split(" "))[:20_000]
    assert len(check(sprinkled, 300)) >= 20_000 // 300


def test_a_cut_never_parts_a_tag_from_its_word_table() -> None:
    assert segments.split("one two [laughter] three four", 20) == [
        "one two ", "[laughter] three ", "four"]
    assert segments.split("say <strong>this</strong> now please", 24) == [
        "say ", "<strong>this</strong> ", "now please"]
    assert segments.split("a b c d e f g h i j k [laughter]\u4f60\u597d", 20) == [
        "a b c d e f g h i j ", "k [laughter]\u4f60\u597d"]


def test_a_language_tag_is_carried_to_every_later_segment() -> None:
    text = "<|en|>Hello there. And more. <|zh|>\u4f60\u597d\u3002Then this."
    assert segments.split(text, 20) == ["<|en|>Hello there. ", "<|en|>And more. ",
                                        "<|zh|>\u4f60\u597d\u3002", "<|zh|>Then this."]
    check(text, 20)
    # A CosyVoice 3 instruction before <|endofprompt|> applies to every segment too.
    instructed = "Speak softly.<|endofprompt|>First sentence here. Second one."
    assert segments.split(instructed, 50) == [
        "Speak softly.<|endofprompt|>First sentence here. ",
        "Speak softly.<|endofprompt|>Second one."]


def test_abbreviations_with_inner_dots_do_not_end_a_sentence() -> None:
    assert segments.split("We met at 3 p.m. yesterday. Then we left.", 300) == [
        "We met at 3 p.m. yesterday. ", "Then we left."]
    assert segments.split("The U.S. Army came. Then it left.", 300) == [
        "The U.S. Army came. ", "Then it left."]
    assert segments.split("Fruit, e.g. apples. Good.", 300) == ["Fruit, e.g. apples. ", "Good."]
    assert segments.split("The army (U.S. Army) came. Then (Mr. Smith) left.", 300) == [
        "The army (U.S. Army) came. ", "Then (Mr. Smith) left."]
    # A full stop before a lowercase word does not end a sentence either.
    assert segments.split("It was approx. ten metres. Yes.", 300) == [
        "It was approx. ten metres. ", "Yes."]


def test_nothing_is_ever_longer_than_max_chars() -> None:
    check("a" * 1000, 300)  # one "word": cut anyway, it would cost as much as a whole text
    check("[a]" * 5000, 300, glue=False)  # only tags: cut between two of them
    check("." * 20_000, 300)  # nothing to say, in one piece it would still be one call
    check(". " * 10_000, 300)
    check(("Hi. " * 100) + "\"", 20, pack_chars=120)  # packing stays within max_chars
    check("\u4f60" * 2000, 300)


@pytest.mark.parametrize("seed", range(400))
def test_random_texts_keep_every_invariant(seed: int) -> None:
    pick = random.Random(seed)
    text = random_text(pick)
    check(text, pick.choice((20, 40, 300)), pick.choice((0, 3)), pick.choice((0, 60, 120)))


def test_splitting_takes_linear_time_even_in_long_runs_of_spaces() -> None:
    """The supervisor splits in its own thread: a backtracking pattern would stall it
    (20,000 spaces took 3 s, 60,000 took half a minute), and so would a Python loop over
    the spaces at each segment's start (60,000 took 4 s; 0.2 s now). This thread's CPU time
    is what counts: the rest of the suite shares the cores."""
    started = time.thread_time()
    check("a" + " " * 60_000 + "b", 300)
    assert time.thread_time() - started < 3.0


def test_splitting_a_text_of_many_tagged_segments_takes_linear_time() -> None:
    """Each segment's language tag was searched for from the text's start: 2,500 segments
    of "a<|en|>[pause:0]" took 196 ms at 20,000 characters, 731 ms at 40,000 (twice the
    text, 3.7 times the time), on the supervisor's tick. Now twice the text takes about
    twice the time (this thread's CPU time, the best of a few: the cores are shared)."""
    def cost(chars: int) -> float:
        text = ("a<|en|>[pause:0]" * (chars // 16 + 1))[:chars]
        best = float("inf")
        for _ in range(3):
            started = time.thread_time()
            segments.split(text, 300, 5, 120)
            best = min(best, time.thread_time() - started)
        return best

    assert cost(40_000) / cost(20_000) < 3.0
