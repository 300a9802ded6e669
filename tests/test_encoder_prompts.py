"""Uploaded voice audio is decoded in the encoder process (`Encoder.read_prompt`), never in
the supervisor: the stored form comes back, bad audio gets the drop folder's codes, and a
child that dies on a file fails that upload only."""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile

from cosyvoiced.encoding import Encoder
from cosyvoiced.job import ErrorCode, JobFailure
from cosyvoiced.speakers import STORED_RATE
from tests.daemon import wait_until

TIMEOUT_S = 30.0


def audio_file(seconds: float, rate: int, channels: int = 1, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 200 * t)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([tone] * channels, axis=1), rate, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def encoder() -> Iterator[Encoder]:
    started = Encoder(lambda: None)
    started.start()
    yield started
    started.stop(10.0)


def test_a_prompt_comes_back_as_mono_flac_at_the_stored_rate(encoder: Encoder) -> None:
    stored = encoder.read_prompt(audio_file(2.0, 44100, channels=2, fmt="FLAC")).result(
        TIMEOUT_S)
    samples, rate = soundfile.read(io.BytesIO(stored), dtype="float32")
    assert rate == STORED_RATE
    assert samples.ndim == 1
    assert abs(len(samples) / rate - 2.0) < 0.01
    assert float(np.sqrt(np.mean(np.square(samples)))) > 0.1


@pytest.mark.parametrize(("data", "code"), [
    (audio_file(0.5, 16000), ErrorCode.PROMPT_AUDIO_TOO_SHORT),
    (audio_file(31.0, 8000), ErrorCode.PROMPT_AUDIO_TOO_LONG),
    (b"\x00garbage" * 1000, ErrorCode.PROMPT_AUDIO_UNREADABLE),
    (audio_file(1.5, 384000, channels=8), ErrorCode.PROMPT_AUDIO_UNREADABLE),  # 219 MiB
    (b"", ErrorCode.PROMPT_AUDIO_UNREADABLE),
])
def test_bad_audio_gets_the_drop_folders_codes(encoder: Encoder, data: bytes,
                                               code: ErrorCode) -> None:
    with pytest.raises(JobFailure) as caught:
        encoder.read_prompt(data).result(TIMEOUT_S)
    assert (caught.value.error.code, caught.value.error.field) == (code, "prompt_audio")


def test_a_child_that_dies_reading_fails_that_upload_and_the_next_one_works(
        encoder: Encoder) -> None:
    pid = encoder.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # it takes the file in hand and never answers
    doomed = encoder.read_prompt(audio_file(2.0, 16000))
    wait_until(lambda: encoder._book.in_flight is not None, TIMEOUT_S, "the read in flight")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(JobFailure) as caught:
        doomed.result(TIMEOUT_S)
    assert caught.value.error.code == ErrorCode.PROMPT_AUDIO_UNREADABLE
    assert "SIGKILL" in caught.value.error.message
    wait_until(lambda: encoder.pid not in (None, pid), TIMEOUT_S, "a new encoder child")
    assert encoder.read_prompt(audio_file(2.0, 16000)).result(TIMEOUT_S)
