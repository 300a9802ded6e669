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
from typing import Any

from cosyvoiced import logs, memory, placement, policy
from cosyvoiced.config import Config, EngineConfig
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
REVERT_ENGINE, GIVE_UP = "revert_engine", "give_up"  # what a failed start asks of the daemon


@dataclass
class Slot:
    """A place for one worker, and how its starts went: each slot backs off on its own, so
    one that cannot load (a GPU short of memory) leaves the others serving."""

    placement: Placement
    worker: WorkerHandle | None = None
    respawn_at: float = 0.0  # when empty: when to start its next worker
    ready_at: float | None = None  # when its worker got ready; None until it does
    start_failures: int = 0  # in a row; forgiven once a worker has settled (policy)
    load_error: str = ""  # why its last start failed
    spare_lost: bool = False  # its last spare failed: its next recycle is in place

    def empty(self, now: float) -> None:
        self.worker, self.ready_at, self.respawn_at = None, None, now

    def failed(self, now: float, reason: str, max_start_failures: int) -> None:
        """Count a failed start; the next try waits longer (policy.respawn_delay_s)."""
        self.start_failures += 1
        self.load_error = reason
        self.respawn_at = now + policy.respawn_delay_s(self.start_failures)
        if self.start_failures == max_start_failures:
            log.error("slot_failing", slot=self.placement.slot, device=self.placement.device,
                      failures=self.start_failures, reason=reason,
                      message="this slot's worker failed to start "
                              f"{self.start_failures} times in a row; it is tried again "
                              "later, backing off, while the other slots serve")

    def failing(self, max_start_failures: int) -> bool:
        return self.start_failures >= max_start_failures and \
            not (self.worker is not None and self.worker.ready)


def warn_if_gpus_unused(settings: Config) -> None:
    """A torch engine on "cpu" workers while the host has GPUs is almost always a config
    that predates `worker.devices` (workers used to see every GPU)."""
    gpus = memory.nvml_device_count()
    if gpus and settings.engine.name != "piper" and \
            not any(device.startswith("cuda") for device in settings.worker.devices):
        log.warning("gpus_unused", gpus=gpus, devices=settings.worker.devices,
                    message=f"this host has {gpus} NVIDIA GPU(s) but worker.devices lists "
                            "none, so the engine runs on the CPU; list them, e.g. "
                            "devices = [\"cuda:0\"]")


