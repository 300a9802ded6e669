"""Encoding results: every format at every length a job can reach, and the encoder process.

libsndfile 1.2.2's Vorbis encoder keeps a whole `write` call's frames on the stack: one call
of about 95 s at 22050 Hz (2**21 float32 frames, an 8 MiB stack) segfaults. The encoders
write in blocks; the matrix below runs each encode in a subprocess so that a crash is a
test failure naming the format and length, not a pytest crash.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import pytest
import soundfile
import structlog.testing

from cosyvoiced import audio
from cosyvoiced.encoding import FILE_STEP_FRAMES, Encoded, EncodeFailed, Encoder
from cosyvoiced.job import REPLY_FORMATS, ErrorCode, ResultAudio
from cosyvoiced.spool import StagedFile
from tests.audiofile import decode_with_ffmpeg
from tests.daemon import REPO, thread_fault, wait_until

RATE = 22050
# spool.max_text_chars = 20,000 characters at up to 0.08 s each: 1,600 s is the longest job.
LONGEST_S = 1600
MATRIX_TIMEOUT_S = 120.0
SILENCE_RMS = 0.01
DURATION_TOLERANCE_S = 0.15
UNKNOWN_FRAMES = 2**63 - 1  # what libsndfile says of a file that does not say its length


def tone(seconds: int, rate: int = RATE) -> npt.NDArray[np.float32]:
    """A speech-loud, modulated tone, built from one second so that 1,600 s costs nothing."""
    t = np.arange(rate, dtype=np.float64) / rate
    second = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return np.tile(second.astype(np.float32), seconds)


def encode_main() -> None:
    """Subprocess side of the matrix: encode each length in one call, write it to a file.

    argv: api (audio|codecs), format, rate, output folder, lengths in seconds.
    """
    api, fmt, rate, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    from cosyvoiced import audio  # noqa: PLC0415 - imported in the subprocess only
    from cosyvoiced.intake import codecs  # noqa: PLC0415
    for seconds in map(int, sys.argv[5:]):
        print(f"encoding {seconds} s", flush=True)
        samples = tone(seconds, rate)
        if api == "audio":
            data = audio.encode(samples, rate, fmt)
        else:
            stream = codecs.encoder(fmt, rate)
            data = stream.encode(samples) + stream.finish()
        (folder / f"{seconds}.{fmt}").write_bytes(data)


def decoded(path: Path, fmt: str, rate: int) -> tuple[int, int, float]:
    """(sample rate, frames, RMS) of an encoded file, read in blocks as a player would."""
    if fmt in ("pcm", "pcm_s16le"):
        pcm = np.fromfile(path, dtype="<i2").astype(np.float32) / 32767.0
        return rate, len(pcm), float(np.sqrt(np.mean(np.square(pcm)))) if len(pcm) else 0.0
    if fmt == "aac" or (fmt == "flac" and soundfile.info(path).frames == UNKNOWN_FRAMES):
        # What libsndfile does not read: AAC, and a streamed FLAC (its length unknown).
        samples, got_rate = decode_with_ffmpeg(path.read_bytes())
        return got_rate, len(samples), float(np.sqrt(np.mean(np.square(samples))))
    frames, energy = 0, 0.0
    with soundfile.SoundFile(path) as sound:
        # To the end, not to `frames`: for an MP3 without its Xing frame that is libsndfile's
        # estimate from size and bitrate (0.5 % long at 150 s).
        while len(block := sound.read(1 << 16, dtype="float32")):
            frames += len(block)
            energy += float(np.sum(np.square(block, dtype=np.float64)))
        return sound.samplerate, frames, (energy / frames) ** 0.5 if frames else 0.0


def assert_audio(path: Path, fmt: str, rate: int, seconds: float) -> None:
    got_rate, frames, rms = decoded(path, fmt, rate)
    assert got_rate == rate, f"{path.name}: {got_rate} Hz, not {rate}"
    # MP3 pads by a frame or two (LAME's delay, 0.1 s at 22050 Hz); nothing else may differ
    # by more than that.
    assert abs(frames / rate - seconds) < DURATION_TOLERANCE_S, \
        f"{path.name}: {frames / rate:.3f} s"
    assert rms > SILENCE_RMS, f"{path.name}: silent (RMS {rms:.4f})"


# Opus stops at 600 s: libopus takes 24 s for 1,600 s on a test machine's core, and 600 s
# (14.4 M frames in one call) is already seven times the length at which Vorbis crashed.
OPUS_LONGEST_S = 600
MATRIX = [("audio", fmt, RATE, (1, 150, LONGEST_S)) for fmt in
          ("wav", "flac", "ogg", "pcm_s16le")] + \
    [("codecs", fmt, rate, (1, 150, LONGEST_S)) for fmt, rate in
     (("mp3", RATE), ("aac", RATE), ("flac", RATE), ("wav", RATE), ("pcm", 24000))] + \
    [("codecs", "opus", 24000, (1, 150, OPUS_LONGEST_S))]


@pytest.mark.slow
@pytest.mark.parametrize(("api", "fmt", "rate", "lengths"), MATRIX,
                         ids=[f"{api}-{fmt}" for api, fmt, _, _ in MATRIX])
def test_every_format_encodes_every_length_in_one_call(
        tmp_path: Path, api: str, fmt: str, rate: int, lengths: tuple[int, ...]) -> None:
    run = subprocess.run(
        [sys.executable, "-c", "from tests.test_encoding import encode_main; encode_main()",
         api, fmt, str(rate), str(tmp_path), *map(str, lengths)],
        cwd=REPO, capture_output=True, text=True, timeout=MATRIX_TIMEOUT_S, check=False)
    last = run.stdout.strip().splitlines()[-1:] or ["before the first length"]
    assert run.returncode == 0, \
        f"{api} {fmt}: exit {run.returncode} while {last[0]}: {run.stderr[-2000:]}"
    for seconds in lengths:
        assert_audio(tmp_path / f"{seconds}.{fmt}", fmt, rate, seconds)


# -- the encoder process ---------------------------------------------------------------------
ENCODE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class Woken:
    """The supervisor's side of `Encoder`: wake-ups, and the outcomes drained on each."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.outcomes: dict[str, Encoded] = {}

    def wake(self) -> None:
        self.event.set()

    def wait_for(self, encoder: Encoder, *keys: str) -> dict[str, Encoded]:
        def drained() -> bool:
            self.event.clear()
            self.outcomes.update((done.key, done) for done in encoder.completed())
            return all(key in self.outcomes for key in keys)

        wait_until(drained, ENCODE_TIMEOUT_S, f"encoded {keys}")
        return self.outcomes


