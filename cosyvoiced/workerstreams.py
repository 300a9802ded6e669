"""The batched worker's loop: several segments in hand at once on one loaded model.

An engine that makes several segments at once (`MultiStreamEngine`, CosyVoice2/3's batched
decoder) is driven here instead of one `synthesize` at a time: each `RunSegment` opens a
stream, each `step` advances every open stream, and what a step made goes out per job as
the one-at-a-time loop sends it (`SegmentStarted`, the chunks, then one `SegmentFinished`,
`JobFailed` or `JobCancelled`, each outcome after a heartbeat). The supervisor's messages
are read between steps, so a cancel or a new segment waits at most one step. A fault of
one stream ends its segment only; a fault of the step itself ends every segment in hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import soxr

from cosyvoiced import audio, logs, pauses
from cosyvoiced.engines import AudioChunk, Engine, MultiStreamEngine, StreamOutput
from cosyvoiced.memory import Memory
from cosyvoiced.messages import (
    AudioChunkReady,
    CancelJob,
    FromWorker,
    Heartbeat,
    JobCancelled,
    RunSegment,
    SegmentFinished,
    SegmentStarted,
    Shutdown,
    ToWorker,
)
from cosyvoiced.segmentprep import PROMPT_VOICE, check_features, failed, request_for, voice_for

log = logs.get_logger("cosyvoiced.worker")


class StreamChannel(Protocol):
    def send(self, message: FromWorker) -> None: ...

    def poll(self, timeout: float = 0.0) -> bool: ...

    def receive(self) -> ToWorker: ...


class BatchedEngine(Engine, MultiStreamEngine, Protocol):
    """An engine that is both: it lists voices and rates, and steps streams."""


@dataclass
class _Open:
    """A segment in hand: where its audio goes, and what it has made so far."""

    segment: RunSegment
    native_rate: int
    rate: int
    started: float  # monotonic
    resampler: soxr.ResampleStream | None
    seq: int = 0
    samples: int = 0
    first_chunk_s: float = 0.0

    @property
    def job_id(self) -> str:
        return self.segment.job.id


class StreamLoop:
    def __init__(self, engine: BatchedEngine, channel: StreamChannel,
                 measure: Callable[[], Memory]) -> None:
        self._engine = engine
        self._channel = channel
        self._measure = measure
        self._open: dict[int, _Open] = {}  # stream id -> its segment
        self._stopping = False

    def run(self) -> None:
        """Serve until told to stop (after the segments in hand) or the pipe closes."""
        while self._take_messages():
            if self._open:
                self._step()

    # -- the supervisor's messages ------------------------------------------------------------
    def _take_messages(self) -> bool:
        """Wait for work while nothing is open, else take what has come; False to exit."""
        while not self._open or self._channel.poll(0.0):
            if self._stopping and not self._open:
                return False
            try:
                message = self._channel.receive()
            except EOFError:
                return False  # the supervisor is gone: nobody to send the audio to
            match message:
                case Shutdown():
                    self._stopping = True
                case RunSegment():
                    self._start(message)
                case CancelJob(job_id):
                    self._cancel(job_id)
        return True

    def _start(self, segment: RunSegment) -> None:
        job = segment.job
        try:
            check_features(self._engine, job)
            voice = voice_for(self._engine, job)
            native_rate = self._engine.sample_rate(voice)
            rate = job.sample_rate or native_rate
            self._channel.send(SegmentStarted(job.id, segment.index, voice or PROMPT_VOICE,
                                              rate, time.time()))
            pause_s = pauses.of_segment(segment.text)
            if pause_s is not None:  # a pause's silence is made here, not by the engine
                self._pause(segment, pause_s, rate)
                return
            stream_id = self._engine.open(request_for(job, segment.text.strip(), voice,
                                                      segment.index))
        except Exception as error:  # noqa: BLE001 - any fault ends this segment only
            self._end(job.id, failed(job.id, error, segment.index))
            return
        resampler = audio.stream_resampler(native_rate, rate)
        self._open[stream_id] = _Open(segment, native_rate, rate, time.monotonic(), resampler)

    def _pause(self, segment: RunSegment, seconds: float, rate: int) -> None:
        silence = pauses.silence(seconds, rate)
        if len(silence):
            self._channel.send(AudioChunkReady(segment.job.id, 0, silence))
        self._end(segment.job.id, SegmentFinished(segment.job.id, segment.index, len(silence),
                                                  0.0, 0.0))

    def _cancel(self, job_id: str) -> None:
        for stream_id, held in list(self._open.items()):
            if held.job_id == job_id:
                self._engine.close(stream_id)
                del self._open[stream_id]
                self._end(job_id, JobCancelled(job_id))

    # -- a step ------------------------------------------------------------------------------
    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as error:  # noqa: BLE001 - the step is every stream's: all end
            for stream_id, held in list(self._open.items()):
                self._engine.close(stream_id)
                del self._open[stream_id]
                self._end(held.job_id, failed(held.job_id, error, held.segment.index))
            return
        for output in outputs:
            in_hand = self._open.get(output.stream_id)
            if in_hand is not None:  # else closed since: it says nothing more
                self._take(output, in_hand)

    def _take(self, output: StreamOutput, held: _Open) -> None:
        if output.audio is not None:
            self._chunk(held, output.audio, last=False)
        if output.error is not None:
            del self._open[output.stream_id]
            self._end(held.job_id, failed(held.job_id, output.error, held.segment.index))
        elif output.done:
            if held.resampler is not None:
                self._chunk(held, np.zeros(0, dtype=np.float32), last=True)
            del self._open[output.stream_id]
            self._end(held.job_id, self._finished(held, output))

    def _chunk(self, held: _Open, audio: AudioChunk, last: bool) -> None:
        if held.resampler is not None:
            audio = held.resampler.resample_chunk(audio, last=last)
        if not len(audio):
            return
        if held.seq == 0:
            held.first_chunk_s = time.monotonic() - held.started
        held.samples += len(audio)
        self._channel.send(AudioChunkReady(held.job_id, held.seq,
                                           np.ascontiguousarray(audio, np.float32)))
        held.seq += 1

    def _finished(self, held: _Open, output: StreamOutput) -> SegmentFinished:
        stages = None if output.stages is None else \
            replace(output.stages, first_chunk_ms=held.first_chunk_s * 1000)
        return SegmentFinished(held.job_id, held.segment.index, held.samples,
                               time.monotonic() - held.started, held.first_chunk_s, stages)

    def _end(self, job_id: str, outcome: FromWorker) -> None:
        """Memory first: the supervisor decides on recycling as segments come back."""
        self._channel.send(Heartbeat(self._measure()))
        self._channel.send(outcome)


def serve(engine: BatchedEngine, channel: StreamChannel, measure: Callable[[], Memory]) -> None:
    StreamLoop(engine, channel, measure).run()
