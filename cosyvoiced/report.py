"""What the daemon says about itself: the `stats` answer and the STATUS= line.

Operators ask first whether a long job is still working or stuck, so both show every
worker (device, state, memory, generation) and each job in hand's progress: segments done
out of the total and the audio made so far.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cosyvoiced import __version__
from cosyvoiced.ledger import LedgerView
from cosyvoiced.metrics import Metrics, WorkerFigures
from cosyvoiced.pool import WorkerPool
from cosyvoiced.workerhandle import WorkerHandle, WorkerState

ANOTHER_CLIENTS = "(another client's)"  # a job id the asker may not see, in a worker's hands


def worker_jobs(worker: WorkerHandle, visible: Callable[[str], bool]) -> list[str]:
    """The ids of the jobs in `worker`'s hands, another client's unnamed (stats, console)."""
    return [job if visible(job) else ANOTHER_CLIENTS for job in worker.jobs]


@dataclass(frozen=True)
class Snapshot:
    """What the daemon says about itself is read from this, not from the supervisor."""

    ledger: LedgerView
    pool: WorkerPool
    engine_name: str  # the loaded engine's own name
    configured_engine: str  # engine.name, for "loading ..."
    ready: bool
    stopping: bool
    intake_failure: str | None
    reload_error: str | None
    cache: dict[str, Any] | None
    cluster: dict[str, Any] | None
    service_status: str  # "; cluster ...", "; N outcomes waiting for the disk" (or "")

SHOWN_JOBS = 3  # jobs in hand named in STATUS= (the line must stay short)


def stats(supervisor: Snapshot, uptime_s: float,
          visible: Callable[[str], bool] = lambda _job_id: True) -> dict[str, Any]:
    """The daemon's figures; job ids only where `visible(job_id)` (the asker's own jobs,
    or every job for an admin)."""
    ledger, pool = supervisor.ledger, supervisor.pool
    workers = [worker.describe() | {"jobs": worker_jobs(worker, visible)}
               for worker in pool.workers()]
    return {
        "version": __version__, "pid": os.getpid(), "engine": supervisor.engine_name,
        "ready": supervisor.ready, "uptime_s": round(uptime_s, 1),
        "queue_depth": len(ledger.queued()),
        "in_progress": sum(ledger.in_progress().values()),
        "running": [r.job.id for r in ledger.in_hand() if visible(r.job.id)],
        "progress": {r.job.id: r.progress() for r in ledger.jobs.values()
                     if r.started and visible(r.job.id)},
        "jobs": dict(ledger.counts),
        "reply_audio_bytes": ledger.reply_audio_bytes(),
        "workers": workers,
        "spare": None if pool.spare is None else pool.spare.describe(),
        "recycles": dict(pool.recycles),
        "recycle_thrash": pool.thrashing,
        "failing_slots": pool.starts.failing(pool.slots),
        "cache": supervisor.cache,
        "cluster": supervisor.cluster,
    }


def _state(supervisor: Snapshot) -> str:
    workers = supervisor.pool.workers()
    in_hand = supervisor.ledger.in_hand()
    if supervisor.intake_failure is not None:
        return f"stopping: {supervisor.intake_failure}"
    if supervisor.stopping:
        return "stopping"
    if in_hand:
        shown = ", ".join(f"{r.job.id} {r.done}/{len(r.segments)} segments "
                          f"{r.audio_s:.1f} s" for r in in_hand[:SHOWN_JOBS])
        more = f" (+{len(in_hand) - SHOWN_JOBS})" if len(in_hand) > SHOWN_JOBS else ""
        return f"busy {shown}{more}"
    if any(worker.ready for worker in workers):
        return "idle"
    if any(worker.state == WorkerState.WARMING for worker in workers):
        return "warming up"
    line = f"loading {supervisor.configured_engine}" if workers else "restarting worker"
    if supervisor.pool.last_load_error:
        line += f" (last load failed: {supervisor.pool.last_load_error})"
    return line


def _worker(worker: WorkerHandle) -> str:
    line = (f"worker {worker.slot} {worker.placement.device} gen {worker.generation} "
            f"{worker.state}, {worker.segments_served} segments, "
            f"{_streams(worker)}"
            f"rss {worker.memory.rss_bytes >> 20} MiB")
    gpu = worker.memory.gpu_peak_bytes
    if gpu is not None:
        line += f", gpu {gpu >> 20} MiB"
    return line


def _streams(worker: WorkerHandle) -> str:
    """A batched worker's segments in hand out of those it makes at once."""
    return f"{len(worker.jobs)}/{worker.streams} streams, " if worker.streams > 1 else ""


def status_line(supervisor: Snapshot) -> str:
    ledger, pool = supervisor.ledger, supervisor.pool
    counts = ledger.counts
    line = f"{_state(supervisor)}; queue {len(ledger.queued())}"
    in_progress = sum(ledger.in_progress().values())
    if in_progress:
        line += f"; in progress {in_progress}"
    line += f"; done {counts['done']}; failed {counts['failed']}"
    line += "".join(f"; {_worker(worker)}" for worker in pool.workers())
    if pool.recycles:
        line += "; recycled " + ", ".join(
            f"{reason} {n}" for reason, n in sorted(pool.recycles.items()))
    if pool.thrashing:
        line += "; recycling for memory after every job: raise the limit"
    line += "".join(f"; slot {slot['slot']} {slot['device']} failing to start "
                    f"({slot['tries']} tries): {slot['error']}"
                    for slot in pool.starts.failing(pool.slots))
    line += supervisor.service_status
    if supervisor.reload_error:
        line += f"; config reload failed, running the old one: {supervisor.reload_error}"
    return line


def publish(metrics: Metrics, ledger: LedgerView, pool: WorkerPool) -> None:
    """The gauges of the queue and the workers, as of this tick."""
    metrics.queue_depth.set(len(ledger.queued()))
    metrics.jobs_in_progress.set(sum(ledger.in_progress().values()))
    for where, size in ledger.reply_audio_bytes().items():
        metrics.reply_audio.labels(where).set(size)
    metrics.workers.set(len(pool.slots))
    metrics.worker_generation.set(pool.generation)
    figures: dict[tuple[str, str], WorkerFigures] = {}
    for worker in pool.handles():  # a spare's and a retiring one's memory too
        labels = (str(worker.slot), worker.placement.device)
        figures.setdefault(labels, WorkerFigures()).add(worker.memory, len(worker.jobs),
                                                        worker.streams)
    metrics.workers_now(figures)
