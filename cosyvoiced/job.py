"""The one job type every intake builds, and the one result or error that comes back.

These objects cross the supervisor/worker process boundary (pickled over a pipe) and are
written to disk as JSON, so they are plain frozen dataclasses with `to_dict`/`from_dict`.
"""

from __future__ import annotations

import mmap
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from cosyvoiced.cues import Captions
from cosyvoiced.stages import SegmentStages

Samples = npt.NDArray[np.float32]

FILE_FORMATS = ("wav", "flac", "ogg")
PCM_FORMAT = "pcm_s16le"  # raw little-endian 16-bit mono: replies and streams only
REPLY_FORMATS = (*FILE_FORMATS, PCM_FORMAT)

# Where a job's outcome goes.
SINK_SPOOL = "spool"  # outbox/ or failed/ (drop folder, ZeroMQ `submit`)
SINK_REPLY = "reply"  # back to the ZeroMQ client that asked (`synthesize`)
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
MIN_SPEED = 0.25
# An error's message, at most: one that quotes a client's value in full (a voice name of a
# megabyte) was kept so in the job history, the records and the log.
MAX_ERROR_MESSAGE_CHARS = 4000  # 32 voices' names of 64 characters fit, in unknown_voice
MAX_SPEED = 4.0


class ErrorCode(StrEnum):
    """Stable error codes: clients and scripts match on these, so never rename one."""

    # The input file itself
    NOT_REGULAR_FILE = "not_regular_file"
    SYMLINK = "symlink"
    HARD_LINK = "hard_link"
    FILE_TOO_LARGE = "file_too_large"
    UNSUPPORTED_FILE_TYPE = "unsupported_file_type"
    UNREADABLE = "unreadable"
    INVALID_UTF8 = "invalid_utf8"
    BAD_JSON = "bad_json"
    # The job's fields
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    INVALID_FIELD = "invalid_field"
    EMPTY_TEXT = "empty_text"
    TEXT_TOO_LONG = "text_too_long"
    UNKNOWN_VOICE = "unknown_voice"
    NOT_SUPPORTED = "not_supported"
    UNSUPPORTED_FORMAT = "unsupported_format"
    INVALID_OUTPUT_NAME = "invalid_output_name"
    # The prompt audio of a voice-cloning job or voice registration
    PROMPT_AUDIO_NOT_FOUND = "prompt_audio_not_found"
    PROMPT_AUDIO_UNREADABLE = "prompt_audio_unreadable"
    PROMPT_AUDIO_TOO_SHORT = "prompt_audio_too_short"
    PROMPT_AUDIO_TOO_LONG = "prompt_audio_too_long"
    # A voice registration or removal: another client's voice, or no room for one more
    NOT_OWNER = "not_owner"
    TOO_MANY_VOICES = "too_many_voices"
    # Refused before it was queued: the queue, or this client's share of it, is full
    BUSY = "busy"
    # Serving it
    CANCELLED = "cancelled"
    SHUTTING_DOWN = "shutting_down"
    ENGINE_ERROR = "engine_error"
    WORKER_CRASHED = "worker_crashed"
    # The result could not be encoded: the encoder process died on it twice
    ENCODE_FAILED = "encode_failed"
    # The daemon itself died twice while this job was in hand: it is not run a third time
    DAEMON_CRASHED = "daemon_crashed"
    INTERNAL = "internal"


@dataclass(frozen=True)
class JobError:
    """Why a job could not be served. `field` names the offending job field, if any."""

    code: ErrorCode
    message: str
    field: str | None = None

    def __post_init__(self) -> None:
        if len(self.message) > MAX_ERROR_MESSAGE_CHARS:
            object.__setattr__(self, "message",
                               self.message[:MAX_ERROR_MESSAGE_CHARS - 3] + "...")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.field is not None:
            data["field"] = self.field
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobError:
        return cls(ErrorCode(data["code"]), str(data["message"]), data.get("field"))


