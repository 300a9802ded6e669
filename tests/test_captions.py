"""Captions: sentence (and, from Piper, word) start and end times in a job's audio, over HTTP
(`timestamps`, a JSON reply read with the `openai` client), ZeroMQ (`timing` events read
with cosyvoiced.client) and the drop folder (`captions`: a .vtt, .srt or .captions.json
file beside the audio). The times must cover the audio: the last end within 50 ms of its
decoded length, and never going backwards."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import soundfile

from cosyvoiced import captions, config
from cosyvoiced.captions import Captions, Cue, SegmentAudio
from cosyvoiced.client import Client, DaemonError
from cosyvoiced.job import JobFailure
from cosyvoiced.jobspec import Limits, build_job
from tests.audiofile import read_audio
from tests.daemon import Daemon, free_port

RATE = 1000  # samples per second in the pure tests: a sample is a millisecond
VOICE = "en_US-joe-medium"  # the bundled Piper voice
COVER_S = 0.05  # the last end is this close to the audio's end
TEXT = ("The quick brown fox jumps over the lazy dog. It was a bright cold day in April, "
        "and the clocks were striking thirteen. Captions follow every word!")


def starts_ends(cues: list[dict[str, Any]]) -> list[float]:
    return [time for cue in cues for time in (cue["start_time"], cue["end_time"])]


def check_covers(cues: list[dict[str, Any]], duration_s: float) -> None:
    """Never backwards, and the last end is the audio's end."""
    times = starts_ends(cues)
    assert times == sorted(times), f"times go backwards: {times}"
    assert times[0] >= 0
    assert abs(times[-1] - duration_s) <= COVER_S, (times[-1], duration_s)


def check_piper_words(timed: dict[str, Any], text: str, duration_s: float) -> None:
    words = timed["words"]
    assert words is not None, "Piper aligns its audio: word times are expected"
    assert [word["word"] for word in words] == text.split()
    check_covers(words, duration_s)
    check_covers(timed["sentences"], duration_s)
    assert len(timed["sentences"]) == 3
    assert timed["sentences"][0]["text"] == "The quick brown fox jumps over the lazy dog."
    # A sentence starts no later than its first word, and the words take real time.
    assert timed["sentences"][1]["start_time"] <= words[9]["start_time"]
    assert sum(w["end_time"] - w["start_time"] for w in words) > duration_s / 2


# -- pure functions -------------------------------------------------------------------------
def test_without_alignment_sentences_share_their_segment_by_characters() -> None:
    made = [SegmentAudio("One two. Three four five six. ", 3000),
            SegmentAudio("[pause:0.5]", 500), SegmentAudio("Last.", 1000)]
    built = captions.build(made, RATE)
    assert built.words is None
    assert [(cue.text, cue.start, cue.end) for cue in built.sentences] == [
        ("One two.", 0.0, 0.875), ("Three four five six.", 0.875, 3.0), ("Last.", 3.5, 4.5)]


def test_aligned_words_place_the_words_and_the_sentence_starts() -> None:
    made = [SegmentAudio("Hello there. Bye now.", 2000,
                         ((100, 400), (450, 800), (1100, 1400), (1450, 1900)))]
    built = captions.build(made, RATE)
    assert [(cue.text, cue.start, cue.end) for cue in built.sentences] == [
        ("Hello there.", 0.0, 1.1), ("Bye now.", 1.1, 2.0)]
    assert built.words is not None
    assert [(cue.text, cue.start, cue.end) for cue in built.words] == [
        ("Hello", 0.1, 0.4), ("there.", 0.45, 0.8), ("Bye", 1.1, 1.4), ("now.", 1.45, 2.0)]


def test_aligned_words_that_overlap_or_overrun_are_clamped_forward() -> None:
    made = [SegmentAudio("a b c", 1000, ((0, 600), (500, 700), (900, 1300)))]
    built = captions.build(made, RATE)
    assert built.words is not None
    times = [t for cue in built.words for t in (cue.start, cue.end)]
    assert times == sorted(times)
    assert times[-1] == 1.0


def test_words_that_do_not_match_the_text_give_no_word_level() -> None:
    made = [SegmentAudio("In 1984 it rained.", 1000, ((0, 100), (100, 200)))]
    built = captions.build(made, RATE)
    assert built.words is None
    assert [(cue.start, cue.end) for cue in built.sentences] == [(0.0, 1.0)]


def test_webvtt_and_subrip() -> None:
    built = Captions((Cue("Hi.", 0.0, 1.25), Cue("Bye.", 1.25, 3723.5)), None)
    assert captions.to_vtt(built) == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nHi.\n\n"
                                      "00:00:01.250 --> 01:02:03.500\nBye.\n\n")
    assert captions.to_srt(built) == ("1\n00:00:00,000 --> 00:00:01,250\nHi.\n\n"
                                      "2\n00:00:01,250 --> 01:02:03,500\nBye.\n\n")
    assert json.loads(captions.render(built, "json")) == {"words": None, "sentences": [
        {"text": "Hi.", "start_time": 0.0, "end_time": 1.25},
        {"text": "Bye.", "start_time": 1.25, "end_time": 3723.5}]}


@pytest.mark.parametrize(("name", "value"), [("timestamps", "phoneme"), ("timestamps", 1),
                                             ("captions", "ass"), ("captions", True)])