@pytest.fixture
def woken() -> Woken:
    return Woken()


@pytest.fixture
def encoder(woken: Woken) -> Iterator[Encoder]:
    started = Encoder(woken.wake)
    started.start()
    yield started
    started.stop(STOP_TIMEOUT_S)


def assert_encoded(tmp_path: Path, outcome: Encoded, fmt: str, rate: int,
                   seconds: float) -> None:
    assert outcome.error is None, outcome.error
    assert outcome.data is not None
    path = tmp_path / f"{outcome.key}.{fmt}"
    path.write_bytes(outcome.data)
    assert_audio(path, fmt, rate, seconds)


def kill_when_busy(encoder: Encoder, key: str, not_pid: int | None = None) -> int:
    """SIGKILL the child once it has `key` in hand; returns the pid it had."""
    pid = wait_until(lambda: encoder.busy_key() == key and encoder.pid != not_pid and
                     encoder.pid, ENCODE_TIMEOUT_S, f"the encoder busy with {key}")
    os.kill(pid, signal.SIGKILL)
    return int(pid)


@pytest.mark.parametrize("fmt", REPLY_FORMATS)
def test_encoder_encodes_files_in_its_child(
        tmp_path: Path, encoder: Encoder, woken: Woken, fmt: str) -> None:
    # 100 s: more than one block (FILE_STEP_FRAMES), and past the length that crashed Vorbis
    encoder.submit("short", ResultAudio.of(tone(2), RATE), fmt)
    encoder.submit("long", ResultAudio.of(tone(100), RATE), fmt)
    outcomes = woken.wait_for(encoder, "short", "long")
    assert_encoded(tmp_path, outcomes["short"], fmt, RATE, 2)
    assert_encoded(tmp_path, outcomes["long"], fmt, RATE, 100)