class JobFailure(Exception):
    """Raised anywhere on the job path; carries the `JobError` that ends the job."""

    def __init__(self, code: ErrorCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.error = JobError(code, message, field)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled across the worker pipe: rebuild from the error's parts.
        return (JobFailure, (self.error.code, self.error.message, self.error.field))


def new_job_id() -> str:
    """A short id that sorts by creation time and is unique without coordination."""
    return f"{time.time_ns() // 1_000_000:011x}{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Job:
    """One synthesis request, from whichever intake, as the queue and the worker see it.

    `sink` says where the outcome goes and `origin` how to find it there: for the spool,
    the claimed file's name inside `work/`; for a reply, the request's key in the ZeroMQ
    intake. `stream` replies send each chunk as it is made.
    """

    id: str
    source: str
    origin: str
    text: str
    voice: str | None = None
    format: str = "wav"
    sample_rate: int | None = None
    speed: float = 1.0
    output: str = ""
    received_at: float = field(default_factory=time.time)
    sink: str = SINK_SPOOL
    stream: bool = False
    # Voice cloning and style: `prompt_audio` is the path of the job's own copy of the
    # prompt in the spool's prompts/ directory (never a client's path).
    prompt_audio: str | None = None
    prompt_text: str | None = None
    instruct: str | None = None
    language: str | None = None
    # False: never served from the result cache, and its audio is not stored there.
    cache: bool = True
    # Who asked (service.Identity.owner): only they, or an admin, may see or cancel it.
    # Fair turns are taken between `share`s (one per key; anonymous clients share one),
    # and within a share between `party`s (an anonymous client's host).
    owner: str = ""
    share: str = ""
    party: str = ""
    # Captions (captions.py): "sentence" or "word" timings with the reply (HTTP, ZeroMQ);
    # a drop-folder job's caption file beside its audio, "vtt", "srt" or "json".
    timestamps: str | None = None
    captions: str | None = None

    @property
    def chars(self) -> int:
        return len(self.text)


@dataclass(frozen=True)
class JobResult:
    """What the worker reports when a job's audio is complete."""

    job_id: str
    voice: str
    sample_rate: int
    samples: int
    synth_s: float
    first_chunk_s: float
    cached: bool = False  # served from the result cache: no synthesis
    served_by: str = ""  # in a cluster: the host that made the audio
    stages: tuple[SegmentStages, ...] = ()  # per segment, from an engine that has stages
    captions: Captions | None = None  # for a job that asked for them

    @property
    def audio_s(self) -> float:
        return self.samples / self.sample_rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(replace(self, captions=None)) | {"audio_s": round(self.audio_s, 4)}


@dataclass(frozen=True, eq=False)  # arrays: == would compare them element by element
class ResultAudio:
    """A whole result's audio as it was made: the engine's chunks at `made_rate`, owed to
    the client at `rate`. Never joined or resampled on the supervisor's tick, where a long
    result (minutes of audio, hundreds of MB) would hold every client's audio back for
    seconds: the encoder process does both block by block (encoding.py), and only a sink
    that must send it at once joins it (`audio.whole`)."""

    chunks: tuple[Samples, ...]
    made_rate: int
    rate: int
    # The map of the spool's file that the chunks are views of, where a long reply's audio
    # was kept on disk (replyaudio.py); None where they are in memory.
    mapped: mmap.mmap | None = None

    @classmethod
    def of(cls, samples: Samples, rate: int) -> ResultAudio:
        return cls((samples,), rate, rate)

    def let_read_pages_go(self, frames: int) -> None:
        """The first `frames` frames were read (sent to the encoder process): where they
        are mapped, their pages leave this process's resident memory. They stay in the page
        cache, and a read brings them back."""
        length = 4 * frames // mmap.PAGESIZE * mmap.PAGESIZE
        if self.mapped is not None and length:
            self.mapped.madvise(mmap.MADV_DONTNEED, 0, length)

    @property
    def made_frames(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    @property
    def frames(self) -> int:
        """Frames at `rate`: soxr's count, or one off where the exact count ends in half a
        frame (soxr rounds those either way: 24000 -> 22050 Hz, 400 frames make 367, 560
        make 515). Files and events hold soxr's own frames."""
        made = self.made_frames
        return made if self.rate == self.made_rate else round(made * self.rate / self.made_rate)

    @property
    def nbytes(self) -> int:
        return sum(chunk.nbytes for chunk in self.chunks)


class Staging(Protocol):
    """A file the encoder process writes itself (a drop-folder result, under a temp name in
    the outbox): its bytes never pass through the supervisor, where a long result's file
    (100 MB of WAV for 20 minutes at 48 kHz) was held whole, and twice while it arrived."""

    def create(self) -> str:
        """The path of a new, empty temp file to write (the encoder's sending thread, once
        for the file: a child that dies partway is followed by one that starts it afresh)."""
        ...

    def settle(self) -> None:
        """The file is whole: fsync it (the encoder's saving thread; slow on a slow disk)."""
        ...

    def discard(self) -> None:
        """The file could not be made: delete what there is of it."""
        ...


@dataclass(frozen=True, eq=False)
class Deferred:
    """A sink's answer to `deliver` when the result must be encoded first: the audio goes
    to the encoder process (encoding.py: native codecs never run in the supervisor), and
    `publish` sends or puts the encoded bytes where they belong, returning the output's
    name. With `staging`, the encoder process writes the file where it goes (and its saving
    thread fsyncs it, off the tick) and `publish` gets no bytes."""

    audio: ResultAudio
    format: str
    publish: Callable[[bytes], str]
    staging: Staging | None = None


class Sink(Protocol):
    """Where a job's audio and outcome go: the spool (outbox/failed), a ZeroMQ, HTTP or
    Wyoming reply, another host (cluster), with the result cache's recorder in front. A
    job's sink is bound when it is admitted."""

    def started(self, job: Job, sample_rate: int) -> None: ...

    def chunk(self, job: Job, seq: int, samples: Samples) -> None: ...

    def deliver(self, job: Job, result: JobResult, made: ResultAudio,
                timings: dict[str, float]) -> str | Deferred: ...

    def fail_job(self, job: Job, error: JobError) -> str: ...

    def cancelled(self, job: Job) -> None: ...
