"""What travels through Redis between daemons, and the keys it lives under.

A job goes onto one of two shared streams (interactive, bulk) with its prompt audio; the
host that takes it sends events back on the receiving host's own event stream: `started`,
`chunk` (streamed audio), `part` (a whole reply's audio, PART_BYTES at a time: see
remoteaudio.py) and one outcome (`done`, `failed`, `cancelled`). A `cancel` goes
the other way, to the host serving a job. Pure encoding, no I/O: redis-py hands fields over
as bytes.

An entry is as untrusted as a request from the LAN (another version's, a bug's, or written
by whoever can write to Redis): every field is checked for its type and bounds before any
of it is used, and one that fails is a `WireError` (the entry is dropped, with a log line).
A host's name and a job's id become file and key names, so they must be plain.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from cosyvoiced.config import HOST_NAME
from cosyvoiced.job import Job, JobError
from cosyvoiced.scheduler import Priority
from cosyvoiced.untrusted import json_value

GROUP = "hosts"  # the one consumer group on each job stream: every daemon is a consumer

Fields = dict[bytes, bytes]
Samples = npt.NDArray[np.float32]

# Event kinds
STARTED = "started"
CHUNK = "chunk"
PART = "part"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
CANCEL = "cancel"  # to the serving host: stop this job
OUTCOMES = frozenset({DONE, FAILED, CANCELLED})
KINDS = frozenset({STARTED, CHUNK, PART, CANCEL}) | OUTCOMES
_JOB_FIELDS = frozenset(spec.name for spec in fields(Job))
_JOB_TYPES = typing.get_type_hints(Job)
_JOB_ID = re.compile(r"[0-9a-f]{1,32}")  # job.new_job_id's
# Bounds of an entry, whatever the hosts' own limits (the serving host applies its own):
MAX_TEXT_CHARS = 1_000_000
MAX_FIELD_CHARS = 4096  # any other string of a job
MAX_PROMPT_BYTES = 64 << 20
MAX_SAMPLE_RATE = 384_000
MAX_WHOLE = 1 << 53  # a JSON number's whole values, as a float holds them exactly
PART_BYTES = 1 << 20  # of a whole reply's audio, in one `part` event at most
# An event's other fields at most: 16 `part` events of 64 MiB each (whoever has the
# daemons' login can add them) were each taken whole, and the supervisor grew to 2 GiB.
MAX_CHUNK_BYTES = 16 << 20  # a streamed segment's audio: 3 minutes at 22,050 Hz
MAX_DETAIL_BYTES = 64 << 10
# An entry bigger than this is not an event a daemon sends (a part and its fields): after
# one, the readers read one entry at a time (ReadCount).
BIG_EVENT_BYTES = PART_BYTES + MAX_DETAIL_BYTES


class WireError(ValueError):
    """A stream entry that is not what a daemon writes (another version, or not ours)."""


@dataclass(frozen=True)
class Keys:
    """Every key is "<prefix>:...", so one Redis ACL pattern covers the daemon's keys."""

    prefix: str

    def jobs(self, priority: Priority) -> str:
        return f"{self.prefix}:jobs:{priority.name.lower()}"

    def job_streams(self) -> list[str]:
        return [self.jobs(priority) for priority in Priority]  # interactive first

    def events(self, host: str) -> str:
        return f"{self.prefix}:events:{host}"

    def marker(self, host: str, job_id: str) -> str:
        """Exists while a received job is shared: a restart then waits for its outcome
        instead of sharing it a second time."""
        return f"{self.prefix}:job:{host}:{job_id}"

    def hosts(self) -> str:
        """The roster: every host's figures, a stream entry every few seconds (roster.py)."""
        return f"{self.prefix}:hosts"


@dataclass(frozen=True)
class SharedJob:
    """A job taken from a shared stream, as the host that received it made it."""

    job: Job  # prompt_audio is None: the prompt's bytes travel in `prompt`
    host: str  # the receiving host, where its outcome goes
    prompt: bytes | None
    stream: str
    entry: str
    deliveries: int = 1  # the tries that started it (a poison job's count), this one's too
    taken_over: bool = False  # from a host that stopped answering (started there or not)


def job_fields(job: Job, host: str, prompt: bytes | None) -> dict[str, bytes]:
    data = asdict(job) | {"prompt_audio": None}
    entry = {"job": json.dumps(data).encode(), "host": host.encode()}
    if prompt is not None:
        entry["prompt"] = prompt
    return entry


