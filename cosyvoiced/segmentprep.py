"""What a worker checks and builds before an engine sees a segment (the features the job
asks for, its voice, the engine's request), and what it reports when a segment fails.
Shared by the one-at-a-time loop (worker.py) and the batched one (workerstreams.py), so
that both refuse and fail alike."""

from __future__ import annotations

from cosyvoiced import logs
from cosyvoiced.engines import FEATURES, Engine, SynthesisRequest
from cosyvoiced.job import ErrorCode, Job, JobError, JobFailure
from cosyvoiced.messages import JobFailed

PROMPT_VOICE = "(prompt audio)"  # the voice reported for a job cloned from its prompt

log = logs.get_logger("cosyvoiced.worker")


def check_features(engine: Engine, job: Job) -> None:
    for name in FEATURES:
        if getattr(job, name) is not None and name not in engine.features:
            raise JobFailure(ErrorCode.NOT_SUPPORTED, f"{name}: the {engine.name} engine does "
                             "not support it", name)


def voice_for(engine: Engine, job: Job) -> str | None:
    """The voice to use; None when the prompt audio is the voice."""
    if job.voice is None and job.prompt_audio is not None:
        return None
    voice = job.voice or engine.default_voice()
    if voice is None:
        raise JobFailure(ErrorCode.MISSING_FIELD, "voice: this model has no built-in voice; "
                         "name a registered voice or send prompt_audio", "voice")
    names = sorted(v.name for v in engine.voices())
    if voice not in names:
        raise JobFailure(ErrorCode.UNKNOWN_VOICE, f"voice: {voice!r} is not available; choose "
                         f"one of: {', '.join(names)}", "voice")
    return voice


def request_for(job: Job, text: str, voice: str | None, index: int) -> SynthesisRequest:
    """The engine's request for segment `index` of `job` (a later one `continues`)."""
    return SynthesisRequest(text, voice, job.speed, job.stream, job.prompt_audio,
                            job.prompt_text, job.instruct, job.language, continues=index > 0)


def failed(job_id: str, error: Exception, index: int) -> JobFailed:
    """A segment's failure for the supervisor: the request's own error (`JobFailure`), or
    any other exception as an engine fault of this job alone, logged with its traceback."""
    if isinstance(error, JobFailure):
        return JobFailed(job_id, error.error)
    log.error("engine_error", job=job_id, segment=index,
              exc_info=(type(error), error, error.__traceback__))
    return JobFailed(job_id, JobError(ErrorCode.ENGINE_ERROR, f"{type(error).__name__}: {error}"))