class Starts:
    """How the slots' starts go: each slot's failures and backoff, and the engine settings
    that last loaded, which a reload whose engine cannot load goes back to."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self.loaded_engine: EngineConfig | None = None
        self.engines: dict[int, EngineConfig] = {}  # generation -> the settings it loads
        self.load_errors: dict[int, str] = {}  # generation -> why it said it cannot load

    def why_failed(self, worker: WorkerHandle, lost_for: str) -> str:
        """Why `worker` failed to start, as its slot's reason: what it said of its engine
        (EngineLoadFailed), else how it ended (a crash: its exit code or signal)."""
        said = self.load_errors.pop(worker.generation, None)
        return said or policy.end_reason(lost_for, worker.exitcode(),
                                         self._config().worker.start_timeout_s)

    def forget(self, generation: int) -> None:
        self.engines.pop(generation, None)
        self.load_errors.pop(generation, None)

    def loaded(self, slot: Slot | None, worker: WorkerHandle, now: float) -> None:
        if slot is not None:
            slot.ready_at = now
        engine = self.engines.get(worker.generation)
        if engine == self._config().engine:  # not a worker started before a revert
            self.loaded_engine = engine

    def forgive_if_settled(self, slot: Slot | None, now: float) -> None:
        if slot is not None and slot.start_failures and slot.ready_at is not None and \
                now - slot.ready_at >= policy.SETTLED_S:
            log.info("slot_recovered", slot=slot.placement.slot, failures=slot.start_failures)
            slot.start_failures, slot.load_error = 0, ""

    def failed(self, slot: Slot, slots: list[Slot], worker: WorkerHandle, now: float,
               reason: str) -> str | None:
        """A slot's worker failed to start (or to stay up just after): REVERT_ENGINE if its
        engine settings are a reload's that never loaded (the slot is not blamed), GIVE_UP
        if no slot can serve now, else None (the slot backs off)."""
        engine = self.engines.get(worker.generation)
        if self.loaded_engine is not None and engine != self.loaded_engine:
            return REVERT_ENGINE if self._config().engine == engine else None
        limit = self._config().worker.max_start_failures
        slot.failed(now, reason, limit)
        figures = [(each.start_failures, each.worker is not None and each.worker.ready)
                   for each in slots]
        if not policy.no_slot_can_serve(figures, limit):
            return None
        log.critical("worker_start_failed", failures=limit, reason=reason, exit_code=3,
                     message=f"the engine failed to start {limit} times in a row in every "
                             "slot; giving up so that systemd's limits apply")
        return GIVE_UP

    def stale(self, slots: list[Slot]) -> set[int]:
        """The slots whose worker was started with other engine settings than those that
        last loaded: recycled as a reload's after a revert."""
        return {index for index, slot in enumerate(slots) if slot.worker is not None and
                self.engines.get(slot.worker.generation) != self.loaded_engine}

    def revert(self, slots: list[Slot]) -> tuple[EngineConfig, set[int]]:
        """The engine settings to go back to, and the slots to recycle for them."""
        assert self.loaded_engine is not None  # asked only once some settings have loaded
        log.error("reload_engine_failed", engine=self.loaded_engine.name,
                  message="the reloaded engine settings failed to load; running the last "
                          "engine settings that loaded")
        return self.loaded_engine, self.stale(slots)

    def failing(self, slots: list[Slot]) -> list[dict[str, Any]]:
        """The slots that keep failing to start (`stats`, STATUS=)."""
        limit = self._config().worker.max_start_failures
        return [{"slot": slot.placement.slot, "device": slot.placement.device,
                 "tries": slot.start_failures, "error": slot.load_error}
                for slot in slots if slot.failing(limit)]


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
        self.last_load_error = ""  # why the last worker lost failed to start ("" if it had not)
        self.starts = Starts(config)
        self.spare_reason = ""  # why the spare loads: counted when it takes over
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

    def spawn(self, now: float, slot: int, role: str = "active") -> WorkerHandle:
        self.generation += 1
        self.starts.engines[self.generation] = self._config().engine
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
                self.starts.forget(handle.generation)
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
                self.starts.forgive_if_settled(self._slot_of(worker), now)
                if not worker.jobs and not stopping:
                    self.recycle_if_due(worker, now)
            case EngineWarming(load_s):
                worker.set_state(WorkerState.WARMING, load_s=load_s)
            case EngineLoadFailed(reason):
                if worker in self.handles():  # not one reaped: its record would stay
                    self.starts.load_errors[worker.generation] = reason
            case EngineReady():
                self.starts.loaded(self._slot_of(worker), worker, now)
                worker.streams = max(1, message.streams)
                worker.set_state(WorkerState.IDLE, engine=message.engine,
                                 load_s=message.load_s, warmup_s=message.warmup_s,
                                 voices=[v.name for v in message.voices])
                return message  # its catalog is the service's
            case _:
                return message
        return None

    def manage(self, freed: list[WorkerHandle], now: float) -> None:
        """Recycle, hand over, drain and spawn (gunicorn's manage_workers): `freed`, the
        workers that just gave a segment back, are recycled if due before dispatch."""
        self.recycle_all_due(freed, now)
        self.drain_leaving(now)
        self.spawn_due(now)

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

    def lose(self, worker: WorkerHandle, now: float, reason: str,
             quiet: bool = False) -> str | None:
        """Take a serving worker out of service (it died or must die): SIGTERM it if it
        still runs; its slot gets a new one. Logged as `worker_lost` unless `quiet` (the
        daemon is stopping). Returns what a failed start asks of the daemon: REVERT_ENGINE,
        GIVE_UP, or None."""
        self.last_recycle[worker.slot] = (time.time(), reason)
        never_ready = worker.state in (WorkerState.STARTING, WorkerState.WARMING)
        if not quiet:
            log.error("worker_lost", reason=reason, generation=worker.generation,
                      slot=worker.slot, worker_pid=worker.pid, exitcode=worker.exitcode(),
                      during="start" if never_ready else "service")
        slot, verdict = self._slot_of(worker), None
        if slot is not None:
            ready_at = None if never_ready else slot.ready_at
            slot.empty(now)
            failed = not quiet and policy.failed_start(ready_at, now, bool(worker.jobs))
            self.last_load_error = self.starts.why_failed(worker, reason) if failed else ""
            if failed:
                verdict = self.starts.failed(slot, self.slots, worker, now,
                                             self.last_load_error)
        if worker in self.leaving:
            self.leaving.remove(worker)
        if worker.alive():
            worker.terminate(now, reason=reason)
        self.retiring.append(worker)
        self._metrics.worker_losses.labels(reason).inc()
        return verdict

    # -- the spare -------------------------------------------------------------------------
    def check_spare(self, now: float) -> None:
        """Retire a spare that died or did not load in time. Its slot serves on with its
        worker, and is recycled in place next (a spare that cannot load, as when only one
        model fits, is not tried again at once); no failed start is counted."""
        spare = self.spare
        if spare is None:
            return
        timed_out = not spare.ready and \
            now - spare.started_at > self._config().worker.start_timeout_s
        if spare.alive() and not timed_out:
            return
        log.error("spare_lost", generation=spare.generation, exitcode=spare.exitcode(),
                  reason="start_timeout" if timed_out else "exited", slot=spare.slot,
                  error=self.starts.why_failed(spare, "start_timeout" if timed_out else
                                               "exited"), next_recycle="in place")
        if spare.slot < len(self.slots):
            self.slots[spare.slot].spare_lost = True
        self._drop_spare(now, "lost")

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
        slot.worker, slot.ready_at, self.spare = spare, now, None
        log.info("worker_promoted", generation=spare.generation, worker_pid=spare.pid,
                 slot=spare.slot)
        self._count_recycle(spare.slot, self.spare_reason)  # done only now it took over
        if self.starts.engines.get(spare.generation) != self._config().engine:
            self.reload_pending.add(spare.slot)  # a reload came while it loaded

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
        slot = self.slots[index]
        spare = settings.spare and not slot.spare_lost
        log.info("worker_recycle", reason=reason, generation=worker.generation, slot=index,
                 segments_served=worker.segments_served, **worker.memory.to_dict(),
                 rss_limit=settings.rss_limit, gpu_memory_limit=settings.gpu_memory_limit,
                 max_jobs=settings.max_jobs, spare=spare)
        if reason in MEMORY_REASONS:
            self._watch_thrash(worker, reason)
        if spare:  # counted, and a reload or request settled, when the spare takes over
            self.spare, self.spare_reason = self.spawn(now, index, role="spare"), reason
            return
        # The old process must be gone before the new one loads: only its exit gives
        # its GPU memory (the CUDA context) back.
        slot.empty(now)
        slot.spare_lost = False  # the next recycle tries a spare again
        worker.drain(now, settings.kill_grace_s)
        self.retiring.append(worker)
        self._count_recycle(index, reason)

    def _count_recycle(self, index: int, reason: str) -> None:
        self.reload_pending.discard(index)
        self.recycle_requests.pop(index, None)
        self.last_recycle[index] = (time.time(), reason)
        self.recycles[reason] += 1
        self._metrics.recycles.labels(reason).inc()

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
        """One slot is replaced at a time (a spare's load is one), and not while another
        loads; a slot that keeps failing to start does not hold the others back."""
        return self.spare is None and policy.may_replace(
            [(slot.worker is not None and slot.worker.ready, slot.start_failures)
             for other, slot in enumerate(self.slots) if other != index])

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
    def revert_engine(self) -> EngineConfig:
        """A reload's engine settings cannot load: the last that did, for the config; the
        workers started with the others are recycled as a reload's."""
        engine, self.reload_pending = self.starts.revert(self.slots)
        return engine

    def _slot_of(self, worker: WorkerHandle) -> Slot | None:
        """The slot `worker` serves (not a spare's, not one a reload removed)."""
        index = worker.slot
        slot = self.slots[index] if index < len(self.slots) else None
        return slot if slot is not None and slot.worker is worker else None

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
