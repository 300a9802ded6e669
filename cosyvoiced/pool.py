"""The worker processes the supervisor runs: the active one, a spare, and those retiring.

It decides when to spawn, hand over, recycle and escalate, from the figures the workers
report and the deadlines it keeps; the supervisor owns jobs and asks it what to do with the
processes. Nothing here blocks the supervisor's tick.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from cosyvoiced import logs, policy
from cosyvoiced.config import Config
from cosyvoiced.messages import FromWorker
from cosyvoiced.metrics import Metrics
from cosyvoiced.workerhandle import WorkerHandle, WorkerState

log = logs.get_logger("cosyvoiced.supervisor")


class WorkerPool:
    def __init__(self, config: Callable[[], Config], metrics: Metrics) -> None:
        self._config = config  # the running config, which a reload may replace
        self._metrics = metrics
        self.active: WorkerHandle | None = None  # the one that serves jobs
        self.spare: WorkerHandle | None = None  # loading to take over (worker.spare)
        self.retiring: list[WorkerHandle] = []  # exiting, escalated at their deadlines
        self.generation = 0
        self.recycles: Counter[str] = Counter()
        self.recycle_pending: str | None = None  # decided; the spare is loading
        self.recycle_requested: str | None = None  # by a reload that changed the engine
        self.start_failures = 0
        self.last_load_error = ""
        self.respawn_at = 0.0

    def handles(self) -> list[WorkerHandle]:
        return [h for h in (self.active, self.spare, *self.retiring) if h is not None]

    def messages(self, now: float) -> Iterator[tuple[WorkerHandle, FromWorker]]:
        for handle in self.handles():
            for message in handle.messages(now):
                yield handle, message

    def deadlines(self, stopping: bool) -> list[float]:
        deadlines = [h.deadline for h in self.retiring]
        if self.active is None and not stopping:
            deadlines.append(self.respawn_at)
        return deadlines

    def spawn(self, now: float, role: str = "active") -> WorkerHandle:
        self.generation += 1
        return WorkerHandle(self._config(), self.generation, now, role)

    def spawn_if_due(self, now: float) -> None:
        """A new active worker once the old ones are gone (their GPU memory with them)."""
        if self.active is None and self.spare is None and not self.retiring and \
                now >= self.respawn_at:
            self.active = self.spawn(now)

    def reap(self, now: float, deliver: Callable[[WorkerHandle, FromWorker], None]) -> None:
        """Collect retired workers that exited; escalate those past their deadline."""
        for handle in list(self.retiring):
            if not handle.alive():
                for message in handle.messages(now):
                    deliver(handle, message)
                handle.reap()
                self.retiring.remove(handle)
            elif now >= handle.deadline:
                handle.escalate(now)

    def retire_active(self, now: float, reason: str) -> WorkerHandle | None:
        """Take the active worker out of service: SIGTERM it if it still runs."""
        worker, self.active = self.active, None
        if worker is None:
            return None
        if worker.alive():
            worker.terminate(now, reason=reason)
        self.retiring.append(worker)
        self._metrics.worker_losses.labels(reason).inc()
        self.respawn_at = now
        return worker

    def spare_failed(self, now: float) -> bool:
        """True if the spare died or did not load in time (it is then retired)."""
        spare = self.spare
        if spare is None:
            return False
        timed_out = not spare.ready and \
            now - spare.started_at > self._config().worker.start_timeout_s
        if spare.alive() and not timed_out:
            return False
        log.error("spare_lost", generation=spare.generation, exitcode=spare.exitcode(),
                  reason="start_timeout" if timed_out else "exited")
        self.spare = None
        self.recycle_pending = None  # decided again at the next check
        if spare.alive():
            spare.terminate(now)
        self.retiring.append(spare)
        return True

    def promote_spare(self, now: float) -> None:
        """Hand over to a ready spare once the active worker has no job in hand."""
        spare = self.spare
        if spare is None or not spare.ready:
            return
        active = self.active
        if active is not None:
            if active.state == WorkerState.BUSY:
                return
            active.drain(now, self._config().worker.kill_grace_s)
            self.retiring.append(active)
        self.active, self.spare, self.recycle_pending = spare, None, None
        log.info("worker_promoted", generation=spare.generation, worker_pid=spare.pid)

    def recycle_if_due(self, now: float) -> None:
        """After a job, and on idle heartbeats: replace a worker that passed a limit."""
        worker = self.active
        if worker is None or worker.state != WorkerState.IDLE or self.recycle_pending:
            return
        settings = self._config().worker
        reason = self.recycle_requested or policy.recycle_reason(worker.memory,
                                                                 worker.jobs_served, settings)
        if reason is None:
            self._warn_if_limit_below_idle(worker)
            return
        self.recycle_requested = None
        self.recycles[reason] += 1
        self._metrics.recycles.labels(reason).inc()
        log.info("worker_recycle", reason=reason, generation=worker.generation,
                 jobs_served=worker.jobs_served, **worker.memory.to_dict(),
                 rss_limit=settings.rss_limit, gpu_memory_limit=settings.gpu_memory_limit,
                 max_jobs=settings.max_jobs, spare=settings.spare)
        if settings.spare:
            self.recycle_pending = reason
            self.spare = self.spawn(now, role="spare")
        else:
            # The old process must be gone before the new one loads: only its exit gives
            # its GPU memory (the CUDA context) back.
            self.active = None
            worker.drain(now, settings.kill_grace_s)
            self.retiring.append(worker)
            self.respawn_at = now

    def _warn_if_limit_below_idle(self, worker: WorkerHandle) -> None:
        """Say once per worker if a fresh, idle worker is already over a memory limit."""
        settings = self._config().worker
        if worker.jobs_served or worker.warned_over_limit or \
                policy.recycle_reason(worker.memory, 1, settings) not in ("rss", "gpu_memory"):
            return
        worker.warned_over_limit = True
        log.warning("memory_limit_below_idle", generation=worker.generation,
                    **worker.memory.to_dict(), rss_limit=settings.rss_limit,
                    gpu_memory_limit=settings.gpu_memory_limit,
                    message="a freshly loaded worker is already over a memory limit; it is "
                            "not recycled for it (its replacement would be too): raise the limit")

    def start_failed(self, now: float) -> bool:
        """Count a failed start; True once `worker.max_start_failures` is reached."""
        self.start_failures += 1
        if self.start_failures >= self._config().worker.max_start_failures:
            return True
        self.respawn_at = now + policy.respawn_delay_s(self.start_failures)
        return False

    def retire_all(self, now: float, job_in_hand: bool) -> None:
        """At shutdown: drain the active worker (or kill it, if its job is abandoned)."""
        worker, spare = self.active, self.spare
        self.active = self.spare = None
        if worker is not None:
            if job_in_hand:
                worker.terminate(now, reason="drain timeout")
            else:
                worker.drain(now, self._config().worker.kill_grace_s)
            self.retiring.append(worker)
        if spare is not None:
            spare.terminate(now, reason="stopping")
            self.retiring.append(spare)