def unshareable(job: Job, prompt_bytes: int) -> str | None:
    """Why `job` (with a prompt of that many bytes) would not pass `read_job` on any host,
    so must be served where it was received; None: it may be shared."""
    if prompt_bytes > MAX_PROMPT_BYTES:
        return f"prompt: {prompt_bytes} bytes is over {MAX_PROMPT_BYTES}"
    for name, value in asdict(job).items():
        if isinstance(value, str) and len(value) > (
                MAX_TEXT_CHARS if name == "text" else MAX_FIELD_CHARS):
            return f"job.{name}: {len(value)} characters is too long"
    return None


def read_job(stream: str, entry: str, data: Fields, deliveries: int = 1) -> SharedJob:
    try:
        job = _checked_job(json_value(data[b"job"]))
        host = _plain_name(data[b"host"].decode(), "host")
        prompt = data.get(b"prompt")
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as error:
        raise WireError(f"not a job entry: {error}"[:500]) from error
    if prompt is not None and len(prompt) > MAX_PROMPT_BYTES:
        raise WireError(f"prompt: {len(prompt)} bytes is over {MAX_PROMPT_BYTES}")
    return SharedJob(job, host, prompt, stream, entry, deliveries)


def owner_of(data: Fields) -> tuple[str, str] | None:
    """(receiving host, job id) of an entry `read_job` refused, where both are plain: that
    host waits for the job until its marker goes (outcome_ttl_s, 7 days by default)."""
    try:
        host = _plain_name(data[b"host"].decode(), "host")
        job = json_value(data[b"job"])
    except (KeyError, TypeError, ValueError, UnicodeDecodeError):
        return None
    job_id = job.get("id") if isinstance(job, dict) else None
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        return None
    return host, job_id


def _checked_job(data: Any) -> Job:
    if not isinstance(data, dict):
        raise WireError("job: expected a JSON object")
    unknown = set(data) - _JOB_FIELDS
    if unknown:
        raise WireError(f"unknown job fields {sorted(unknown)[:8]} (a newer daemon's?)")
    for name, value in data.items():
        if not _fits(value, _JOB_TYPES[name]):
            raise WireError(f"job.{name}: expected {_JOB_TYPES[name]}, got "
                            f"{type(value).__name__}")
        if isinstance(value, str) and len(value) > (
                MAX_TEXT_CHARS if name == "text" else MAX_FIELD_CHARS):
            raise WireError(f"job.{name}: {len(value)} characters is too long")
    job = Job(**data)  # a missing field: TypeError
    if not _JOB_ID.fullmatch(job.id):
        raise WireError("job.id: expected a job id (hexadecimal)")
    return job


def _fits(value: Any, hint: Any) -> bool:
    """Is the JSON `value` one of the plain types of `hint` (str, int, float, bool, None,
    or a union of them)? A float is finite; an int is not a bool."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if value is None and option is type(None):
            return True
        if option is bool and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue
        if option is float and isinstance(value, int | float):
            return _finite(value)
        if option in (int, str) and isinstance(value, option):
            return True
    return False


def _finite(value: int | float) -> bool:
    """A number any arithmetic takes: a float of 400 digits' int raised OverflowError."""
    if isinstance(value, int):
        return abs(value) <= MAX_WHOLE
    return math.isfinite(value)


def _plain_name(name: str, what: str) -> str:
    if not HOST_NAME.fullmatch(name):
        raise WireError(f"{what}: expected a host name (letters, digits, '.', '-', '_')")
    return name


@dataclass(frozen=True)
class Event:
    """About one job of the receiving host (`job_id` is its id there)."""

    kind: str
    job_id: str
    sender: str  # the host that sends it: for a job's events, the host serving it
    detail: dict[str, Any] = field(default_factory=dict)
    audio: bytes | memoryview = b""  # float32 little-endian samples
    entry: str = ""  # its id on the event stream, once read

    @property
    def samples(self) -> Samples:
        """The audio's samples, not copied (a long job's are 100 MB, read on the tick)."""
        samples: Samples = np.frombuffer(self.audio, dtype="<f4")
        return samples


def audio_bytes(samples: Samples) -> bytes:
    return np.asarray(samples, dtype="<f4").tobytes()


def event_fields(event: Event) -> dict[str, bytes | memoryview]:
    return {"kind": event.kind.encode(), "job": event.job_id.encode(),
            "from": event.sender.encode(), "detail": json.dumps(event.detail).encode(),
            "audio": event.audio}


