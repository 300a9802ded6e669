"""The part of the daemon's one service that every network intake calls: admission (with
the one count of each client's requests in flight, and the unknown-voice check), the queue,
cancelling, and the voices clients register (`catalog`). Each intake's own `Service`
protocol adds what it alone needs; `cosyvoiced.service.Service` implements them all."""

from __future__ import annotations

from typing import Any, Protocol

from cosyvoiced.admission import InFlight, PerClient
from cosyvoiced.clients import Identity
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.job import Job, JobError


class VoiceCatalog(Protocol):
    """The voices clients register and remove (catalog.py)."""

    def registration_refusal(self, identity: Identity, name: Any, prompt_text: Any,
                             language: Any = ...) -> JobError | None: ...

    def store_voice(self, identity: Identity, name: Any, prompt_text: Any, audio_flac: bytes,
                    language: Any = ...) -> VoiceInfo | JobError: ...

    def remove_voice(self, identity: Identity, name: Any) -> JobError | None: ...


class IntakeService(Protocol):
    ready: bool
    # An intake adds a request as it queues it, and says when it is done with it.
    in_flight: InFlight

    def refusal(self, identity: Identity,
                per_client: PerClient | None = ...) -> JobError | None: ...

    def check_voice(self, voice: Any) -> None: ...

    def enqueue(self, job: Job) -> None: ...

    def cancel(self, job_id: str, identity: Identity = ...) -> bool: ...

    def undelivered(self, job_id: str, source: str) -> None:
        """A reply's job ended done, but its client did not get the whole reply (counted
        once, and only for a job that ended done)."""

    def keep_prompt(self, job_id: str, prompt: bytes) -> str: ...

    @property
    def voices(self) -> list[VoiceInfo]: ...

    @property
    def engine_name(self) -> str: ...

    @property
    def catalog(self) -> VoiceCatalog: ...
