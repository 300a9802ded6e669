"""The one sentence splitter, whole and streamed: English, Chinese and Japanese, abbreviations,
numbers with dots, engine tags and pauses; streamed text is cut where the whole text is,
however it was cut into pieces. Pure functions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wyoming.audio import AudioChunk, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from cosyvoiced import config, segments
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
    assert streamed(text, [1] * len(text)) == expected  # a character at a time
    assert streamed(text, [3, 5, 7] * len(text)) == expected
    assert streamed(text, []) == expected  # all at once


def test_a_streamed_chinese_sentence_is_handed_out_as_soon_as_the_next_one_begins() -> None:
    """The bug of issue 23: "Hello. The weather is nice today!" in Chinese, streamed, was
    never cut: the old splitter wanted a space after the ideographic full stop."""
    text = "\u4f60\u597d\u3002\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff01"
    assert token_by_token(text) == [(4, ["\u4f60\u597d\u3002"])]
    splitter = SentenceSplitter()
    assert splitter.feed("\u4f60\u597d\u3002") == []  # a closing quote may still come
    assert splitter.feed("\u4eca\u5929") == ["\u4f60\u597d\u3002"]
    assert splitter.feed("\u5929\u6c14\u5f88\u597d\uff01") == []
    assert splitter.flush() == ["\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff01"]


def test_an_abbreviation_is_not_an_end_even_when_streamed() -> None:
    text = "Ask Dr. Smith. Then the U.S. Army. At 3 p.m. yesterday. Done."
    cuts = token_by_token(text)
    assert [got for _, got in cuts] == [["Ask Dr. Smith. "], ["Then the U.S. Army. "],
                                        ["At 3 p.m. yesterday. "]]
    # Each is handed out when the first letter of the next sentence arrives.
    assert [end for end, _ in cuts] == [text.index(word) + 1
                                        for word in ("Then", "At", "Done")]


def test_a_tag_after_a_sentence_end_is_waited_for_whole() -> None:
    """Cut before the whole tag is in and a closing tag would go with the wrong words."""
    splitter = SentenceSplitter()
    assert splitter.feed("Say <strong>this</strong>. </str") == []
    assert splitter.feed("ong> now. And") == ["Say <strong>this</strong>. </strong> now. "]
    splitter = SentenceSplitter()
    assert splitter.feed("One. [lau") == []
    assert splitter.feed("ghter] two.") == ["One. "]
    assert splitter.flush() == ["[laughter] two."]


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
    assert len(streamed(text, [1] * len(text))) == 400
    assert time.monotonic() - started < 5.0


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


@settings(deadline=None, max_examples=300, database=None)
@given(words=st.lists(ALPHABET, max_size=60), cuts=st.lists(st.integers(0, 12), max_size=40))
def test_any_text_streamed_in_any_pieces_is_cut_as_the_whole_text(
        words: list[str], cuts: list[int]) -> None:
    text = "".join(words)
    assert streamed(text, cuts) == sentences(text) if text else streamed(text, cuts) == []


# -- Wyoming, on the real daemon with the `wyoming` library's client ------------------------
def test_wyoming_streamed_chinese_is_spoken_before_synthesize_stop(
        make_daemon: DaemonFactory) -> None:
    """Each sentence is a job once the next begins: the first audio comes while the client
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
