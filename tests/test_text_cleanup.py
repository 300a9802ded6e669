"""Text clean-up before synthesis: markdown read as prose, emoji dropped, URLs as their host;
on by default in every intake, off with `normalize: false` (and `spool.normalize` for the
drop folder's .txt). Units on `cleanup.clean`, then the real daemon: the tone engine's 50 ms
a character tells what text reached it, and Piper's speech, heard by pocketsphinx (as the
benchmarks hear it), has no "asterisk" and no URL in it."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
import soundfile
import soxr
from pocketsphinx import Decoder
from wyoming.audio import AudioChunk, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from cosyvoiced import cleanup, config
from cosyvoiced.client import Client
from cosyvoiced.job import JobFailure
from cosyvoiced.jobspec import Limits, build_job, check_text
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port
from tests.engines.faulty import SAMPLE_RATE, SECONDS_PER_CHAR

TONE = "tests.engines.faulty:load"
LIMITS = Limits(max_text_chars=20_000, default_format="wav")


# -- cleanup.clean ----------------------------------------------------------------------------
@pytest.mark.parametrize(("markdown", "prose"), [
    ("Some **bold** and *italic* and __strong__ and ~~struck~~ words.",
     "Some bold and italic and strong and struck words."),
    ("Read [the guide](https://example.com/guide) first.", "Read the guide first."),
    ("# Title\n\nBody text.", "Title.\n\nBody text."),
    ("## Done!\nYes.", "Done!\n\nYes."),
    ("Buy:\n\n- milk\n- **eggs**\n- bread.", "Buy:\n\nmilk.\neggs.\nbread."),
    ("Steps:\n\n1. Open it\n2. Close it", "Steps:\n\n1. Open it.\n2. Close it."),
    ("| Name | Age |\n|------|-----|\n| Ann | 30 |\n| Bo | 4 |",
     "Name, Age.\nAnn, 30.\nBo, 4."),
    ("Run this:\n\n```python\nprint('hi')\n```\n\nThen stop.", "Run this:\n\nThen stop."),
    ("Call `make test` now.", "Call make test now."),
    ("An image ![a cat](cat.png) here, <b>bold</b> too.", "An image here, bold too."),
    ("> Quoted words.\n\nAfter.", "Quoted words.\n\nAfter."),
    ("Left **open", "Left open"),  # emphasis a streamed text left open
    ("\u6211\u4eec**\u4eca\u5929**\u53bb\u516c\u56ed\u3002",
     "\u6211\u4eec\u4eca\u5929\u53bb\u516c\u56ed\u3002"),
])
def test_markdown_is_read_as_prose(markdown: str, prose: str) -> None:
    assert cleanup.clean(markdown) == prose


@pytest.mark.parametrize(("text", "expected"), [
    ("Great job \U0001f44d see you \U0001f389!", "Great job see you !"),
    ("Family \U0001f468\u200d\U0001f469\u200d\U0001f467 and \U0001f1eb\U0001f1f7 flag.",
     "Family and flag."),
    ("Thumbs \U0001f44d\U0001f3fd up.", "Thumbs up."),
    ("\u2764\ufe0f Love it", "Love it"),
])
def test_emoji_are_dropped(text: str, expected: str) -> None:
    assert cleanup.clean(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("See https://www.example.com/a/b_c?d=1&e=2#top for more.", "See example.com for more."),
    ("Go to http://docs.python.org/3/library/re.html.", "Go to docs.python.org."),
    ("Visit www.github.com/foo, then rest.", "Visit github.com, then rest."),
    ("Link: <https://example.org/x_y_z>", "Link: example.org"),
    ("[https://example.net/long/path](https://example.net/long/path)", "example.net"),
    ("Mail me at HTTPS://Sub.Example.COM:8443/x", "Mail me at sub.example.com"),
])
def test_urls_are_read_as_their_host(text: str, expected: str) -> None:
    assert cleanup.clean(text) == expected


def test_plain_text_is_left_exactly_as_it_was() -> None:
    text = ("  An indented line, kept as written.\n\n\nThree line breaks; *not* in a pair? "
            "No: 3 < 5 and 6 > 2, a_b_c, 50% off, #1 and C# too.\n\tTabbed.\n")
    assert cleanup.clean(text.replace("*not*", "not")) == text.replace("*not*", "not")
    assert cleanup.clean("Hello there.\n") == "Hello there.\n"


def test_engine_tags_and_pauses_pass_through_untouched() -> None:
    text = ("<|en|>**Hello** [laughter] there. <strong>Yes</strong> [pause:0.8] "
            "<break time=\"800ms\"/> [breath] *done* <|endofprompt|>")
    assert cleanup.clean(text) == ("<|en|>Hello [laughter] there. <strong>Yes</strong> "
                                   "[pause:0.8] <break time=\"800ms\"/> [breath] done "
                                   "<|endofprompt|>")


HOSTILE = ["[", "*a", "> ", "- ", "[a](", "<a ", "`", "_a", "![", "[a", "[](", "a*b*",
           "|\n", "1. ", "&#", "<", "\\", "[pause:1]", "[x](y) ", "www.a", "\ue000",
           "\U0001f600", "<|en|>", "#" * 7 + " ", "```\n", "[[]]"]


@pytest.mark.parametrize("unit", HOSTILE)
def test_hostile_markdown_at_the_length_limit_is_cleaned_in_bounded_time(unit: str) -> None:
    """It runs in the supervisor's thread: 20,000 characters of the worst we found take
    well under a second, and nothing raises."""
    text = (unit * (20_000 // len(unit) + 1))[:20_000]
    started = time.monotonic()
    cleaned = cleanup.clean(text)
    assert time.monotonic() - started < 2.0
    assert isinstance(cleaned, str)


def test_a_failure_inside_falls_back_to_the_raw_text(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_text: str) -> list[Any]:
        raise RecursionError("a parser bug (a test double)")

    monkeypatch.setattr(cleanup._MARKDOWN, "parse", broken)
    assert cleanup.clean("**Hello** world") == "**Hello** world"


# -- validation -----------------------------------------------------------------------------
def _job(**fields: Any) -> str:
    return build_job(fields, job_id="j", source="zmq", origin="j", default_output="j",
                     limits=LIMITS).text


def test_normalize_is_on_by_default_and_off_per_request() -> None:
    assert _job(text="**Hi** \U0001f600 https://x.org/a") == "Hi x.org"
    assert _job(text="**Hi** \U0001f600", normalize=True) == "Hi"
    assert _job(text="**Hi** \U0001f600", normalize=False) == "**Hi** \U0001f600"
    with pytest.raises(JobFailure) as wrong:
        _job(text="Hi", normalize="no")
    assert (wrong.value.error.code, wrong.value.error.field) == ("invalid_field", "normalize")


def test_a_text_with_nothing_left_to_say_is_empty_text() -> None:
    with pytest.raises(JobFailure) as empty:
        check_text("\U0001f600 \U0001f389\n```\ncode\n```", LIMITS)
    assert empty.value.error.code == "empty_text"
    assert "normalize: false" in empty.value.error.message
    assert check_text("\U0001f600", LIMITS, normalize=False) == "\U0001f600"


# -- the daemon: every intake -----------------------------------------------------------------
MARKED = "**Hello** world \U0001f600"  # cleaned: "Hello world", 11 characters
CLEANED_S = len("Hello world") * SECONDS_PER_CHAR
RAW_S = len(MARKED) * SECONDS_PER_CHAR


@pytest.fixture(scope="module")
def tone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = Daemon(tmp_path_factory.mktemp("cleanup"), engine={"name": TONE},
                     http={"listen": f"127.0.0.1:{free_port()}"},
                     wyoming={"listen": f"tcp://127.0.0.1:{free_port()}"})
    running.start()
    yield running
    running.stop()


def _seconds(pcm: bytes, rate: int = SAMPLE_RATE) -> float:
    return len(pcm) / 2 / rate


def test_zmq_cleans_up_unless_told_not_to(tone: Daemon) -> None:
    with Client(tone.endpoint, timeout_s=60) as client:
        cleaned = client.synthesize(MARKED, format="pcm_s16le")
        raw = client.synthesize(MARKED, format="pcm_s16le", normalize=False)
    assert _seconds(cleaned.audio) == pytest.approx(CLEANED_S, abs=0.01)
    assert _seconds(raw.audio) == pytest.approx(RAW_S, abs=0.01)


def test_http_cleans_up_unless_told_not_to(tone: Daemon) -> None:
    listen = config.load(tone.config_path).http.listen
    with openai.OpenAI(base_url=f"http://{listen}/v1", api_key="none", max_retries=0,
                       timeout=60) as client:
        cleaned = client.audio.speech.create(model="tts-1", voice="tone", input=MARKED,
                                             response_format="pcm")
        raw = client.audio.speech.create(model="tts-1", voice="tone", input=MARKED,
                                         response_format="pcm", extra_body={"normalize": False})
    assert _seconds(cleaned.content, 24000) == pytest.approx(CLEANED_S, abs=0.01)
    assert _seconds(raw.content, 24000) == pytest.approx(RAW_S, abs=0.01)


def test_drop_folder_cleans_up_unless_told_not_to(tone: Daemon) -> None:
    tone.drop("marked.txt", MARKED)
    tone.drop_job("marked-json", text=MARKED)
    tone.drop_job("raw-json", text=MARKED, normalize=False)
    for name, seconds in (("marked.txt", CLEANED_S), ("marked-json.json", CLEANED_S),
                          ("raw-json.json", RAW_S)):
        tone.wait_done(name)
        info = soundfile.info(tone.outbox / f"{name.rsplit('.', 1)[0]}.wav")
        assert info.duration == pytest.approx(seconds, abs=0.01), name


def test_wyoming_cleans_up(tone: Daemon) -> None:
    host, port = config.load(tone.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")

    async def speak() -> bytes:
        async with AsyncTcpClient(host, int(port)) as client:
            await client.write_event(Synthesize(text=MARKED).event())
            pcm = b""
            while True:
                event = await asyncio.wait_for(client.read_event(), 60)
                assert event is not None
                assert event.type != "error", event.data
                if AudioChunk.is_type(event.type):
                    pcm += AudioChunk.from_event(event).audio
                elif AudioStop.is_type(event.type):
                    return pcm

    assert _seconds(asyncio.run(speak())) == pytest.approx(CLEANED_S, abs=0.01)


def test_wyoming_streamed_text_leaves_out_a_sentence_with_nothing_to_say(tone: Daemon) -> None:
    """An LLM's reply that ends in an emoji: that last "sentence" is no job (it would fail
    with empty_text and the client would see an error for a good stream)."""
    host, port = config.load(tone.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")

    async def stream() -> list[str]:
        async with AsyncTcpClient(host, int(port)) as client:
            await client.write_event(SynthesizeStart().event())
            for piece in ("Hello there. ", "\U0001f600 ", "```"):
                await client.write_event(SynthesizeChunk(text=piece).event())
            await client.write_event(SynthesizeStop().event())
            types: list[str] = []
            while not types or types[-1] not in ("synthesize-stopped", "error"):
                event = await asyncio.wait_for(client.read_event(), 60)
                assert event is not None
                types.append(event.type)
            return types

    types = asyncio.run(stream())
    assert "error" not in types
    assert types.count("audio-start") == 1


def test_spool_normalize_false_reads_txt_files_as_written(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine={"name": TONE}, spool={"normalize": False})
    daemon.start()
    daemon.drop("raw.txt", MARKED)
    daemon.drop_job("cleaned", text=MARKED)  # a JSON job still cleans up unless it says not
    for name, seconds in (("raw.txt", RAW_S), ("cleaned.json", CLEANED_S)):
        daemon.wait_done(name)
        info = soundfile.info(daemon.outbox / f"{name.rsplit('.', 1)[0]}.wav")
        assert info.duration == pytest.approx(seconds, abs=0.01), name


# -- what Piper says, heard ---------------------------------------------------------------------
MARKDOWN_HEAVY = """# Shopping list

