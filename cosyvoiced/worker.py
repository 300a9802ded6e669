"""The model worker: a `spawn`ed process that owns the engine (and any GPU state).

It loads the engine once, warms it up, then serves one segment of a job at a time: every
chunk the engine yields is sent to the supervisor as it is made, then one `SegmentFinished`
or `JobFailed`. A
heartbeat thread reports liveness and memory independently of the job in hand.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import cast

import numpy as np

from cosyvoiced import audio, lifeline, logs, pauses, workerstreams
from cosyvoiced.config import EngineConfig
from cosyvoiced.engines import (
    AlignedEngine,
    AudioChunk,
    Engine,
    MultiStreamEngine,
    StagedEngine,
    SynthesisRequest,
    load_engine,
)
from cosyvoiced.memory import Memory, measure
from cosyvoiced.messages import (
    AudioChunkReady,
    CancelJob,
    EngineLoadFailed,
    EngineReady,
    EngineWarming,
    FromWorker,
    Heartbeat,
    JobCancelled,
    LogLine,
    RunSegment,
    SegmentFinished,
    SegmentStarted,
    Shutdown,
    ToWorker,
)
from cosyvoiced.placement import Placement
from cosyvoiced.segmentprep import (
    PROMPT_VOICE,
    check_features,
    failed,
    request_for,
    voice_for,
)
from cosyvoiced.stages import SegmentStages

WARMUP_TEXT = "Ready."

log = logs.get_logger("cosyvoiced.worker")


class Channel:
    """The worker's end of the pipe; sends come from several threads."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: FromWorker) -> None:
        with self._lock:
            self._conn.send(message)

    def poll(self, timeout: float = 0.0) -> bool:
        return self._conn.poll(timeout)

    def receive(self) -> ToWorker:
        message: ToWorker = self._conn.recv()
        return message

    def cancelled(self, job_id: str) -> bool:
        """Whether the supervisor asked, since the last chunk, to stop this job."""
        while self._conn.poll():
            message = self.receive()
            if isinstance(message, CancelJob) and message.job_id == job_id:
                return True
        return False


class _Cancelled(Exception):
    pass


class _ProbeFailures:
    """Logs each memory probe's failure once: the heartbeat goes on without that figure."""

    def __init__(self) -> None:
        self._logged: set[str] = set()

    def __call__(self, probe: str, error: Exception) -> None:
        if probe not in self._logged:
            self._logged.add(probe)
            log.warning("memory_probe_failed", probe=probe,
                        error=f"{type(error).__name__}: {error}",
                        message="the heartbeat goes on without this figure")


_probe_failures = _ProbeFailures()


def _measure() -> Memory:
    return measure(_probe_failures)


def _heartbeat(channel: Channel, interval_s: float) -> None:
    """Liveness, independent of the job in hand: only a closed pipe (the supervisor is gone
    or has let this worker go) ends it."""
    while True:
        try:
            channel.send(Heartbeat(_measure()))
        except (OSError, EOFError, ValueError):
            return
        time.sleep(interval_s)


def _resampled(chunks: Iterator[AudioChunk], rate_in: int,
               rate_out: int) -> Generator[AudioChunk, None, None]:
    stream = audio.stream_resampler(rate_in, rate_out)
    if stream is None:
        yield from chunks
        return
    for chunk in chunks:
        out = stream.resample_chunk(chunk)
        if len(out):
            yield out
    tail = stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
    if len(tail):
        yield tail


def _serve(engine: Engine, segment: RunSegment, channel: Channel) -> SegmentFinished:
    job = segment.job
    check_features(engine, job)
    voice = voice_for(engine, job)
    native_rate = engine.sample_rate(voice)
    rate = job.sample_rate or native_rate
    channel.send(SegmentStarted(job.id, segment.index, voice or PROMPT_VOICE, rate,
                                time.time()))
    started = time.monotonic()
    first_chunk_s = 0.0
    samples = 0
    pause_s = pauses.of_segment(segment.text)  # a pause's silence is made here, not by it
    chunks = _silence(pause_s, rate) if pause_s is not None else \
        _resampled(engine.synthesize(request_for(job, segment.text.strip(), voice,
                                                 segment.index)),
                   native_rate, rate)
    try:
        for seq, chunk in enumerate(chunks):
            if seq == 0:
                first_chunk_s = time.monotonic() - started
            samples += len(chunk)
            channel.send(AudioChunkReady(job.id, seq, np.ascontiguousarray(chunk, np.float32)))
            if channel.cancelled(job.id):
                raise _Cancelled
    finally:
        chunks.close()  # an abandoned engine generator cleans up now, not at GC time
    return SegmentFinished(job.id, segment.index, samples, time.monotonic() - started,
                           first_chunk_s,
                           _stages(engine, first_chunk_s) if pause_s is None else None,
                           _words(engine, rate / native_rate) if pause_s is None
                           and (job.timestamps or job.captions) else None)


def _words(engine: Engine, scale: float) -> tuple[tuple[int, int], ...] | None:
    """The segment's word spans at the job's rate (it may be resampled), for captions."""
    spans = engine.segment_words() if isinstance(engine, AlignedEngine) else None
    if spans is None:
        return None
    return tuple((round(start * scale), round(end * scale)) for start, end in spans)


def _silence(seconds: float, rate: int) -> Generator[AudioChunk, None, None]:
    silence = pauses.silence(seconds, rate)
    if len(silence):
        yield silence


def _stages(engine: Engine, first_chunk_s: float) -> SegmentStages | None:
    measured = engine.segment_stages() if isinstance(engine, StagedEngine) else None
    return None if measured is None else replace(measured, first_chunk_ms=first_chunk_s * 1000)


