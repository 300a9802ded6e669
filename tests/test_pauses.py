"""Pauses in the text: `[pause:0.8]` and `<break time="800ms"/>` are silence of that length,
to the sample, in every intake's audio, and never reach the engine. The tone engine makes
50 ms of tone a character, so the tone's length tells what text reached it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import openai
import pytest
import soundfile
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.tts import Synthesize

from cosyvoiced import config, pauses, segments
from cosyvoiced.client import Client, DaemonError
from cosyvoiced.job import JobFailure
from cosyvoiced.jobspec import Limits, check_text
from tests.daemon import Daemon, free_port
from tests.engines.faulty import SAMPLE_RATE, SECONDS_PER_CHAR
from tests.test_segments_markup import SEPARATORS, VOCABULARY, check, forbidden_cuts

TONE = "tests.engines.faulty:load"
LIMITS = Limits(max_text_chars=1000, default_format="wav")
Pcm = npt.NDArray[np.int16]


# -- pure functions -------------------------------------------------------------------------
@pytest.mark.parametrize(("tag", "seconds"), [
    ("[pause:0.8]", 0.8), ("[pause:1]", 1.0), ("[PAUSE:2.5]", 2.5), ("[pause:800ms]", 0.8),
    ("[pause: 0.25 s]", 0.25), ("<break time=\"800ms\"/>", 0.8),
    ("<break time='1.5s'/>", 1.5), ("<break time=\"300ms\">", 0.3),
    ("<BREAK TIME=\"2s\" />", 2.0), ("[pause:0]", 0.0)])
def test_a_pause_tag_says_its_length(tag: str, seconds: float) -> None:
    assert pauses.length_s(tag) == pytest.approx(seconds)
    assert pauses.of_segment(f" {tag} ") == pytest.approx(seconds)
    check_text(f"Wait. {tag} Go.", LIMITS)  # valid


@pytest.mark.parametrize(("text", "problem"), [
    ("Wait. [pause:10.5] Go.", "is 10.5 s; a pause may be at most 10 s"),
    ("Wait. <break time=\"11000ms\"/> Go.", "is 11 s"),
    ("Wait. [pause:abc] Go.", "has no length"),
    ("Wait. [pause:] Go.", "has no length"),
    ("Wait. <break time=\"800\"/> Go.", "has no length"),  # SSML names the unit
    ("Wait. <break/> Go.", "has no length"),
])
def test_a_pause_too_long_or_without_a_length_is_an_invalid_field(text: str,
                                                                    problem: str) -> None:
    with pytest.raises(JobFailure) as failure:
        check_text(text, LIMITS)
    assert failure.value.error.code == "invalid_field"
    assert failure.value.error.field == "text"
    assert problem in failure.value.error.message
    assert "at character 6" in failure.value.error.message


def test_each_pause_is_a_segment_of_its_own_and_carries_nothing() -> None:
    text = "<|en|>One two. [pause:0.8] Three. <break time=\"1s\"/> [pause:0.5]Four."
    split = segments.split(text, 300, first_words=0, pack_chars=300)
    assert split == ["<|en|>One two. ", "[pause:0.8]", "<|en|> Three. ",
                     "<break time=\"1s\"/> ", "[pause:0.5]", "<|en|>Four."]
    assert [pauses.of_segment(s) for s in split] == [None, 0.8, None, 1.0, 0.5, None]
    assert "".join(text[a:b] for a, b in segments.spans(text, 300, 3, 300)) == text


@pytest.mark.parametrize("seed", range(200))
def test_random_texts_with_pauses_keep_every_invariant_and_no_pause_is_spoken(
        seed: int) -> None:
    pick = random.Random(seed)
    vocabulary = (*VOCABULARY, "[pause:0.5]", "<break time=\"200ms\"/>", "[pause:1]")
    text = "".join(pick.choice(vocabulary) + pick.choice(SEPARATORS)
                   for _ in range(pick.randrange(1, 120)))
    max_chars, first_words, pack_chars = (pick.choice((30, 40, 300)), pick.choice((0, 3)),
                                          pick.choice((0, 60, 120)))
    # A pause is cut off even where it stands between an engine tag and its word (the
    # writer put it there); everywhere else tags stay with their words.
    split = check(text, max_chars, first_words, pack_chars, glue=False)
    spans = segments.spans(text, max_chars, first_words, pack_chars)
    at_pauses = {edge for (start, end), segment in zip(spans, split, strict=True)
                 if pauses.of_segment(segment) is not None for edge in (start, end)}
    cuts = {start for start, _ in spans[1:]}
    assert not (cuts - at_pauses) & forbidden_cuts(text, max_chars)
    tags = [tag.group() for tag in pauses.found(text)]
    assert [s.strip() for s in split if pauses.of_segment(s) is not None] == tags
    assert not any(pauses.PAUSE.search(s) for s in split if pauses.of_segment(s) is None)


def test_a_text_of_only_a_pause_is_one_silent_segment() -> None:
    assert segments.split("  [pause:1.5]\n", 300) == ["  [pause:1.5]\n"]
    assert pauses.of_segment("  [pause:1.5]\n") == 1.5
    assert len(pauses.silence(1.5, 22050)) == 33075


# -- the daemon -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("pauses")
    running = Daemon(root, engine={"name": TONE},
                     http={"listen": f"127.0.0.1:{free_port()}"},
                     wyoming={"listen": f"tcp://127.0.0.1:{free_port()}"})
    running.start()
    yield running
    running.stop()


def silences(pcm: Pcm) -> list[int]:
    """The lengths of the runs of exact zeros in the audio, in samples, longest first."""
    zero = np.concatenate(([False], pcm == 0, [False]))
    edges = np.flatnonzero(np.diff(zero.astype(np.int8)))
    return sorted((edges[1::2] - edges[0::2]).tolist(), reverse=True)


def check_pause(pcm: Pcm, rate: int, pause_s: float, spoken: str) -> None:
    """One pause of `pause_s`, to the sample (the tone itself starts on a zero sample), and
    tone for `spoken` only: the pause tag did not reach the engine."""
    runs = silences(pcm)
    assert abs(runs[0] - round(pause_s * rate)) <= 1, (runs[:3], pause_s * rate)
    assert runs[1] <= 2, f"a second silence: {runs[:3]}"  # one pause only
    tone_s = (len(pcm) - runs[0]) / rate
    assert tone_s == pytest.approx(len(spoken) * SECONDS_PER_CHAR, abs=0.02), \
        "the tone is longer than the words: the pause tag was spoken"


def test_zmq_pause_is_silence_of_that_length(daemon: Daemon) -> None:
    with Client(daemon.endpoint, timeout_s=60) as client:
        result = client.synthesize("One. [pause:0.8] Two.", format="pcm_s16le")
        assert result.sample_rate == SAMPLE_RATE
        check_pause(np.frombuffer(result.audio, "<i2"), SAMPLE_RATE, 0.8, "One.Two.")
        # At another rate the silence is made at that rate: still to the sample.
        resampled = client.synthesize("One. [pause:0.8] Two.", format="pcm_s16le",
                                      sample_rate=16000)
        check_pause(np.frombuffer(resampled.audio, "<i2"), 16000, 0.8, "One.Two.")
        # Streamed, in chunks as they are made.
        with client.stream("Three. <break time=\"1250ms\"/> Four.") as stream:
            pcm = np.frombuffer(b"".join(stream), "<i2")
        check_pause(pcm, SAMPLE_RATE, 1.25, "Three.Four.")


def test_zmq_pause_over_ten_seconds_is_refused(daemon: Daemon) -> None:
    with Client(daemon.endpoint, timeout_s=60) as client, \
            pytest.raises(DaemonError) as refused:
        client.synthesize("One. [pause:12] Two.", format="pcm_s16le")
    # ZeroMQ's code for a bad field (README: ZeroMQ), naming it
    assert (refused.value.code, refused.value.field) == ("bad_request", "text")
    assert "at most 10 s" in refused.value.message


def test_drop_folder_pause_is_silence_of_that_length(daemon: Daemon) -> None:
    daemon.drop("paused.txt", "Before. [pause:1.5] After.")
    daemon.wait_done("paused.txt")
    pcm, rate = soundfile.read(daemon.outbox / "paused.wav", dtype="int16")
    check_pause(pcm, rate, 1.5, "Before.After.")
    daemon.drop_job("broken", text="Before. <break time=\"20s\"/> After.")
    _, error = daemon.wait_outcome("broken.json")
    assert (error["code"], error["field"]) == ("invalid_field", "text")


def test_http_pause_is_silence_of_that_length(daemon: Daemon) -> None:
    listen = config.load(daemon.config_path).http.listen
    with openai.OpenAI(base_url=f"http://{listen}/v1", api_key="none", max_retries=0,
                       timeout=60) as client:
        reply = client.audio.speech.create(model="tts-1", voice="tone", response_format="pcm",
                                           input="Hello. [pause:0.6] World.")
        check_pause(np.frombuffer(reply.content, "<i2"), 24000, 0.6, "Hello.World.")
        with pytest.raises(openai.BadRequestError) as refused:
            client.audio.speech.create(model="tts-1", voice="tone", input="Hi [pause:11]")
    assert refused.value.code == "invalid_field"


def test_wyoming_pause_is_silence_of_that_length(daemon: Daemon) -> None:
    host, port = config.load(daemon.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")

    async def speak(text: str) -> tuple[bytes, int] | Error:
        async with AsyncTcpClient(host, int(port)) as client:
            await client.write_event(Synthesize(text=text).event())
            pcm, rate = b"", 0
            while True:
                event = await asyncio.wait_for(client.read_event(), 60)
                assert event is not None
                if AudioStart.is_type(event.type):
                    rate = AudioStart.from_event(event).rate
                elif AudioChunk.is_type(event.type):
                    pcm += AudioChunk.from_event(event).audio
                elif AudioStop.is_type(event.type):
                    return pcm, rate
                elif Error.is_type(event.type):
                    return Error.from_event(event)

    spoken = asyncio.run(speak("Yes. [pause:0.7] No."))
    assert isinstance(spoken, tuple)
    check_pause(np.frombuffer(spoken[0], "<i2"), spoken[1], 0.7, "Yes.No.")
    refused = asyncio.run(speak("Yes. [pause:10.01] No."))
    assert isinstance(refused, Error)
    assert refused.code == "invalid_field"


def test_a_pause_costs_no_synthesis_time(daemon: Daemon) -> None:
    """Ten seconds of silence are made at once: the job's synthesis time is the words'."""
    with Client(daemon.endpoint, timeout_s=60) as client:
        result = client.synthesize("[pause:10]", format="pcm_s16le")
    assert len(result.audio) == 2 * 10 * SAMPLE_RATE
    assert not np.frombuffer(result.audio, "<i2").any()
    assert float(result.header["synth_s"]) < 1.0