def test_a_bad_timestamps_or_captions_value_is_an_invalid_field(name: str, value: Any) -> None:
    with pytest.raises(JobFailure) as failure:
        build_job({"text": "Hi.", name: value}, job_id="x", source="test", origin="x",
                  default_output="x", limits=Limits(100, "wav"),
                  known=("text", "timestamps", "captions"))
    assert (failure.value.error.code, failure.value.error.field) == ("invalid_field", name)


def test_a_job_with_captions_is_never_served_from_the_cache() -> None:
    job = build_job({"text": "Hi.", "captions": "vtt"}, job_id="x", source="test",
                    origin="x", default_output="x", limits=Limits(100, "wav"))
    assert (job.captions, job.cache) == ("vtt", False)


# -- the daemon (Piper) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = Daemon(tmp_path_factory.mktemp("captions"),
                     http={"listen": f"127.0.0.1:{free_port()}"})
    running.start()
    yield running
    running.stop()


def openai_client(daemon: Daemon) -> openai.OpenAI:
    listen = config.load(daemon.config_path).http.listen
    return openai.OpenAI(base_url=f"http://{listen}/v1", api_key="none", max_retries=0,
                         timeout=120)


def test_http_word_timestamps_cover_the_audio(daemon: Daemon) -> None:
    with openai_client(daemon) as client:
        reply = client.audio.speech.create(model="tts-1", voice=VOICE, input=TEXT,
                                           response_format="wav",
                                           extra_body={"timestamps": "word"})
    body = json.loads(reply.content)
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(body["audio"])))
    assert (body["audio_format"], body["sample_rate"]) == ("wav", rate)
    duration_s = len(samples) / rate
    assert duration_s > 5
    check_piper_words(body, TEXT, duration_s)
    assert body["timestamps"] == body["words"]  # Kokoro's captioned_speech shape


def test_http_sentence_timestamps_of_flac_cover_the_decoded_audio(daemon: Daemon) -> None:
    with openai_client(daemon) as client:
        reply = client.audio.speech.create(model="tts-1", voice=VOICE, input=TEXT,
                                           response_format="flac",
                                           extra_body={"timestamps": "sentence"})
        with pytest.raises(openai.BadRequestError) as refused:
            client.audio.speech.create(model="tts-1", voice=VOICE, input="Hi.",
                                       extra_body={"timestamps": "phoneme"})
    assert (refused.value.code, refused.value.param) == ("invalid_field", "timestamps")
    body = json.loads(reply.content)
    samples, rate = read_audio(base64.b64decode(body["audio"]))
    assert body["audio_format"] == "flac"
    check_covers(body["sentences"], len(samples) / rate)
    assert body["duration"] == pytest.approx(len(samples) / rate, abs=0.001)


def test_zmq_timing_events(daemon: Daemon) -> None:
    with Client(daemon.endpoint, timeout_s=120) as client:
        result = client.synthesize(TEXT, format="pcm_s16le", timestamps="word",
                                   sample_rate=16000)
        assert result.timing is not None
        assert result.timing["job"] == result.job
        check_piper_words(result.timing, TEXT, len(result.audio) / 2 / 16000)
        with client.stream(TEXT, timestamps="sentence") as stream:
            pcm = b"".join(stream)
        assert stream.timing is not None
        assert stream.end is not None
        check_covers(stream.timing["sentences"], len(pcm) / 2 / stream.start["sample_rate"])
        with pytest.raises(DaemonError) as refused:
            client.synthesize("Hi.", timestamps="all")
    assert (refused.value.code, refused.value.field) == ("bad_request", "timestamps")


CLOCK = r"(\d\d):(\d\d):(\d\d)[.,](\d\d\d)"


def cue_times(text: str) -> list[tuple[float, float]]:
    def seconds(parts: tuple[str, ...]) -> float:
        hours, minutes, whole, millis = map(int, parts)
        return hours * 3600 + minutes * 60 + whole + millis / 1000
    return [(seconds(found.groups()[:4]), seconds(found.groups()[4:]))
            for found in re.finditer(f"{CLOCK} --> {CLOCK}", text)]


@pytest.mark.parametrize("kind", ["vtt", "srt", "json"])
def test_drop_folder_caption_files_beside_the_audio(daemon: Daemon, kind: str) -> None:
    text = f"{TEXT} [pause:0.5] After a pause."
    daemon.drop_job(f"captioned-{kind}", text=text, captions=kind)
    record = daemon.wait_done(f"captioned-{kind}.json")
    samples, rate = soundfile.read(daemon.outbox / record["file"])
    duration_s = len(samples) / rate
    written = (daemon.outbox / f"captioned-{kind}.{captions.FILE_EXTENSIONS[kind]}").read_text()
    if kind == "json":
        timed = json.loads(written)
        assert [w["word"] for w in timed["words"]] == text.replace(" [pause:0.5]", "").split()
        cues = timed["sentences"]
    else:
        assert written.startswith("WEBVTT\n\n" if kind == "vtt" else "1\n")
        cues = [{"start_time": start, "end_time": end} for start, end in cue_times(written)]
    assert len(cues) == 4
    check_covers(cues, duration_s)
    # The pause is a gap of its length between the third sentence and the last.
    assert cues[3]["start_time"] - cues[2]["end_time"] == pytest.approx(0.5, abs=0.002)


def test_drop_folder_bad_captions_kind_fails_the_job(daemon: Daemon) -> None:
    daemon.drop_job("badly-captioned", text="Hi.", captions="ass")
    error = daemon.wait_failed("badly-captioned.json")
    assert (error["code"], error["field"]) == ("invalid_field", "captions")
