"""What the web console shows and may do, read and done on the supervisor's thread.

The console's handlers run on the HTTP loop thread and never touch the job book or the
pool: they ask the tick (`ReplyIntake.ask`) to run the functions here against the service,
which is what every intake sees. `snapshot` is the board: the jobs in hand from every
intake, the last ended ones, the workers against their limits, the cache, the cluster
and its hosts (roster.py).
The actions go down the daemon's own paths: a recycle is the pool's (as for memory: its
segment finishes first, the job goes on with the next worker), a reload is SIGHUP.
Who may do what is `rights`, a pure decision.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from cosyvoiced import logs
from cosyvoiced.clients import Identity
from cosyvoiced.config import Config
from cosyvoiced.engines import VoiceInfo
from cosyvoiced.ledger import LedgerView, Running
from cosyvoiced.pool import WorkerPool
from cosyvoiced.report import worker_jobs
from cosyvoiced.workerhandle import WorkerHandle

ENDED_SHOWN = 50
RECYCLE_REASON = "console"
# Who acts through a console without API keys: the loopback operator, as a local
# cosyvoicectl is (the listener refuses a public address without keys).
OPERATOR = Identity(owner="admin", client="console", share="admin", admin=True,
                    name="console")

log = logs.get_logger("cosyvoiced.console")


class _Figures(Protocol):
    def figures(self) -> dict[str, Any] | None: ...


class _Hosts(Protocol):
    def hosts(self, now: float) -> list[dict[str, Any]]: ...


class Daemon(Protocol):
    """What the board reads of the service (service.Service)."""

    @property
    def ledger(self) -> LedgerView: ...

    @property
    def pool(self) -> WorkerPool | None: ...

    @property
    def cache(self) -> _Figures: ...

    @property
    def sharing(self) -> _Figures | None: ...

    @property
    def roster(self) -> _Hosts | None: ...

    @property
    def engine_name(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def voices(self) -> list[VoiceInfo]: ...

    @property
    def config(self) -> Config: ...

    def visible(self, job_id: str, identity: Identity = ...) -> bool: ...

    def cancel(self, job_id: str, identity: Identity = ...) -> bool: ...


@dataclass(frozen=True)
class Rights:
    view: bool  # the board: jobs (those it may see), workers, cache
    logs: bool  # the log tail: every client's lines
    act: bool  # recycle a worker, reload the config


def rights(identity: Identity | None, keys_on: bool, loopback: bool = True) -> Rights:
    """Without API keys the console is the operator's on loopback: everything. From another
    address (a listener opened by http.allow_insecure) it is a client's board of its own
    jobs: a trusted network is still no operator. With keys, a key sees its own jobs; the
    log tail and the daemon's buttons need an admin key ([http.keys.NAME] admin = true)."""
    if not keys_on:
        return Rights(view=True, logs=loopback, act=loopback)
    if identity is None:
        return Rights(view=False, logs=False, act=False)
    return Rights(view=True, logs=identity.admin, act=identity.admin)


# -- the board --------------------------------------------------------------------------------
def snapshot(daemon: Daemon, identity: Identity) -> dict[str, Any]:
    ledger = daemon.ledger
    queued = {r.job.id: n for n, r in enumerate(ledger.queued())}
    jobs = [job_row(r, queued.get(r.job.id)) for r in ledger.jobs.values()
            if daemon.visible(r.job.id, identity)]
    jobs += [{"id": job.id, "source": job.source, "voice": job.voice, "state": "writing"}
             for job in ledger.written.values() if daemon.visible(job.id, identity)]
    ended = ended_rows(reversed(ledger.finished.items()), ENDED_SHOWN,
                       lambda job_id: daemon.visible(job_id, identity))
    pool = daemon.pool
    return {
        "engine": daemon.engine_name, "ready": daemon.ready, "stopping": daemon.stopping,
        "voices": [v.name for v in daemon.voices],
        "jobs": jobs, "ended": ended, "counts": dict(ledger.counts),
        "workers": [] if pool is None else workers(
            pool, daemon.config, lambda job_id: daemon.visible(job_id, identity)),
        "cache": daemon.cache.figures(),
        "cluster": None if daemon.sharing is None else daemon.sharing.figures(),
        "hosts": None if daemon.roster is None else daemon.roster.hosts(time.monotonic()),
    }


