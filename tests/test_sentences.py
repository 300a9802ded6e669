"""The one sentence splitter, whole and streamed: English, Chinese and Japanese, abbreviations,
numbers with dots, engine tags and pauses; streamed text is cut where the whole text is,
however it was cut into pieces. Pure functions."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from wyoming.audio import AudioChunk, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from cosyvoiced import config, pauses, segments
from cosyvoiced import sentences as splitting
from cosyvoiced.sentences import SentenceSplitter, sentences
from tests.conftest import DaemonFactory
from tests.daemon import free_port
from tests.engines.faulty import SAMPLE_RATE, SECONDS_PER_CHAR

WYOMING_TIMEOUT_S = 30.0


def streamed(text: str, pieces: list[int]) -> list[str]:
    """`text` fed to a splitter in pieces of the given lengths (the rest in one), flushed."""
    splitter = SentenceSplitter()
    said: list[str] = []
    at = 0
    for length in [*pieces, len(text)]:
        said += splitter.feed(text[at:at + length])
        at += length
    return said + splitter.flush()


def trimmed(said: list[str]) -> list[str]:
    """Sentences without the whitespace between them, which a sentence handed out as soon
    as its stop came leaves to the next one."""
    return [sentence.strip() for sentence in said if sentence.strip()]


def token_by_token(text: str) -> list[tuple[int, list[str]]]:
    """What each one-character feed gave back (an LLM's tokens at their smallest)."""
    splitter = SentenceSplitter()
    return [(end, got) for end in range(1, len(text) + 1)
            if (got := splitter.feed(text[end - 1]))]


CASES = {
    "english": ("Hello there. How are you? I am fine! Good.",
                ["Hello there. ", "How are you? ", "I am fine! ", "Good."]),
    "chinese": ("\u4f60\u597d\u3002\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff01\u6211\u4eec"
                "\u53bb\u516c\u56ed\u5417\uff1f",
                ["\u4f60\u597d\u3002", "\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff01",
                 "\u6211\u4eec\u53bb\u516c\u56ed\u5417\uff1f"]),
    "chinese_quote": ("\u4ed6\u8bf4\uff1a\u201c\u597d\u3002\u201d\u7136\u540e\u8d70\u4e86"
                      "\u3002",
                      ["\u4ed6\u8bf4\uff1a\u201c\u597d\u3002\u201d",
                       "\u7136\u540e\u8d70\u4e86\u3002"]),
    "japanese": ("\u3053\u3093\u306b\u3061\u306f\u3002\u5143\u6c17\u3067\u3059\u304b\uff1f"
                 "\u300c\u306f\u3044\u3002\u300d\u3042\u308a\u304c\u3068\u3046\uff01",
                 ["\u3053\u3093\u306b\u3061\u306f\u3002", "\u5143\u6c17\u3067\u3059\u304b\uff1f",
                  "\u300c\u306f\u3044\u3002\u300d", "\u3042\u308a\u304c\u3068\u3046\uff01"]),
    "abbreviations": ("I met Dr. Smith at 3 p.m. yesterday. The U.S. Army came at 3 p.m. "
                      "Then Mr. and Mrs. Jones left, e.g. early. Fine.",
                      ["I met Dr. Smith at 3 p.m. yesterday. ",
                       "The U.S. Army came at 3 p.m. Then Mr. and Mrs. Jones left, e.g. early. ",
                       "Fine."]),
    "numbers": ("It costs 3.50 dollars. Version 1.2.3 is out. Pi is 3.14159! Done.",
                ["It costs 3.50 dollars. ", "Version 1.2.3 is out. ", "Pi is 3.14159! ",
                 "Done."]),
    "list": ("Steps:\n1. Open it.\n2. Close it.", ["Steps:\n1. Open it.\n", "2. Close it."]),
    "tags": ("[laughter] Hello there. <|en|>Next one [breath] here. <strong>Yes</strong>. "
             "Last.",
             ["[laughter] Hello there. ", "<|en|>Next one [breath] here. ",
              "<strong>Yes</strong>. ", "Last."]),
    "pauses": ("Wait for it. [pause:0.8] Now. <break time=\"800ms\"/> Done.",
               ["Wait for it. ", "[pause:0.8] Now. ", "<break time=\"800ms\"/> Done."]),
    "paragraphs": ("A heading\n\nThen text without a stop\n\nMore", [
        "A heading\n\n", "Then text without a stop\n\n", "More"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_text_sentences(name: str) -> None:
    text, expected = CASES[name]
    assert sentences(text) == expected
    assert "".join(sentences(text)) == text


@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_text_is_cut_where_the_whole_text_is(name: str) -> None:
    text, expected = CASES[name]
    for pieces in ([1] * len(text), [3, 5, 7] * len(text)):  # a character at a time, and so
        said = streamed(text, pieces)
        assert "".join(said) == text
        assert trimmed(said) == trimmed(expected)
    assert streamed(text, []) == expected  # all at once


def test_a_certain_sentence_end_comes_out_of_the_feed_that_brings_it() -> None:
    """Issue 23: "!" and "?", a CJK stop, and a "." after a plain word end the sentence
    whatever follows: it is spoken at once, not a token later when the next word begins."""
    for sentence in ("Hello there!", "Is it?", "It is late.", "It's well-known.", "No way!",
                     "\u4f60\u597d\u3002", "\u5143\u6c17\u3067\u3059\u304b\uff1f",
                     "Say <strong>this</strong> now!", 'She said "yes" and left.'):
        splitter = SentenceSplitter()
        assert splitter.feed(sentence) == [sentence], sentence
        assert splitter.pending == ""
    splitter = SentenceSplitter()
    assert splitter.feed("Hello there! ") == ["Hello there! "]  # as ElevenLabs' clients send
    assert splitter.feed("How are") == []
    assert splitter.feed(" you?") == ["How are you?"]


def test_an_end_that_the_next_character_may_undo_waits_for_it() -> None:
    """An abbreviation, an initialism, a number, a shortened word, an ellipsis, a closing
    quote or bracket or tag that may still come: the next character decides, as before."""
    for text in ("Dr.", "Ask Dr.", "The U.", "The U.S.", "At 3 p.", "At 3 p.m.", "Pi is 3.",
                 "Version 1.2.", "It is approx.", "I.", "Well...", "Wait\u2026",
                 'He said "Run!', "He said 'go.", "(See above.", "\u300c\u306f\u3044\u3002",
                 "\u4ed6\u8bf4\uff1a\u201c\u597d\u3002", "Say <strong>this!", 'He said "Run!"',
                 "Steps:\n1.", "Visit www.example."):
        splitter = SentenceSplitter()
        assert splitter.feed(text) == [], text
        assert splitter.pending == text
    splitter = SentenceSplitter()
    assert splitter.feed("Pi is 3.") == []
    assert splitter.feed("14 or so.") == ["Pi is 3.14 or so."]
    splitter = SentenceSplitter()
    assert splitter.feed("At 3 p.m.") == []
    assert splitter.feed(" yesterday") == []  # still the same sentence
    assert splitter.feed(".") == ["At 3 p.m. yesterday."]


def test_a_certain_stop_ends_a_whole_text_before_a_lowercase_word_too() -> None:
    """What a stream hands out at once, the whole text cuts too, whatever comes next; an
    end that waited for the next character is still not one before a lowercase word."""
    assert sentences("Wow! that was quick. it went") == ["Wow! ", "that was quick. ", "it went"]
    assert sentences("It is approx. five. 'Run!' he said.") == [
        "It is approx. five. ", "'Run!' he said."]


def test_a_streamed_chinese_sentence_is_handed_out_as_soon_as_it_ends() -> None:
    """The bug of issue 23: "Hello. The weather is nice today!" in Chinese, streamed, was
    never cut: the old splitter wanted a space after the ideographic full stop."""
    text = "\u4f60\u597d\u3002\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff01"
    assert token_by_token(text) == [(3, ["\u4f60\u597d\u3002"]),
                                    (10, ["\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff01"])]
    splitter = SentenceSplitter()
    assert splitter.feed("\u4ed6\u8bf4\uff1a\u201c\u597d\u3002") == []  # the quote closes yet
    assert splitter.feed("\u201d\u7136\u540e") == ["\u4ed6\u8bf4\uff1a\u201c\u597d\u3002\u201d"]
    assert splitter.flush() == ["\u7136\u540e"]


def test_an_abbreviation_is_not_an_end_even_when_streamed() -> None:
    text = "Ask Dr. Smith. Then the U.S. Army. At 3 p.m. yesterday. Done."
    cuts = token_by_token(text)
    assert [got for _, got in cuts] == [["Ask Dr. Smith."], [" Then the U.S. Army."],
                                        [" At 3 p.m. yesterday."], [" Done."]]
    # Each is handed out with its full stop, after a plain word.
    assert [end for end, _ in cuts] == [text.index(word) + len(word)
                                        for word in ("Smith.", "Army.", "yesterday.", "Done.")]


def test_a_tag_after_a_sentence_end_is_waited_for_whole() -> None:
    """Cut before the whole tag is in and a closing tag would go with the wrong words."""
    splitter = SentenceSplitter()
    assert splitter.feed("Say <strong>this</strong>. </str") == []
    assert splitter.feed("ong> now. And") == ["Say <strong>this</strong>. </strong> now. "]
    splitter = SentenceSplitter()
    assert splitter.feed("One. [lau") == []
    assert splitter.feed("ghter] two.") == ["One. ", "[laughter] two."]
    assert splitter.flush() == []


def test_streamed_text_without_a_sentence_end_is_cut_at_max_chars() -> None:
    splitter = SentenceSplitter(max_chars=50)
    words = "word " * 30
    said = splitter.feed(words)
    assert said
    assert all(len(piece) <= 50 for piece in said)
    assert all(piece.endswith(" ") for piece in said)  # between words
    assert "".join(said + splitter.flush()) == words
    cjk = SentenceSplitter(max_chars=50)
    said = cjk.feed("\u4f60" * 120)
    assert [len(piece) for piece in said] == [50, 50]
    assert cjk.pending == "\u4f60" * 20


def test_feeding_a_long_text_at_once_or_a_character_at_a_time_takes_linear_time() -> None:
    text = "This is one sentence of many, with a clause. " * 400  # 18,000 characters
    started = time.monotonic()
    assert len(streamed(text, [])) == 400
    assert len(trimmed(streamed(text, [1] * len(text)))) == 400
    assert time.monotonic() - started < 5.0


class CountedPattern:
    """A regex that counts the characters its `finditer` calls are given to look at."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.looked_at = 0

    def finditer(self, text: str, pos: int = 0, endpos: int = sys.maxsize
                 ) -> Iterator[re.Match[str]]:
        self.looked_at += max(0, min(endpos, len(text)) - pos)
        return self.pattern.finditer(text, pos, endpos)

    def __getattr__(self, name: str) -> object:
        return getattr(self.pattern, name)


@pytest.mark.parametrize(("text", "scans"), [
    ("Dr. " * 5000, 8), ("(" + "x. " * 6666, 8), ("word " * 4000, 8), ("a" * 20_000, 8),
    ("[laughter] " * 1800, 150)])  # tags: the last 80 characters are scanned again, for pauses
def test_a_stream_of_single_characters_costs_in_proportion_to_its_length(
        monkeypatch: pytest.MonkeyPatch, text: str, scans: int) -> None:
    """An ElevenLabs client sent "Dr. " a character a message, as fast as it could: each feed
    looked again at all that was pending (up to max_chars, no sentence end in it), and the
    daemon's intake stopped answering. Counted as work done (sentence ends weighed, text
    scanned for ends, tags and pauses), not as time: a feed looks at what is new."""
    weighed = 0
    ends_sentence = splitting.CutRules.ends_sentence

    def counted(rules: splitting.CutRules, match: re.Match[str]) -> bool:
        nonlocal weighed
        weighed += 1
        return ends_sentence(rules, match)

    monkeypatch.setattr(splitting.CutRules, "ends_sentence", counted)
    patterns = [CountedPattern(splitting.SENTENCE_END), CountedPattern(splitting.TAG),
                CountedPattern(pauses.PAUSE)]
    for module, name, pattern in zip((splitting, splitting, pauses),
                                     ("SENTENCE_END", "TAG", "PAUSE"), patterns, strict=True):
        monkeypatch.setattr(module, name, pattern)
    splitter = SentenceSplitter()
    said = [piece for character in text for piece in splitter.feed(character)]
    assert "".join(said + splitter.flush()) == text
    # Every max_chars a forced cut looks at 2 * max_chars again; else each character is
    # scanned once or a few times. Before, some 500 times (all that was pending), and each
    # "Dr. " weighed some 500 ends; now, each one end.
    assert weighed <= len(text) // 2
    assert sum(pattern.looked_at for pattern in patterns) <= scans * len(text)


def test_segments_use_the_same_sentences() -> None:
    """segments.py's sentence level is this splitter; its clause cut and packing stay."""
    for text, expected in CASES.values():
        if "pause" in text or "break" in text:
            continue  # a pause is a segment of its own (test_pauses)
        assert [text[start:end] for start, end in segments.spans(text, 300)] == expected
    assert segments.split("Short one. Two. " * 3, 300, pack_chars=40) == [
        "Short one. Two. Short one. Two. ", "Short one. Two. "]  # packed, as before
    assert segments.split("One, two, three, four; five six seven eight.", 20) == [
        "One, two, three, ", "four; ", "five six seven ", "eight."]  # clauses, as before


ALPHABET = st.sampled_from(["Hello", "world", "Dr.", "U.S.", "p.m.", "3.50", "1.", "I",
                            ".", "!", "?", "\u3002", "\uff01", "\u4f60", "\u597d", "\u300d",
                            "\"", "[laughter]", "<|en|>", "<strong>", "</strong>",
                            "[pause:0.5]", " ", " ", " ", "\n", "\n\n", "yes", "No"])


def _closing_tag_after_a_sentence_end(words: list[str]) -> bool:
    """A "</strong>" with only whitespace between it and a stop before it."""
    for index, word in enumerate(words):
        if word != "</strong>":
            continue
        before = index
        while before > 0 and words[before - 1].isspace():
            before -= 1
        if before < index and before > 0 and words[before - 1][-1] in ".!?\u3002\uff01":
            return True
    return False


@settings(deadline=None, max_examples=300, database=None)
@given(words=st.lists(ALPHABET, max_size=60), cuts=st.lists(st.integers(0, 12), max_size=40))
def test_any_text_streamed_in_any_pieces_is_cut_as_the_whole_text(
        words: list[str], cuts: list[int]) -> None:
    # The exception SentenceSplitter documents: "Hello." or "!" is handed out as it comes,
    # so a " </strong>" that follows, closing nothing opened in that sentence, starts the
    # next one, where the whole text keeps it with the sentence before (CI's run found one
    # such text, a run of 30,000 examples another; with them left out, 30,000 pass).
    assume(not _closing_tag_after_a_sentence_end(words))
    text = "".join(words)
    said = streamed(text, as_an_llm_cuts(text, cuts))
    assert "".join(said) == text
    assert trimmed(said) == trimmed(sentences(text))


def as_an_llm_cuts(text: str, lengths: list[int]) -> list[int]:
    """`lengths`, but never a piece that ends in ! ? . or a CJK stop when the text goes on
    with no space or with a closing mark ("a." "m", "go!" "\u201d"): an end handed out at
    once cannot take back what comes after it. An LLM's next token begins with a space."""
    ends, at = [], 0
    for length in lengths:
        at += length
        if 0 < at < len(text) and not _goes_on_after_a_stop(text, at):
            ends.append(at)
    return [end - start for start, end in zip([0, *ends], ends, strict=False)]


def _goes_on_after_a_stop(text: str, at: int) -> bool:
    closing = "\"'\u201d\u2019)]\u300d\u300f\uff09\u300b\u3011<"  # "<": a closing tag
    if text[at - 1] in ".!?":
        return not text[at].isspace()
    return text[at - 1] in "\u3002\uff01\uff1f" and text[at] in closing


# -- Wyoming, on the real daemon with the `wyoming` library's client ------------------------
def test_wyoming_streamed_chinese_is_spoken_before_synthesize_stop(
        make_daemon: DaemonFactory) -> None:
    """Each sentence is a job once it has ended: the first audio comes while the client
    still holds the stream open (the old splitter waited for synthesize-stop)."""
    daemon = make_daemon(engine={"name": "tests.engines.faulty:load"},
                         wyoming={"listen": f"tcp://127.0.0.1:{free_port()}"})
    daemon.start()
    host, port = config.load(daemon.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")
    first, second = "\u4f60\u597d\u3002", "\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff01"

    async def converse() -> tuple[list[Event], list[Event]]:
        async with AsyncTcpClient(host, int(port)) as client:
            await client.write_event(SynthesizeStart().event())
            for piece in (first, second[:2], second[2:]):
                await client.write_event(SynthesizeChunk(text=piece).event())
            before_stop = await _events_until(client, AudioStop.is_type)
            await client.write_event(SynthesizeStop().event())
            after_stop = await _events_until(client, SynthesizeStopped.is_type)
            return before_stop, after_stop

    before_stop, after_stop = asyncio.run(converse())
    assert before_stop[0].type == "audio-start"
    first_audio = b"".join(AudioChunk.from_event(e).audio for e in before_stop
                           if AudioChunk.is_type(e.type))
    # The tone engine: 50 ms a character, so this is the first sentence's audio alone.
    assert len(first_audio) / 2 / SAMPLE_RATE == pytest.approx(
        len(first) * SECONDS_PER_CHAR, abs=0.01)
    rest = b"".join(AudioChunk.from_event(e).audio for e in after_stop
                    if AudioChunk.is_type(e.type))
    assert len(rest) / 2 / SAMPLE_RATE == pytest.approx(len(second) * SECONDS_PER_CHAR,
                                                        abs=0.01)


async def _events_until(client: AsyncTcpClient, last: Callable[[str], bool]) -> list[Event]:
    events: list[Event] = []
    while not events or not last(events[-1].type):
        event = await asyncio.wait_for(client.read_event(), WYOMING_TIMEOUT_S)
        assert event is not None, "the server closed the connection"
        assert not Error.is_type(event.type), event.data
        events.append(event)
    return events
