"""The worker processes the supervisor runs: one per slot, a spare, and those retiring.

A slot is a place for one worker (`placement.py`: its device and CPU share). The pool keeps
every slot filled and decides when to spawn, hand over, recycle and escalate, from the
figures the workers report and the deadlines it keeps; the supervisor owns jobs and asks it
what to do with the processes. Replacements happen one slot at a time (gunicorn's
`manage_workers`), so the others serve meanwhile. Nothing here blocks the supervisor's tick.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cosyvoiced import logs, memory, placement, policy
from cosyvoiced.config import Config
from cosyvoiced.messages import (
    EngineLoadFailed,
    EngineReady,
    EngineWarming,
    FromWorker,
    Heartbeat,
    LogLine,
)
from cosyvoiced.metrics import Metrics
from cosyvoiced.placement import Placement
from cosyvoiced.workerhandle import WorkerHandle, WorkerState

# A worker's segment in hand: (its last progress, monotonic; its length in characters).
Progress = Callable[[WorkerHandle], "tuple[float, int] | None"]

log = logs.get_logger("cosyvoiced.supervisor")
MEMORY_REASONS = ("rss", "gpu_memory")


@dataclass
class Slot:
    placement: Placement
    worker: WorkerHandle | None = None
    respawn_at: float = 0.0  # when empty: when to start its next worker


class WorkerPool:
    def __init__(self, config: Callable[[], Config], metrics: Metrics) -> None:
        self._config = config  # the running config, which a reload may replace
        self._metrics = metrics
        self.slots: list[Slot] = []
        self.leaving: list[WorkerHandle] = []  # of slots a reload removed: drained when idle
        self.spare: WorkerHandle | None = None  # loading to take over one slot (worker.spare)
        self.retiring: list[WorkerHandle] = []  # exiting, escalated at their deadlines
        self.generation = 0
        self.recycles: Counter[str] = Counter()
        self.reload_pending: set[int] = set()  # slots to recycle for a reload
        self.recycle_requests: dict[int, str] = {}  # slot -> why (an operator asked)
        self.last_recycle: dict[int, tuple[float, str]] = {}  # slot -> (wall clock, why)
        self.start_failures = 0
        self.last_load_error = ""
        self.memory_recycles: list[int] = []  # segments served by workers recycled for memory
        self.thrashing = False

    # -- what there is ----------------------------------------------------------------------
    def workers(self) -> list[WorkerHandle]:
        """The workers that serve (or may hold a segment): every slot's, and those leaving."""
        return [slot.worker for slot in self.slots if slot.worker is not None] + self.leaving

    def handles(self) -> list[WorkerHandle]:
        spare = [self.spare] if self.spare is not None else []
        return self.workers() + spare + self.retiring

    def idle(self) -> dict[int, WorkerHandle]:
        """Slot -> worker, for the workers with room for a segment now. A batched worker
        due for a recycle takes no more: it finishes its segments, then is replaced."""
        return {index: slot.worker for index, slot in enumerate(self.slots)
                if slot.worker is not None and slot.worker.free_streams and
                not (slot.worker.jobs and self._recycle_reason(slot.worker) is not None)}

    def stream_places(self) -> int:
        """Segments the ready workers make at once, busy or not."""
        return sum(worker.streams for worker in self.workers() if worker.ready)

    def free_places(self) -> int:
        """Segments the workers could take now: what the cluster is offered."""
        return sum(worker.free_streams for worker in self.idle().values())

    def messages(self, now: float) -> Iterator[tuple[WorkerHandle, FromWorker]]:
        for handle in self.handles():
            for message in handle.messages(now):
                yield handle, message

    def deadlines(self, stopping: bool) -> list[float]:
        deadlines = [h.deadline for h in self.retiring]
        if not stopping:
            deadlines += [slot.respawn_at for slot in self.slots if slot.worker is None]
        return deadlines

    def any_ready(self) -> bool:
        return any(worker.ready for worker in self.workers())

    # -- filling the slots ------------------------------------------------------------------
    def resize(self, now: float) -> None:
        """Match the slots to `worker.devices` x `worker.per_device` (at start and on reload).

        A slot whose device or CPU share changed is recycled; the workers of slots that are
        gone are drained once idle."""
        settings = self._config()
        plans = placement.plan(settings.worker.devices, settings.worker.per_device,
                               placement.usable_cores(), settings.engine.piper.threads)
        for index, plan in enumerate(plans):
            if index == len(self.slots):
                self.slots.append(Slot(plan, respawn_at=now))
            elif self.slots[index].placement != plan:
                self.slots[index].placement = plan
                self.reload_pending.add(index)
        for slot in self.slots[len(plans):]:
            if slot.worker is not None:
                self.leaving.append(slot.worker)
        del self.slots[len(plans):]
        self.reload_pending = {index for index in self.reload_pending if index < len(plans)}
        if self.spare is not None and self.spare.slot >= len(plans):
            self._drop_spare(now, "slot removed")

    def warn_if_gpus_unused(self) -> None:
        """A torch engine on "cpu" workers while the host has GPUs is almost always a config
        that predates `worker.devices` (workers used to see every GPU)."""
        settings = self._config()
        gpus = memory.nvml_device_count()
        if gpus and settings.engine.name != "piper" and \
                not any(device.startswith("cuda") for device in settings.worker.devices):
            log.warning("gpus_unused", gpus=gpus, devices=settings.worker.devices,
                        message=f"this host has {gpus} NVIDIA GPU(s) but worker.devices lists "
                                "none, so the engine runs on the CPU; list them, e.g. "
                                "devices = [\"cuda:0\"]")

    def spawn(self, now: float, slot: int, role: str = "active") -> WorkerHandle:
        self.generation += 1
        return WorkerHandle(self._config(), self.generation, now, self.slots[slot].placement,
                            role)

    def spawn_due(self, now: float) -> None:
        """A new worker in each empty slot once its old one is gone (its GPU memory with it)."""
        exiting = {handle.slot for handle in self.retiring}
        for index, slot in enumerate(self.slots):
            if slot.worker is None and index not in exiting and now >= slot.respawn_at and \
                    not (self.spare is not None and self.spare.slot == index):
                slot.worker = self.spawn(now, index)

    def drain_leaving(self, now: float) -> None:
        for worker in list(self.leaving):
            if worker.state not in (WorkerState.BUSY, WorkerState.DRAINING):
                self.leaving.remove(worker)
                worker.drain(now, self._config().worker.kill_grace_s)
                self.retiring.append(worker)

    def waitables(self) -> list[object]:
        """What the supervisor's loop wakes on: every worker's sentinel, and its pipe while
        it is open."""
        return [waitable for handle in self.handles() for waitable in
                (handle.sentinel, *([] if handle.conn.closed else [handle.conn]))]

    def reap(self, now: float) -> list[tuple[WorkerHandle, FromWorker]]:
        """Collect retired workers that exited, and the last messages they sent; escalate
        those past their deadline."""
        messages: list[tuple[WorkerHandle, FromWorker]] = []
        for handle in list(self.retiring):
            if not handle.alive():
                messages.extend((handle, message) for message in handle.messages(now))
                handle.reap()
                self.retiring.remove(handle)
            elif now >= handle.deadline:
                handle.escalate(now)
        return messages

    def take(self, worker: WorkerHandle, message: FromWorker, now: float,
             stopping: bool) -> FromWorker | None:
        """Act on a worker's message about itself (its log lines, heartbeats, loading);
        the others (the engine ready, its jobs) are returned for the supervisor to route."""
        match message:
            case LogLine(levelno, line):
                logs.forward(levelno, line)
            case Heartbeat(memory_now):
                worker.memory = memory_now
                if not worker.jobs and not stopping:
                    self.recycle_if_due(worker, now)
            case EngineWarming(load_s):
                worker.set_state(WorkerState.WARMING, load_s=load_s)
            case EngineLoadFailed(reason):
                self.last_load_error = reason
            case EngineReady():
                self.start_failures = 0
                worker.streams = max(1, message.streams)
                worker.set_state(WorkerState.IDLE, engine=message.engine,
                                 load_s=message.load_s, warmup_s=message.warmup_s,
                                 voices=[v.name for v in message.voices])
                return message  # its catalog is the service's
            case _:
                return message
        return None

    def recycle_all_due(self, workers: list[WorkerHandle], now: float) -> None:
        """Workers that just gave a segment back: recycled if a limit is passed, before
        the next segment goes out; a ready spare takes over."""
        for worker in workers:
            self.recycle_if_due(worker, now)
        self.promote_spare(now)

    def check(self, now: float, progress: Progress) -> list[tuple[WorkerHandle, str]]:
        """The workers to give up on, and why (gunicorn's murder_workers): exited, not
        loaded within worker.start_timeout_s, a segment with no progress for its job
        timeout, or an idle worker whose heartbeat went quiet. `progress(worker)` is the
        segment it holds: (its last progress, its length in characters), or None."""
        settings = self._config().worker
        lost = []
        for worker in self.workers():
            held = progress(worker)
            if not worker.alive():
                lost.append((worker, "exited"))
            elif not worker.ready and now - worker.started_at > settings.start_timeout_s:
                self.last_load_error = (f"engine did not load within "
                                        f"{settings.start_timeout_s:g} s")
                lost.append((worker, "start_timeout"))
            elif held is not None and policy.hung(held[0], now, held[1], settings):
                lost.append((worker, "job_timeout"))
            elif worker.ready and policy.silent(worker.last_heard, now, settings):
                lost.append((worker, "heartbeat_timeout"))
        return lost

    def healthy(self, now: float, progress: Progress) -> bool:
        """Every worker is busy with progress, idle and answering, or (re)starting in time:
        what the watchdog ping stands for."""
        settings = self._config().worker
        for worker in self.workers():
            if not worker.ready:
                continue  # (re)starting is progress; the start timeout bounds it
            held = progress(worker)
            if held is not None:
                if policy.hung(held[0], now, held[1], settings):
                    return False
            elif policy.silent(worker.last_heard, now, settings):
                return False
        return True

    def lose(self, worker: WorkerHandle, now: float, reason: str, quiet: bool = False) -> None:
        """Take a serving worker out of service (it died or must die): SIGTERM it if it
        still runs; its slot gets a new one. Logged as `worker_lost` unless `quiet` (the
        daemon is stopping)."""
        self.last_recycle[worker.slot] = (time.time(), reason)
        if not quiet:
            never_ready = worker.state in (WorkerState.STARTING, WorkerState.WARMING)
            log.error("worker_lost", reason=reason, generation=worker.generation,
                      slot=worker.slot, worker_pid=worker.pid, exitcode=worker.exitcode(),
                      during="start" if never_ready else "service")
        for slot in self.slots:
            if slot.worker is worker:
                slot.worker = None
                slot.respawn_at = now
        if worker in self.leaving:
            self.leaving.remove(worker)
        if worker.alive():
            worker.terminate(now, reason=reason)
        self.retiring.append(worker)
        self._metrics.worker_losses.labels(reason).inc()

    # -- the spare -------------------------------------------------------------------------
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
        self._drop_spare(now, "lost")
        return True

    def _drop_spare(self, now: float, reason: str) -> None:
        spare, self.spare = self.spare, None
        if spare is None:
            return
        if spare.alive():
            spare.terminate(now, reason=reason)
        self.retiring.append(spare)

    def promote_spare(self, now: float) -> None:
        """Hand a slot over to a ready spare once its worker has no segment in hand."""
        spare = self.spare
        if spare is None or not spare.ready:
            return
        slot = self.slots[spare.slot]
        old = slot.worker
        if old is not None:
            if old.state == WorkerState.BUSY:
                return
            old.drain(now, self._config().worker.kill_grace_s)
            self.retiring.append(old)
        slot.worker, self.spare = spare, None
        log.info("worker_promoted", generation=spare.generation, worker_pid=spare.pid,
                 slot=spare.slot)

    # -- recycling -------------------------------------------------------------------------
    def recycle_if_due(self, worker: WorkerHandle, now: float) -> None:
        """After a segment, and on idle heartbeats: replace a worker that passed a limit."""
        index = worker.slot
        if index >= len(self.slots) or self.slots[index].worker is not worker or \
                worker.state != WorkerState.IDLE or \
                (self.spare is not None and self.spare.slot == index):
            return
        settings = self._config().worker
        reason = self._recycle_reason(worker)
        if reason is None:
            self._warn_if_limit_below_idle(worker)
            return
        if not self._may_replace(index):
            return  # another slot is being replaced: one at a time
        self.reload_pending.discard(index)
        self.recycle_requests.pop(index, None)
        self.last_recycle[index] = (time.time(), reason)
        self.recycles[reason] += 1
        self._metrics.recycles.labels(reason).inc()
        log.info("worker_recycle", reason=reason, generation=worker.generation, slot=index,
                 segments_served=worker.segments_served, **worker.memory.to_dict(),
                 rss_limit=settings.rss_limit, gpu_memory_limit=settings.gpu_memory_limit,
                 max_jobs=settings.max_jobs, spare=settings.spare)
        if reason in MEMORY_REASONS:
            self._watch_thrash(worker, reason)
        if settings.spare:
            self.spare = self.spawn(now, index, role="spare")
        else:
            # The old process must be gone before the new one loads: only its exit gives
            # its GPU memory (the CUDA context) back.
            self.slots[index].worker = None
            self.slots[index].respawn_at = now
            worker.drain(now, settings.kill_grace_s)
            self.retiring.append(worker)

    def _recycle_reason(self, worker: WorkerHandle) -> str | None:
        """Why `worker` is due to be replaced (asked, a reload, a limit), or None."""
        index = worker.slot
        return self.recycle_requests.get(index) or (
            "reload" if index in self.reload_pending else policy.recycle_reason(
                worker.memory, worker.segments_served, self._config().worker))

    def request_recycle(self, slot: int, reason: str, now: float) -> bool:
        """Recycle a slot's worker as a memory recycle would (an operator asked): now if
        it is idle, else once its segment is in (its job goes on with the next worker).
        False if the slot has no worker."""
        worker = self.slots[slot].worker if 0 <= slot < len(self.slots) else None
        if worker is None:
            return False
        self.recycle_requests[slot] = reason
        self.recycle_if_due(worker, now)
        return True

    def _may_replace(self, index: int) -> bool:
        """Capacity never drops to zero: with several slots, one is replaced at a time."""
        if self.spare is not None:
            return False
        if len(self.slots) == 1:
            return True
        return all(slot.worker is not None and slot.worker.ready
                   for other, slot in enumerate(self.slots) if other != index)

    def _watch_thrash(self, worker: WorkerHandle, reason: str) -> None:
        self.memory_recycles = [*self.memory_recycles[-policy.THRASH_RECYCLES:],
                                worker.segments_served]
        thrashing = policy.thrashing(self.memory_recycles)
        if thrashing and not self.thrashing:
            settings = self._config().worker
            log.warning("memory_recycle_thrash", reason=reason,
                        recycles=len(self.memory_recycles),
                        segments_served=self.memory_recycles, **worker.memory.to_dict(),
                        rss_limit=settings.rss_limit,
                        gpu_memory_limit=settings.gpu_memory_limit,
                        message="workers are replaced for memory after at most one job "
                                "each: the limit is below what one job needs, and every job "
                                "pays a model load; raise the limit")
        self.thrashing = thrashing
        self._metrics.recycle_thrash.set(int(thrashing))

    def _warn_if_limit_below_idle(self, worker: WorkerHandle) -> None:
        """Say once per worker if a fresh, idle worker is already over a memory limit."""
        settings = self._config().worker
        if worker.segments_served or worker.warned_over_limit or \
                policy.recycle_reason(worker.memory, 1, settings) not in MEMORY_REASONS:
            return
        worker.warned_over_limit = True
        log.warning("memory_limit_below_idle", generation=worker.generation,
                    **worker.memory.to_dict(), rss_limit=settings.rss_limit,
                    gpu_memory_limit=settings.gpu_memory_limit,
                    message="a freshly loaded worker is already over a memory limit; it is "
                            "not recycled for it (its replacement would be too): raise the limit")

    # -- failures and the end --------------------------------------------------------------
    def start_failed(self, now: float, worker: WorkerHandle | None) -> bool:
        """Count a failed start (of a slot's worker, or of the spare: None); True once
        `worker.max_start_failures` is reached. The slot then waits before its next try."""
        self.start_failures += 1
        if self.start_failures >= self._config().worker.max_start_failures:
            return True
        if worker is not None and worker.slot < len(self.slots):
            self.slots[worker.slot].respawn_at = \
                now + policy.respawn_delay_s(self.start_failures)
        return False

    def retire_all(self, now: float, abandoned: set[int]) -> None:
        """At shutdown: drain every worker; terminate those holding a job left unfinished
        (`abandoned`: their generations)."""
        for worker in self.workers():
            if worker.generation in abandoned:
                worker.terminate(now, reason="drain timeout")
            else:
                worker.drain(now, self._config().worker.kill_grace_s)
            self.retiring.append(worker)
        for slot in self.slots:
            slot.worker = None
        self.leaving = []
        self._drop_spare(now, "stopping")
