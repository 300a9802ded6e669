"""Fault-injecting engines for the supervision tests. They live under tests/ and are never
shipped: a test config selects one with `engine.name = "tests.engines.faulty:load"`.

The tone engine speaks a sine tone, 50 ms per character, one chunk per sentence. Words in a
sentence inject faults while that sentence is "synthesized":

    HANG                 sleep forever (the heartbeat thread keeps beating)
    HANG_ONCE@<path>     hang unless <path> exists (created first), so a retry succeeds
    ABORT                os.abort(): the worker dies on SIGABRT
    LEAK                 keep 64 MiB more resident memory, for good
    SLOW@<seconds>       take that long over the sentence
    THREAD               start a thread that raises (as an engine library's may)
    KILL_DAEMON          SIGKILL the supervisor (this worker's parent), as a native crash
                         in the daemon would end it
    FAIL_STREAM          raise: the segment fails (alone, in the batched tone engine)

The batched tone engine (`load_batched`) makes up to 4 segments at once, as CosyVoice2/3's
batched decoder does: each step makes the next sentence of every open stream, so a fault
in one sentence holds every stream, as a batched step would.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile

from cosyvoiced import logs
from cosyvoiced.config import EngineConfig
from cosyvoiced.engines import AudioChunk, StreamOutput, SynthesisRequest, VoiceInfo
from cosyvoiced.job import ErrorCode, JobFailure
from cosyvoiced.prompt import read_prompt
from cosyvoiced.speakers import STORED_RATE, SpeakerStore

SAMPLE_RATE = 22050
SECONDS_PER_CHAR = 0.05
LEAK_BYTES = 64 << 20


class ToneEngine:
    name = "faulty"
    features: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self._leaked: list[np.ndarray[tuple[int], np.dtype[np.uint8]]] = []

    def voices(self) -> list[VoiceInfo]:
        return [VoiceInfo("tone", "en-us", SAMPLE_RATE, self.name)]

    def default_voice(self) -> str:
        return "tone"

    def sample_rate(self, voice: str | None) -> int:
        return SAMPLE_RATE

    def synthesize(self, request: SynthesisRequest) -> Iterator[AudioChunk]:
        if request.voice != "tone":
            raise JobFailure(ErrorCode.UNKNOWN_VOICE, f"voice: {request.voice!r} is not "
                             "available; choose one of: tone", "voice")
        for sentence in filter(None, (s.strip() for s in re.split(r"(?<=\.)\s", request.text))):
            self._inject(sentence)
            seconds = len(sentence) * SECONDS_PER_CHAR / request.speed
            t = np.arange(int(seconds * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE
            yield (0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)

    def _inject(self, sentence: str) -> None:
        once = re.search(r"HANG_ONCE@(\S+?)\.?$", sentence)
        slow = re.search(r"SLOW@([\d.]+)", sentence)
        if once:
            marker = Path(once.group(1))
            if not marker.exists():
                marker.touch()
                time.sleep(3600)
        elif "HANG" in sentence:
            time.sleep(3600)
        if "ABORT" in sentence:
            os.abort()
        if "KILL_DAEMON" in sentence:
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(3600)  # PDEATHSIG ends this worker with its parent
        if "LEAK" in sentence:
            self._leaked.append(np.ones(LEAK_BYTES, dtype=np.uint8))  # touched: resident
        if slow:
            time.sleep(float(slow.group(1)))
        if "FAIL_STREAM" in sentence:
            raise RuntimeError("this stream failed (a test double)")
        if "THREAD" in sentence:
            failing = threading.Thread(target=_fail, name="library-thread")
            failing.start()
            failing.join()


def _fail() -> None:
    raise RuntimeError("a library thread failed (a test double)")


def load(config: EngineConfig) -> ToneEngine:
    return ToneEngine()


class BatchedToneEngine(ToneEngine):
    max_streams = 4

    def __init__(self) -> None:
        super().__init__()
        self._streams: dict[int, Iterator[AudioChunk]] = {}
        self._ids = itertools.count(1)

    def open(self, request: SynthesisRequest) -> int:
        if request.voice != "tone":
            raise JobFailure(ErrorCode.UNKNOWN_VOICE, f"voice: {request.voice!r} is not "
                             "available; choose one of: tone", "voice")
        stream_id = next(self._ids)
        self._streams[stream_id] = self.synthesize(request)
        return stream_id

    def close(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def step(self) -> list[StreamOutput]:
        outputs = []
        for stream_id, chunks in list(self._streams.items()):
            try:
                outputs.append(StreamOutput(stream_id, audio=next(chunks)))
            except StopIteration:
                del self._streams[stream_id]
                outputs.append(StreamOutput(stream_id, done=True))
            except RuntimeError as error:
                del self._streams[stream_id]
                outputs.append(StreamOutput(stream_id, error=error))
        return outputs


def load_batched(config: EngineConfig) -> BatchedToneEngine:
    return BatchedToneEngine()


def placed(config: EngineConfig) -> ToneEngine:
    """The tone engine, reporting the devices and threads its worker was given."""
    logs.get_logger("tests.engines.faulty").info(
        "placement_seen", cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), piper_threads=config.piper.threads)
    return ToneEngine()


def broken(config: EngineConfig) -> ToneEngine:
    raise RuntimeError("this model cannot load (a test double)")


class CudaLeakEngine(ToneEngine):
    """Allocates (and keeps) CUDA memory with torch on every job: the GPU recycle test."""

    name = "cuda-leak"

    def __init__(self) -> None:
        super().__init__()
        import torch  # noqa: PLC0415 - GPU test only

        self._torch = torch
        self._tensors: list[object] = []

    def synthesize(self, request: SynthesisRequest) -> Iterator[AudioChunk]:
        self._tensors.append(self._torch.ones(256 << 20, dtype=self._torch.uint8,
                                              device="cuda"))
        yield from super().synthesize(request)


def cuda_leak(config: EngineConfig) -> CudaLeakEngine:
    return CudaLeakEngine()


SLOW_TORCH_IMPORT_S = 1.5
_SLOW_TORCH = f"""\"\"\"A stand-in for torch whose import takes as long as a cold GPU host's.\"\"\"
import time