def _cut(samples: npt.NDArray[np.float32], *sizes: int) -> tuple[npt.NDArray[np.float32], ...]:
    """`samples` as the chunks a job's segments would make, of `sizes` frames then the rest."""
    bounds = np.cumsum(sizes)
    return tuple(np.split(samples, bounds))


def test_a_file_of_many_chunks_is_the_audio_they_make_one_after_another(
        encoder: Encoder, woken: Woken) -> None:
    """Blocks are joined from the chunks on the sending thread, across their edges: 100 s
    (two blocks and more) in chunks of odd sizes, one of them spanning a block's edge."""
    samples = tone(100)
    chunks = _cut(samples, 7, 333_333, FILE_STEP_FRAMES, 1, 900_001)
    encoder.submit("chunks", ResultAudio(chunks, RATE, RATE), "pcm_s16le")
    data = woken.wait_for(encoder, "chunks")["chunks"].data
    assert data is not None
    assert np.array_equal(np.frombuffer(data, dtype="<i2"), audio.to_pcm16(samples))


@pytest.mark.parametrize("fmt", ["wav", "pcm_s16le"])
def test_a_file_at_another_rate_is_resampled_in_the_child(
        encoder: Encoder, woken: Woken, fmt: str) -> None:
    """The supervisor hands the engine's audio over as it was made; the file is at the rate
    the job asked for, as long as ResultAudio.frames says, and is soxr's resampling of it."""
    samples = tone(60)
    made = ResultAudio(_cut(samples, 100_000, FILE_STEP_FRAMES - 5), RATE, 48000)
    encoder.submit("resampled", made, fmt)
    data = woken.wait_for(encoder, "resampled")["resampled"].data
    assert data is not None
    got = np.frombuffer(data, dtype="<i2") if fmt == "pcm_s16le" else \
        soundfile.read(io.BytesIO(data), dtype="int16")[0]
    if fmt == "wav":
        assert soundfile.info(io.BytesIO(data)).samplerate == 48000
    assert len(got) == made.frames == len(audio.whole(made))
    expected = audio.to_pcm16(audio.whole(made)).astype(np.int32)
    assert np.abs(got.astype(np.int32) - expected).max() <= 2  # streamed vs at once


class _SettledOn(StagedFile):
    """A staged file that says which thread fsyncs it."""

    threads: ClassVar[list[str]] = []

    def settle(self) -> None:
        self.threads.append(threading.current_thread().name)
        super().settle()


class _Unsyncable(StagedFile):
    def settle(self) -> None:
        raise OSError(28, "No space left on device")


def test_a_staged_file_is_written_by_the_child_and_fsynced_off_the_tick(
        encoder: Encoder, woken: Woken, tmp_path: Path) -> None:
    """A drop-folder result is written by the encoder process into its staged file, block
    by block (its bytes, 100 MB for a long one, never come back), and fsynced on the saving
    thread; a staged file that cannot be made or fsynced fails its result and goes, and the
    next is made."""
    written, unsynced = _SettledOn(tmp_path, "written.wav"), _Unsyncable(tmp_path, "no.wav")
    encoder.submit("uncreatable", ResultAudio.of(tone(2), RATE), "wav",
                   staging=StagedFile(tmp_path / "gone", "x.wav"))
    encoder.submit("unsynced", ResultAudio.of(tone(2), RATE), "wav", staging=unsynced)
    encoder.submit("written", ResultAudio.of(tone(100), RATE), "wav", staging=written)
    outcomes = woken.wait_for(encoder, "uncreatable", "unsynced", "written")
    for key, why in (("uncreatable", "No such file"), ("unsynced", "No space left")):
        error = outcomes[key].error
        assert error is not None
        assert error.code == ErrorCode.INTERNAL
        assert why in error.message
    assert (outcomes["written"].error, outcomes["written"].data) == (None, b"")
    assert _SettledOn.threads == ["cosyvoiced-encoder-save"]
    assert written.path is not None
    assert_audio(written.path, "wav", RATE, 100)
    assert os.listdir(tmp_path) == [written.path.name], "the unsynced one is gone"


