"""What travels through Redis between daemons, and the keys it lives under.

A job goes onto one of two shared streams (interactive, bulk) with its prompt audio; the
host that takes it sends events back on the receiving host's own event stream: `started`,
`chunk` (streamed audio), and one outcome (`done`, `failed`, `cancelled`). A `cancel` goes
the other way, to the host serving a job. Pure encoding, no I/O: redis-py hands fields over
as bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from cosyvoiced.job import Job
from cosyvoiced.scheduler import Priority
from cosyvoiced.untrusted import json_value

GROUP = "hosts"  # the one consumer group on each job stream: every daemon is a consumer

Fields = dict[bytes, bytes]
Samples = npt.NDArray[np.float32]

# Event kinds
STARTED = "started"
CHUNK = "chunk"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
CANCEL = "cancel"  # to the serving host: stop this job
OUTCOMES = frozenset({DONE, FAILED, CANCELLED})
_JOB_FIELDS = frozenset(spec.name for spec in fields(Job))


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
    deliveries: int = 1  # more than 1: a host that had it stopped answering


def job_fields(job: Job, host: str, prompt: bytes | None) -> dict[str, bytes]:
    data = asdict(job) | {"prompt_audio": None}
    entry = {"job": json.dumps(data).encode(), "host": host.encode()}
    if prompt is not None:
        entry["prompt"] = prompt
    return entry


def read_job(stream: str, entry: str, data: Fields, deliveries: int = 1) -> SharedJob:
    try:
        job_data = json_value(data[b"job"])
        unknown = set(job_data) - _JOB_FIELDS
        if unknown:
            raise WireError(f"unknown job fields {sorted(unknown)} (a newer daemon's?)")
        return SharedJob(Job(**job_data), data[b"host"].decode(), data.get(b"prompt"),
                         stream, entry, deliveries)
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as error:
        raise WireError(f"not a job entry: {error}") from error


@dataclass(frozen=True)
class Event:
    """About one job of the receiving host (`job_id` is its id there)."""

    kind: str
    job_id: str
    sender: str  # the host that sends it: for a job's events, the host serving it
    detail: dict[str, Any] = field(default_factory=dict)
    audio: bytes = b""  # float32 little-endian samples
    entry: str = ""  # its id on the event stream, once read

    @property
    def samples(self) -> Samples:
        return np.frombuffer(self.audio, dtype="<f4").astype(np.float32)


def audio_bytes(samples: Samples) -> bytes:
    return np.asarray(samples, dtype="<f4").tobytes()


def event_fields(event: Event) -> dict[str, bytes]:
    return {"kind": event.kind.encode(), "job": event.job_id.encode(),
            "from": event.sender.encode(), "detail": json.dumps(event.detail).encode(),
            "audio": event.audio}


def read_event(entry: str, data: Fields) -> Event:
    try:
        return Event(data[b"kind"].decode(), data[b"job"].decode(), data[b"from"].decode(),
                     json_value(data[b"detail"]), data.get(b"audio", b""), entry)
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as error:
        raise WireError(f"not an event entry: {error}") from error


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