Please buy **three apples** and *fresh bread*. Read the notes at \
https://www.example.com/shop/items?id=42 before you go.

- **milk**
- `eggs`
"""
URL_WORDS = {"slash", "colon", "http", "https", "h", "t", "p", "w", "asterisk", "asterisks"}


def heard(pcm: bytes, rate: int) -> list[str]:
    """pocketsphinx's transcript, with its bundled English model (as bench/pool.py)."""
    decoder = Decoder(samprate=16000, loglevel="FATAL")
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    decoder.start_utt()
    decoder.process_raw((soxr.resample(audio, rate, 16000) * 32767).astype("<i2").tobytes(),
                        full_utt=True)
    decoder.end_utt()
    return re.findall(r"[a-z']+", decoder.hyp().hypstr.lower() if decoder.hyp() else "")


@pytest.mark.slow
def test_asr_hears_no_asterisk_and_no_url_once_cleaned_up(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()  # Piper, the default voice
    daemon.start()
    with Client(daemon.endpoint, timeout_s=120) as client:
        raw = client.synthesize(MARKDOWN_HEAVY, format="pcm_s16le", normalize=False)
        cleaned = client.synthesize(MARKDOWN_HEAVY, format="pcm_s16le")
    raw_words = heard(raw.audio, raw.sample_rate)
    cleaned_words = heard(cleaned.audio, cleaned.sample_rate)
    # Read as written, the marks are heard: the check can hear them.
    assert "asterisk" in raw_words, raw_words
    # The URL read as written: pocketsphinx heard neither "slash" nor "colon" in one take of
    # a full run (Piper's noise), so any of its spelled-out words will do.
    assert (URL_WORDS - {"asterisk", "asterisks"}) & set(raw_words), raw_words
    assert not URL_WORDS & set(cleaned_words), cleaned_words
    # Piper's noise makes each take differ, and pocketsphinx misses a word now and then
    # ("eggs" once in a fresh-clone run): the words are heard, at most one missed.
    content = {"three", "apples", "bread", "example", "eggs"}
    assert len(content & set(cleaned_words)) >= len(content) - 1, cleaned_words
    assert len(cleaned.audio) < 0.6 * len(raw.audio)