time.sleep({SLOW_TORCH_IMPORT_S})


class _Cuda:
    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def is_initialized() -> bool:
        return False


cuda = _Cuda()
"""


def slow_torch(config: EngineConfig) -> ToneEngine:
    """The tone engine, loaded the way a torch engine is: importing a slow `torch` first
    (the heartbeat thread runs meanwhile and sees it half-imported in sys.modules)."""
    with tempfile.TemporaryDirectory(prefix="slow-torch-") as name:
        directory = Path(name)
        (directory / "torch").mkdir()
        (directory / "torch" / "__init__.py").write_text(_SLOW_TORCH)
        sys.path.insert(0, name)
        try:
            importlib.import_module("torch")
        finally:  # imported: the module stays, its directory goes
            sys.path.remove(name)
    return ToneEngine()


def never_ready(config: EngineConfig) -> ToneEngine:
    """An engine that never finishes loading: a host that receives jobs and serves none
    (with a long worker.start_timeout_s)."""
    time.sleep(3600)
    return ToneEngine()


class CloningToneEngine(ToneEngine):
    """The tone engine as a voice-cloning one: a job's prompt audio (read from the path the
    worker gives it), or a registered voice's stored audio, adds its own length in tone, so
    a test sees that it arrived whole. Registered voices are read from the speakers file, as
    the cosyvoice engine reads them: whoever registered them (any intake)."""

    features = frozenset({"prompt_audio", "prompt_text"})

    def __init__(self, speakers_file: str) -> None:
        super().__init__()
        self._speakers = SpeakerStore(speakers_file)

    def voices(self) -> list[VoiceInfo]:
        return super().voices() + [
            VoiceInfo(speaker.name, speaker.language, SAMPLE_RATE, self.name, "registered")
            for speaker in self._speakers.load()]

    def synthesize(self, request: SynthesisRequest) -> Iterator[AudioChunk]:
        registered = {speaker.name: speaker for speaker in self._speakers.load()}
        if request.voice in registered:
            yield from super().synthesize(dataclasses.replace(request, voice="tone"))
            yield _prompt_tone(len(registered[request.voice].audio), STORED_RATE)
            return
        if request.prompt_audio is None:
            yield from super().synthesize(request)
            return
        read_prompt(request.prompt_audio, SAMPLE_RATE)  # the cosyvoice engine's checks
        yield from super().synthesize(dataclasses.replace(request, voice="tone"))
        prompt = soundfile.info(request.prompt_audio)
        yield _prompt_tone(prompt.frames, prompt.samplerate)


def _prompt_tone(frames: int, rate: int) -> AudioChunk:
    samples = round(frames * SAMPLE_RATE / rate)
    return (0.3 * np.sin(2 * np.pi * 330.0 * np.arange(samples) / SAMPLE_RATE)).astype(
        np.float32)


def cloning(config: EngineConfig) -> CloningToneEngine:
    return CloningToneEngine(config.cosyvoice.speakers_file)
