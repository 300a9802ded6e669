"""Streamed MP3, Opus, AAC and FLAC over HTTP (FFmpeg's encoders, in the encoder process),
with the official `openai` client: the first bytes come after the first chunk, long before
the job ends, and the whole body decodes to the audio a WAV of the same request holds."""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest

from cosyvoiced import config
from tests.audiofile import read_audio
from tests.daemon import Daemon, free_port

# The tone engine makes the first sentence at once and the second one SLOW_S later.
SLOW_S = 3.0
TEXT = f"The first sentence comes at once. Then SLOW@{SLOW_S:g} makes this one wait."
RATES = {"mp3": 22050, "opus": 24000, "aac": 22050, "flac": 22050}
CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
                 "flac": "audio/flac"}
# Codec delay and padding: MP3 (no Xing frame to trim it) and AAC (ADTS has no priming
# info) add a frame or two.
DURATION_TOLERANCE_S = 0.15


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    daemon = Daemon(tmp_path_factory.mktemp("formats"),
                    engine={"name": "tests.engines.faulty:load"},
                    http={"listen": f"127.0.0.1:{free_port()}"})
    daemon.start()
    listen = config.load(daemon.config_path).http.listen
    try:
        with openai.OpenAI(base_url=f"http://{listen}/v1", api_key="any", max_retries=0,
                           timeout=60) as connected:
            yield connected
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def wav_seconds(client: openai.OpenAI) -> float:
    """How long the speech is, from a WAV of the same text."""
    reply = client.audio.speech.create(model="tts-1", voice="tone", input=TEXT,
                                       response_format="wav")
    samples, rate = read_audio(reply.content)
    return len(samples) / rate


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac"])
def test_a_streamed_format_sends_its_first_bytes_after_the_first_chunk(
        client: openai.OpenAI, wav_seconds: float, fmt: str) -> None:
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="tone", input=TEXT,
            response_format=fmt) as reply:  # type: ignore[arg-type]
        assert reply.headers["content-type"] == CONTENT_TYPES[fmt]
        pieces = reply.iter_bytes()
        body = bytearray(next(piece for piece in pieces if piece))
        first_at = time.monotonic()
        for piece in pieces:
            body += piece
        ended_at = time.monotonic()
    # The first sentence's bytes came while the second was still being made.
    assert ended_at - first_at > SLOW_S - 1.0, f"{fmt}: first bytes only at the end"
    samples, rate = read_audio(bytes(body))
    assert rate == RATES[fmt]
    assert abs(len(samples) / rate - wav_seconds) < DURATION_TOLERANCE_S, \
        f"{fmt}: {len(samples) / rate:.3f} s, the WAV {wav_seconds:.3f} s"