def read_event(entry: str, data: Fields) -> Event:
    problem = _size_problem(data)
    if problem:
        raise WireError(problem)
    try:
        event = Event(data[b"kind"].decode(), data[b"job"].decode(),
                      _plain_name(data[b"from"].decode(), "from"),
                      json_value(data[b"detail"]), data.get(b"audio", b""), entry)
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as error:
        raise WireError(f"not an event entry: {error}"[:500]) from error
    if event.kind not in KINDS:
        raise WireError(f"kind: {event.kind[:64]!r} is not an event's")
    if not _JOB_ID.fullmatch(event.job_id):
        raise WireError("job: expected a job id (hexadecimal)")
    if not isinstance(event.detail, dict) or len(event.audio) % 4:
        raise WireError("detail: expected a JSON object; audio: whole float32 samples")
    problem = _detail_problem(event.kind, event.detail)
    if problem:
        raise WireError(f"{event.kind}: {problem}")
    return event


def _size_problem(data: Fields) -> str | None:
    """An event's field over its bound, checked before any of it is decoded."""
    kind, audio = data.get(b"kind", b""), data.get(b"audio", b"")
    most = {PART.encode(): PART_BYTES, CHUNK.encode(): MAX_CHUNK_BYTES}.get(kind, 0)
    if len(audio) > most:
        return f"audio: {len(audio)} bytes is over {most} for a {kind[:16]!r} event"
    if len(data.get(b"detail", b"")) > MAX_DETAIL_BYTES:
        return f"detail: {len(data[b'detail'])} bytes is over {MAX_DETAIL_BYTES}"
    return None


def entry_bytes(data: Fields) -> int:
    return sum(len(name) + len(value) for name, value in data.items())


class ReadCount:
    """How many stream entries a reader asks Redis for at once. An entry's size is known
    only once read (whoever has the daemons' login can add entries up to Redis's
    proto-max-bulk-len, 512 MiB unless set lower): after one bigger than `big` bytes, the
    reader takes one at a time, doubling back to `most` after reads of small ones. It
    starts at one too: what waits in a stream at a start, or after the reader waited, may
    be anything."""

    def __init__(self, most: int, big: int) -> None:
        self.most, self.big, self.count = most, big, 1

    def after(self, entries: list[Fields]) -> None:
        if any(entry_bytes(data) > self.big for data in entries):
            self.count = 1
        elif entries:
            self.count = min(self.most, self.count * 2)


def _detail_problem(kind: str, detail: dict[str, Any]) -> str | None:
    """What is wrong with an event's `detail` for its kind, if anything."""
    if kind == STARTED:
        return _count_problem(detail, "sample_rate", 1, MAX_SAMPLE_RATE)
    if kind in (CHUNK, PART):
        return _count_problem(detail, "seq", 0, 1 << 40)
    if kind == DONE:
        timings = detail.get("timings")
        if not isinstance(detail.get("voice"), str) or not isinstance(timings, dict) or \
                not all(_fits(value, float) and value >= 0 for value in timings.values()):
            return "voice: expected a string; timings: an object of numbers, not negative"
        if any(not _fits(detail.get(name), float) or detail[name] < 0
               for name in ("synth_s", "first_chunk_s")):
            return "synth_s, first_chunk_s: expected numbers, not negative"
        return _count_problem(detail, "sample_rate", 1, MAX_SAMPLE_RATE) or \
            _count_problem(detail, "samples", 0, 1 << 40)
    error = detail.get("error")
    if kind in (FAILED, CANCELLED) and error is not None:
        if not isinstance(error, dict) or not isinstance(error.get("code"), str) or \
                not isinstance(error.get("message"), str):
            return "error: expected {code, message}"
        try:
            JobError.from_dict(error)
        except ValueError:
            return f"error: {str(error['code'])[:64]!r} is not an error code"
    return None


def _count_problem(detail: dict[str, Any], name: str, least: int, most: int) -> str | None:
    value = detail.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and least <= value <= most:
        return None
    return f"{name}: expected a whole number from {least} to {most}"


def served_job(shared: SharedJob, local_id: str, prompt_path: str | None) -> Job:
    """The job as this host runs it: under an id of its own (ids are unique per host
    only), with its prompt audio stored here."""
    return replace(shared.job, id=local_id, prompt_audio=prompt_path)


# -- what the cluster link's threads hand the tick (cluster.py) --------------------
@dataclass(frozen=True)
class ShareFailed:
    """A job could not go onto the shared stream (Redis down): serve it here."""

    job_id: str


@dataclass(frozen=True)
class SharedLost:
    """A job of this host's that Redis no longer holds (it lost its data, or the TTL ran
    out): serve it here."""

    job_id: str


Inbound = SharedJob | Event | ShareFailed | SharedLost