def job_row(running: Running, position: int | None) -> dict[str, Any]:
    """One job not ended: where it came from, its voice, its progress, who serves it."""
    job = running.job
    row: dict[str, Any] = {
        "id": job.id, "source": job.source, "voice": running.voice or job.voice,
        "state": "running" if running.started else "queued", "chars": job.chars,
        "segments_done": running.done, "segments": len(running.segments),
        "audio_s": round(running.audio_s, 3), "received_at": job.received_at,
        "served_by": running.served_by or None,
        "worker": None if running.holder is None else running.holder.slot,
        "cancelling": running.cancel_requested}
    if running.first_chunk_s:
        row["first_chunk_s"] = round(running.first_chunk_s, 4)
    if position is not None:
        row["position"] = position
    return row


def ended_rows(finished: Iterable[tuple[str, dict[str, Any]]], count: int,
               visible: Callable[[str], bool]) -> list[dict[str, Any]]:
    """The last `count` ended jobs `visible(job_id)` lets the asker see, newest first, each
    with its outcome, or its error's code and message."""
    rows = ({"id": job_id, **_outcome(record)} for job_id, record in finished
            if visible(job_id))
    return list(itertools.islice(rows, count))


def _outcome(record: dict[str, Any]) -> dict[str, Any]:
    row = {"state": record.get("state"), "source": record.get("source")}
    error = record.get("error")
    if isinstance(error, dict):
        row |= {"code": error.get("code"), "message": error.get("message")}
    for key in ("served_by", "cached", "output"):
        if record.get(key) is not None:
            row[key] = record[key]
    return row


def workers(pool: WorkerPool, config: Config,
            visible: Callable[[str], bool]) -> list[dict[str, Any]]:
    """Each serving worker (and a spare), with its memory against the limits, its slot's
    last recycle, and the ids of the jobs in its hands that are `visible` (another
    client's job is there, unnamed, as in `stats`)."""
    limits = {"rss_limit": config.worker.rss_limit,
              "gpu_memory_limit": config.worker.gpu_memory_limit}
    spare = [] if pool.spare is None else [pool.spare]
    return [worker_row(worker, pool, limits, role="spare" if worker in spare else "active",
                       visible=visible)
            for worker in pool.workers() + spare]


def worker_row(worker: WorkerHandle, pool: WorkerPool, limits: dict[str, int],
               role: str, visible: Callable[[str], bool]) -> dict[str, Any]:
    recycled = pool.last_recycle.get(worker.slot)
    return worker.describe() | limits | {"jobs": worker_jobs(worker, visible),
        "role": role, "gpu_peak_bytes": worker.memory.gpu_peak_bytes,
        "last_recycle": None if recycled is None else
        {"at": recycled[0], "reason": recycled[1]}}


# -- the actions ------------------------------------------------------------------------------
def recycle(daemon: Daemon, slot: int, who: str) -> bool:
    """Recycle slot `slot`'s worker as a memory recycle would; False if there is none."""
    pool = daemon.pool
    if pool is None or daemon.stopping:
        return False
    done = pool.request_recycle(slot, RECYCLE_REASON, time.monotonic())
    log.info("console_action", action="recycle", slot=slot, key=who, accepted=done)
    return done


def reload(who: str) -> None:
    """The config is re-read exactly as for `systemctl reload` (SIGHUP to this process)."""
    log.info("console_action", action="reload", key=who)
    os.kill(os.getpid(), signal.SIGHUP)


def cancel(daemon: Daemon, job_id: str, identity: Identity) -> bool:
    """Cancel a job `identity` may cancel; False if there is none such. Only a cancel done
    is logged here: the console counts those of no job (any id can be sent, as fast as the
    client's rate lets it) in one throttled line."""
    done = daemon.cancel(job_id, identity)
    if done:
        log.info("console_action", action="cancel", job=job_id, key=identity.name,
                 accepted=True)
    return done