@pytest.mark.parametrize(("fmt", "rate"), [("mp3", RATE), ("opus", 24000), ("aac", RATE),
                                           ("flac", RATE), ("wav", RATE), ("pcm", 24000)])
def test_encoder_streams_each_format(
        tmp_path: Path, encoder: Encoder, fmt: str, rate: int) -> None:
    async def stream() -> bytes:
        async with encoder.open_stream(fmt, rate) as encoding:
            pieces = [await encoding.encode(piece) for piece in np.array_split(tone(3, rate), 12)]
            return b"".join(pieces) + await encoding.finish()

    path = tmp_path / f"stream.{fmt}"
    path.write_bytes(asyncio.run(stream()))
    assert_audio(path, fmt, rate, 3)


@pytest.mark.slow
def test_a_child_killed_while_encoding_is_replaced_and_the_file_retried(
        tmp_path: Path, encoder: Encoder, woken: Woken) -> None:
    """The staged file the killed child was writing is written again from its start."""
    staged = StagedFile(tmp_path, "long.ogg")
    encoder.submit("long", ResultAudio.of(tone(LONGEST_S), RATE), "ogg", staging=staged)
    encoder.submit("behind", ResultAudio.of(tone(2), RATE), "flac")
    with structlog.testing.capture_logs() as logged:
        killed = kill_when_busy(encoder, "long")
        outcomes = woken.wait_for(encoder, "long", "behind")
    assert encoder.pid != killed
    assert (outcomes["long"].error, outcomes["long"].data) == (None, b"")
    assert staged.path is not None
    assert_audio(staged.path, "ogg", RATE, LONGEST_S)
    assert_encoded(tmp_path, outcomes["behind"], "flac", RATE, 2)
    lost = [entry for entry in logged if entry["event"] == "encoder_lost"]
    assert [(entry["key"], entry["attempt"], entry["how"]) for entry in lost] == \
        [("long", 1, "killed by SIGKILL")]


@pytest.mark.slow
def test_a_file_whose_child_dies_twice_fails_and_the_rest_go_on(
        tmp_path: Path, encoder: Encoder, woken: Woken) -> None:
    doomed_file = StagedFile(tmp_path, "doomed.ogg")
    encoder.submit("doomed", ResultAudio.of(tone(LONGEST_S), RATE), "ogg",
                   staging=doomed_file)
    encoder.submit("behind", ResultAudio.of(tone(2), RATE), "wav")
    first = kill_when_busy(encoder, "doomed")
    kill_when_busy(encoder, "doomed", not_pid=first)
    outcomes = woken.wait_for(encoder, "doomed", "behind")
    error = outcomes["doomed"].error
    assert outcomes["doomed"].data is None
    assert error is not None
    assert error.code == ErrorCode.ENCODE_FAILED
    assert "died 2 times" in error.message
    assert "ogg" in error.message
    assert "SIGKILL" in error.message
    begun = doomed_file.path
    assert begun is not None
    wait_until(lambda: not begun.exists(), 5, "what there was of it to go")
    assert_encoded(tmp_path, outcomes["behind"], "wav", RATE, 2)
    encoder.submit("next", ResultAudio.of(tone(2), RATE), "ogg")  # and it keeps serving
    assert_encoded(tmp_path, woken.wait_for(encoder, "next")["next"], "ogg", RATE, 2)


