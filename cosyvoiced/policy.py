"""The supervisor's decisions about its worker, as pure functions of figures and time.

Kept free of processes and clocks so they are unit-tested directly.
"""

from __future__ import annotations

import signal

from cosyvoiced.config import WorkerConfig
from cosyvoiced.memory import Memory

AUTO_TIMEOUT_BASE_S = 30.0
AUTO_TIMEOUT_PER_CHAR_S = 0.2


def recycle_reason(memory: Memory, jobs_served: int, settings: WorkerConfig) -> str | None:
    """Why the worker should be replaced now, or None. Reasons: max_jobs, gpu_memory, rss.

    A worker that has served no job is never recycled for memory: over a limit already, its
    replacement would be too, and the daemon would do nothing but reload the model.
    """
    if settings.max_jobs and jobs_served >= settings.max_jobs:
        return "max_jobs"
    if jobs_served == 0:
        return None
    gpu = memory.gpu_peak_bytes
    if settings.gpu_memory_limit and gpu is not None and gpu > settings.gpu_memory_limit:
        return "gpu_memory"
    # > 0: an unresolved "auto" (RSS_LIMIT_AUTO, only in a WorkerConfig made alone) is off.
    if settings.rss_limit > 0 and memory.rss_bytes > settings.rss_limit:
        return "rss"
    return None


THRASH_RECYCLES = 3  # memory recycles in a row, each after at most one job: thrashing


def thrashing(served_before_memory_recycles: list[int]) -> bool:
    """Workers replaced for memory after at most one job each, several in a row: the limit is
    below what one job needs, and the daemon spends its time reloading the model."""
    recent = served_before_memory_recycles[-THRASH_RECYCLES:]
    return len(recent) == THRASH_RECYCLES and all(served <= 1 for served in recent)


def job_timeout_s(chars: int, settings: WorkerConfig) -> float:
    """How long a job may go without progress before its worker counts as hung."""
    if settings.job_timeout_s:
        return settings.job_timeout_s
    scaled = AUTO_TIMEOUT_BASE_S + AUTO_TIMEOUT_PER_CHAR_S * chars
    return min(settings.job_timeout_max_s, scaled)


def hung(last_progress: float, now: float, chars: int, settings: WorkerConfig) -> bool:
    return now - last_progress > job_timeout_s(chars, settings)


def silent(last_heard: float, now: float, settings: WorkerConfig) -> bool:
    """No heartbeat for too long: the worker process is stuck (stopped, or holding the GIL)."""
    return now - last_heard > settings.heartbeat_timeout_s


def respawn_delay_s(start_failures: int) -> float:
    """Back off after failed starts: 0, 1, 2, 4, ... seconds, at most 30."""
    return 0.0 if start_failures == 0 else min(2.0 ** (start_failures - 1), 30.0)


SETTLED_S = 10.0  # a worker ready this long has started: its slot's failures are forgiven


def failed_start(ready_at: float | None, now: float, segment_in_hand: bool) -> bool:
    """Whether a worker's end counts as a failed start of its slot: it never got ready, or
    it died idle within SETTLED_S of getting ready (an engine that cannot stay up backs
    off as one that cannot load). One that dies with a segment in hand is the job's
    doing: the job is retried, and fails as poison after two."""
    if ready_at is None:
        return True
    return not segment_in_hand and now - ready_at < SETTLED_S


def end_reason(lost_for: str, exitcode: int | None, start_timeout_s: float) -> str:
    """How a worker that did not say why it cannot load ended, as its failed start's
    reason: each slot's is its own worker's, never another's or an older one's."""
    if lost_for == "start_timeout":
        return f"engine did not load within {start_timeout_s:g} s"
    if exitcode is None:
        return f"the worker was given up on ({lost_for})"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the worker crashed: killed by {name} (exit code {exitcode})"
    return f"the worker exited with code {exitcode}"


def no_slot_can_serve(slots: list[tuple[int, bool]], max_start_failures: int) -> bool:
    """Give up (exit 3) only when every slot, as (failed starts in a row, has a ready
    worker), has failed its last `max_start_failures` starts and serves nothing: while
    one slot serves, the others keep trying, backing off."""
    return bool(slots) and all(failures >= max_start_failures and not ready
                               for failures, ready in slots)


def may_replace(others: list[tuple[bool, int]]) -> bool:
    """Whether a slot's worker may be recycled now, given the other slots as (has a ready
    worker, failed starts in a row). Not while another is loading, so that capacity does
    not drop to zero with several slots. A slot that has failed to start and has no ready
    worker does not count as loading: it may never load (a GPU short of memory), and
    waiting on it left the serving workers unrecycled for good (their memory limits,
    max_jobs, reloads and asked recycles ignored). Recycling the one serving worker then
    leaves none for one load, as any recycle does on a one-slot daemon."""
    return all(ready or failures > 0 for ready, failures in others)


MAX_ATTEMPTS = 2  # a job that kills two workers (or the daemon, or two hosts) is poison


def poisoned(deliveries: int) -> bool:
    """A cluster job delivered more than MAX_ATTEMPTS times (each delivery started on a
    host that then died) is not run again."""
    return deliveries > MAX_ATTEMPTS
