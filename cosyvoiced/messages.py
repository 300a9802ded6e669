"""Messages on the pipe between the supervisor and its worker process.

Each is a small frozen dataclass, pickled by `multiprocessing.connection`; errors travel as
`JobError` values, never as live exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cosyvoiced.cues import WordSpan
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.job import Job, JobError
from cosyvoiced.memory import Memory
from cosyvoiced.stages import SegmentStages


# supervisor -> worker
@dataclass(frozen=True)
class RunSegment:
    """Synthesize one segment of a job's text (`index` of `count`) with the job's settings."""

    job: Job
    index: int
    count: int
    text: str


@dataclass(frozen=True)
class CancelJob:
    """Stop the job in hand at its next chunk."""

    job_id: str


@dataclass(frozen=True)
class Shutdown:
    """Finish nothing more; exit cleanly."""


# worker -> supervisor
@dataclass(frozen=True)
class EngineWarming:
    """The model is loaded; a short warm-up synthesis is running."""

    load_s: float


@dataclass(frozen=True)
class EngineReady:
    engine: str
    voices: list[VoiceInfo]
    default_voice: str | None
    features: frozenset[str]
    native_rate: int  # of voices taken from prompt audio
    load_s: float
    warmup_s: float
    streams: int = 1  # segments it makes at once (a batched engine's max_streams)


@dataclass(frozen=True)
class EngineLoadFailed:
    message: str


@dataclass(frozen=True)
class Heartbeat:
    """Alive, with fresh memory figures (sent on a timer and before every job outcome)."""

    memory: Memory


@dataclass(frozen=True)
class SegmentStarted:
    job_id: str
    index: int
    voice: str
    sample_rate: int
    started_at: float  # wall clock


@dataclass(frozen=True)
class AudioChunkReady:
    job_id: str
    seq: int
    audio: npt.NDArray[np.float32]


@dataclass(frozen=True)
class SegmentFinished:
    """The segment's audio is complete (its chunks were all sent before this)."""

    job_id: str
    index: int
    samples: int
    synth_s: float
    first_chunk_s: float
    stages: SegmentStages | None = None  # an engine without stages (Piper) has none
    # [start, end) samples of each of its text's words (captions.py), at the job's rate,
    # from an engine that aligns its audio (Piper); None from the others and for a pause.
    words: tuple[WordSpan, ...] | None = None


@dataclass(frozen=True)
class JobFailed:
    job_id: str
    error: JobError


@dataclass(frozen=True)
class JobCancelled:
    job_id: str


@dataclass(frozen=True)
class LogLine:
    levelno: int
    line: str


ToWorker = RunSegment | CancelJob | Shutdown
FromWorker = (EngineWarming | EngineReady | EngineLoadFailed | Heartbeat | SegmentStarted
              | AudioChunkReady | SegmentFinished | JobFailed | JobCancelled | LogLine)