def test_an_open_stream_fails_when_the_child_dies(encoder: Encoder) -> None:
    async def scenario() -> None:
        async with encoder.open_stream("mp3", RATE) as doomed:
            await doomed.encode(tone(1))
            killed = encoder.pid
            assert killed is not None
            os.kill(killed, signal.SIGKILL)
            wait_until(lambda: encoder.pid not in (killed, None), ENCODE_TIMEOUT_S,
                       "a new encoder child")
            with pytest.raises(EncodeFailed) as failed:
                await doomed.encode(tone(1))
            assert failed.value.error.code == ErrorCode.ENCODE_FAILED
            assert "SIGKILL" in failed.value.error.message
        async with encoder.open_stream("mp3", RATE) as fresh:  # a new one works
            assert await fresh.encode(tone(1)) + await fresh.finish()

    asyncio.run(scenario())


def test_a_codec_that_refuses_fails_the_stream_not_the_child(encoder: Encoder) -> None:
    async def scenario() -> None:
        pid = encoder.pid
        async with encoder.open_stream("opus", RATE) as refused:  # Opus has no 22050 Hz
            with pytest.raises(EncodeFailed) as failed:
                await refused.encode(tone(1))
        assert failed.value.error.code == ErrorCode.ENCODE_FAILED
        assert encoder.pid == pid

    asyncio.run(scenario())


def test_a_hung_child_is_killed_and_its_file_retried(tmp_path: Path, woken: Woken) -> None:
    # The retry's clock runs from its send, through the new child's start (0.5 s idle on
    # 2 cores; 1 s was seen to run out under the whole suite's load).
    encoder = Encoder(woken.wake, step_timeout_s=4.0)
    encoder.start()
    try:
        encoder.submit("stuck", ResultAudio.of(tone(150), RATE), "ogg")
        pid = wait_until(lambda: encoder.busy_key() == "stuck" and encoder.pid,
                         ENCODE_TIMEOUT_S, "the encoder busy")
        os.kill(pid, signal.SIGSTOP)
        outcome = woken.wait_for(encoder, "stuck")["stuck"]
        assert encoder.pid != pid
        assert_encoded(tmp_path, outcome, "ogg", RATE, 150)
    finally:
        encoder.stop(STOP_TIMEOUT_S)


def test_a_child_that_stops_partway_through_a_reply_is_killed_and_its_file_retried(
        tmp_path: Path, woken: Woken, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the receiving thread watched for hung steps, between two reads: a child that
    stopped after the first bytes of a file's reply left it waiting in that read for good,
    and every file and stream behind it. The sending thread, idle while a step is in
    flight, watches too."""
    fault = thread_fault("stop_mid_reply", COSYVOICED_TEST_STOP_ONCE=str(tmp_path / "stopped-once"))
    for name, value in fault.items():
        monkeypatch.setenv(name, value)
    encoder = Encoder(woken.wake, step_timeout_s=4.0)
    encoder.start()  # the child it spawns runs tests/thread_faults/sitecustomize.py
    try:
        encoder.submit("cut-short", ResultAudio.of(tone(150), RATE), "wav")  # a 6.6 MB reply
        wait_until((tmp_path / "stopped-once").exists, ENCODE_TIMEOUT_S,
                   "the child to stop partway through its reply")
        outcome = woken.wait_for(encoder, "cut-short")["cut-short"]
        assert_encoded(tmp_path, outcome, "wav", RATE, 150)
    finally:
        encoder.stop(STOP_TIMEOUT_S)


def test_stop_returns_in_time_even_when_the_child_is_hung(woken: Woken) -> None:
    encoder = Encoder(woken.wake)
    encoder.start()
    encoder.submit("left", ResultAudio.of(tone(LONGEST_S), RATE), "ogg")
    pid = wait_until(lambda: encoder.busy_key() == "left" and encoder.pid, ENCODE_TIMEOUT_S,
                     "the encoder busy")
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    encoder.stop(2.0)
    assert time.monotonic() - started < 2.5
    assert not encoder.alive()
    outcome = encoder.completed()
    assert [(done.key, done.error and done.error.code) for done in outcome] == \
        [("left", ErrorCode.SHUTTING_DOWN)]
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 5.0, "the hung child reaped")