def _run_segment(engine: Engine, segment: RunSegment, channel: Channel) -> None:
    job = segment.job
    outcome: FromWorker
    try:
        outcome = _serve(engine, segment, channel)
    except _Cancelled:
        outcome = JobCancelled(job.id)
    except Exception as error:  # noqa: BLE001 - any engine fault ends this job, not the worker
        outcome = failed(job.id, error, segment.index)
    # Memory first: the supervisor decides on recycling before it hands over the next job.
    channel.send(Heartbeat(_measure()))
    channel.send(outcome)


def warm_up(engine: Engine) -> None:
    """One short synthesis before the first job, so that it does not pay for first calls
    (lazy initialisation, allocator growth), on the path its jobs take: a batched engine's
    streams, else `synthesize`. Shared with bench/cosyvoice.py."""
    default = engine.default_voice()
    if default is None:  # a model with no built-in voice has nothing to warm up with
        return
    request = SynthesisRequest(WARMUP_TEXT, default)
    if _streams(engine) > 1:
        _warm_up_stream(cast(MultiStreamEngine, engine), request)
        return
    for _chunk in engine.synthesize(request):
        pass


def _warm_up_stream(engine: MultiStreamEngine, request: SynthesisRequest) -> None:
    """One stream, stepped to its end (no other is open yet)."""
    stream_id = engine.open(request)
    while True:
        for output in engine.step():
            if output.stream_id == stream_id and output.error is not None:
                raise output.error
            if output.stream_id == stream_id and output.done:
                return


def _streams(engine: Engine) -> int:
    """Segments the engine makes at once: a batched one's streams, else one."""
    return max(1, engine.max_streams) if isinstance(engine, MultiStreamEngine) else 1


def _load(config: EngineConfig, channel: Channel) -> Engine | None:
    started = time.monotonic()
    try:
        engine = load_engine(config)
        voices = engine.voices()
        loaded = time.monotonic()
        channel.send(EngineWarming(round(loaded - started, 3)))
        default = engine.default_voice()
        warm_up(engine)
    except Exception as error:  # reported to the supervisor, which decides
        log.exception("engine_load_failed", engine=config.name)
        channel.send(EngineLoadFailed(f"{type(error).__name__}: {error}"))
        return None
    warmed = time.monotonic()
    # The loaded, warmed engine's footprint, before the supervisor reports this worker idle
    # and judges its limits by it: the last heartbeat may be from before the model loaded
    # (a start quicker than one interval showed a fresh Piper worker at 45 MiB).
    channel.send(Heartbeat(_measure()))
    channel.send(EngineReady(engine.name, voices, default, engine.features,
                             engine.sample_rate(None) if "prompt_audio" in engine.features
                             else 0, round(loaded - started, 3), round(warmed - loaded, 3),
                             _streams(engine)))
    return engine


class _OutputToLog(io.TextIOBase):
    """Stands in for stdout/stderr: engine libraries print (upstream CosyVoice does), and a
    stray line on the daemon's stdout would break its JSON log stream."""

    def __init__(self, stream: str) -> None:
        self._stream = stream
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).replace("\r", "\n").split("\n")
        for line in filter(str.strip, lines):
            log.debug("engine_output", stream=self._stream, line=line.rstrip())
        return len(text)


def _log_thread_failure(failure: threading.ExceptHookArgs) -> None:
    """An engine library's thread died: by default Python prints that to stderr, which the
    worker logs at debug level with the library's chatter; it is an error."""
    if failure.exc_type is SystemExit:
        return
    log.error("worker_thread_failed",
              thread=failure.thread.name if failure.thread else None,
              exc_info=(failure.exc_type, failure.exc_value, failure.exc_traceback))


def place(placement: Placement) -> None:
    """Show this worker its own device only, before anything imports CUDA: torch and
    onnxruntime then see that GPU as device 0, and a CPU worker sees none. Shared with
    bench/cosyvoice.py, whose direct caller is prepared as a worker is."""
    kind, _, index = placement.device.partition(":")
    os.environ["CUDA_VISIBLE_DEVICES"] = index if kind == "cuda" else ""
    if placement.on_cpu and placement.cpu_threads:  # OpenMP (torch's CPU kernels) reads it
        os.environ["OMP_NUM_THREADS"] = str(placement.cpu_threads)
    # OpenMP's threads spin between kernels by default. With anything else busy on the cores
    # (another worker, a client, the supervisor) a batched CosyVoice step, many small
    # kernels, then ran about 10x slower (3 streams on 2 cores next to a busy torch process:
    # over 70 s instead of 7.7 s); waiting passively cost nothing measurable when alone.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(conn: Connection, config: EngineConfig, log_level: str,
         heartbeat_interval_s: float, placement: Placement) -> None:
    """Entry point of the worker process (started with the `spawn` method)."""
    place(placement)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    lifeline.die_with_parent()  # a SIGKILLed supervisor takes the worker (and model) too
    channel = Channel(conn)
    logs.configure_worker(log_level, lambda level, line: channel.send(LogLine(level, line)))
    sys.stdout, sys.stderr = _OutputToLog("stdout"), _OutputToLog("stderr")
    threading.excepthook = _log_thread_failure
    threading.Thread(target=_heartbeat, args=(channel, heartbeat_interval_s),
                     name="heartbeat", daemon=True).start()
    engine = _load(config, channel)
    if engine is None:
        return
    if _streams(engine) > 1:
        workerstreams.serve(cast(workerstreams.BatchedEngine, engine), channel, _measure)
        return
    while True:
        try:
            message = channel.receive()
        except EOFError:
            return
        if isinstance(message, Shutdown):
            return
        if isinstance(message, RunSegment):
            _run_segment(engine, message, channel)
        # A CancelJob that arrives after its job ended has nothing left to stop.
