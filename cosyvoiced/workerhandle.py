"""The supervisor's handle on one worker process: spawn, talk, watch, retire.

It never imports the engine: the worker module is started by name with `spawn`, so the
supervisor stays free of torch, onnxruntime and any CUDA state. Nothing here blocks: the
pipe is read and written by threads of its own (workerpipe.py), so a worker that freezes
partway through a message is only silent, and a worker being retired is asked to exit, then
sent SIGTERM, then SIGKILL, each at a deadline the supervisor's tick checks.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterator
from dataclasses import replace
from enum import StrEnum

from cosyvoiced import logs, worker
from cosyvoiced.config import Config, EngineConfig
from cosyvoiced.engines import promptfiles
from cosyvoiced.memory import Memory
from cosyvoiced.messages import FromWorker, Shutdown, ToWorker
from cosyvoiced.placement import Placement
from cosyvoiced.workerpipe import WorkerPipe

log = logs.get_logger("cosyvoiced.supervisor")

FINAL_READ_S = 1.0  # a worker that exited: how long the tick waits for its last messages


class WorkerState(StrEnum):
    STARTING = "starting"  # process spawned, engine loading
    WARMING = "warming"  # engine loaded, warm-up synthesis running
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"  # told to exit (after the job in hand, if any)
    KILLING = "killing"  # sent SIGTERM (then SIGKILL): hung, or too slow to drain
    DEAD = "dead"


def _engine_config(config: Config, placement: Placement) -> EngineConfig:
    """The engine settings as this worker applies them: its share of the CPU threads."""
    piper = config.engine.piper
    return replace(config.engine, piper=replace(piper, threads=piper.threads or
                                                placement.cpu_threads))


class WorkerHandle:
    def __init__(self, config: Config, generation: int, now: float, placement: Placement,
                 role: str = "active") -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=True)
        self.generation = generation
        self.placement = placement
        self.state = WorkerState.STARTING
        self.started_at = now
        self.last_heard = now
        self.memory = Memory(0)
        self.segments_served = 0  # engine calls: a job is one per segment
        self.jobs: list[str] = []  # the jobs whose segments it has in hand
        self.streams = 1  # segments it makes at once (its engine's, once ready)
        self.warned_over_limit = False
        self.deadline = float("inf")  # when retiring: when to escalate
        self._kill_grace_s = config.worker.kill_grace_s
        self.process = context.Process(
            target=worker.main, name=f"cosyvoiced-worker-{generation}", daemon=False,
            args=(child, _engine_config(config, placement), config.log.level,
                  config.worker.heartbeat_interval_s, placement))
        self.process.start()
        child.close()
        # `conn` is what the pool's waitables name: readable while messages wait for the tick.
        self.conn = WorkerPipe(parent, f"cosyvoiced-worker-{generation}")
        self._final_read_s = FINAL_READ_S  # once: a worker that closed its pipe ends the read
        self._pipe_failure_seen = False
        log.info("worker_state", state=str(self.state), generation=generation,
                 worker_pid=self.pid, role=role, slot=placement.slot, device=placement.device)

    @property
    def slot(self) -> int:
        return self.placement.slot

    def describe(self) -> dict[str, object]:
        """What `stats` shows of this worker."""
        return {"slot": self.slot, "device": self.placement.device, "state": str(self.state),
                "generation": self.generation, "pid": self.pid, "jobs": list(self.jobs),
                "streams": len(self.jobs), "max_streams": self.streams,
                "segments_served": self.segments_served, **self.memory.to_dict()}

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    @property
    def ready(self) -> bool:
        return self.state in (WorkerState.IDLE, WorkerState.BUSY)

    @property
    def free_streams(self) -> int:
        """How many more segments it takes now: none unless it serves."""
        return max(0, self.streams - len(self.jobs)) if self.ready else 0

    def set_state(self, state: WorkerState, **detail: object) -> None:
        if state == self.state:
            return
        # Busy and idle alternate once per segment: debug, or a long job floods the journal.
        serving = {self.state, state} == {WorkerState.BUSY, WorkerState.IDLE}
        (log.debug if serving else log.info)(
            "worker_state", state=str(state), previous=str(self.state),
            generation=self.generation, worker_pid=self.pid, slot=self.slot, **detail)
        self.state = state

    def messages(self, now: float) -> Iterator[FromWorker]:
        """Whatever the worker has sent so far, whole messages only, without blocking; from
        a worker that exited, up to FINAL_READ_S for the last ones it sent."""
        if self.conn.closed:
            return iter(())
        self._kill_if_unreadable()
        exited = not self.process.is_alive()
        taken = self.conn.take(self._final_read_s if exited else 0.0)
        if exited:
            self._final_read_s = 0.0
        if taken:
            self.last_heard = now
        return iter(taken)

    def _kill_if_unreadable(self) -> None:
        """A pipe whose thread died (or whose worker sent what cannot be read) is no use: the
        worker is killed, and the pool finds it exited (its job: the crash rules)."""
        failure = self.conn.failure()
        if failure is None or self._pipe_failure_seen:
            return
        self._pipe_failure_seen = True
        log.error("worker_pipe_failed", generation=self.generation, worker_pid=self.pid,
                  slot=self.slot, reason=failure, message="killing the worker")
        if self.process.is_alive():
            self.process.kill()

    def send(self, message: ToWorker) -> bool:
        """Queued for the pipe's writing thread: False if the worker is gone (or reads
        nothing for so long that the queue is full)."""
        return self.conn.send(message)

    def alive(self) -> bool:
        return self.process.is_alive()

    def exitcode(self) -> int | None:
        return self.process.exitcode

    # -- retiring, without blocking the tick ---------------------------------------------------
    def drain(self, now: float, grace_s: float) -> None:
        """Ask for a clean exit; escalate if it has not happened within `grace_s`."""
        self.send(Shutdown())
        self.deadline = now + grace_s
        self.set_state(WorkerState.DRAINING)

    def terminate(self, now: float, **detail: object) -> None:
        """SIGTERM now, SIGKILL at the deadline."""
        if self.process.is_alive() and self.pid is not None:
            self.process.terminate()
        self.deadline = now + self._kill_grace_s
        self.set_state(WorkerState.KILLING, **detail)

    def escalate(self, now: float) -> None:
        """Past the deadline: SIGTERM a draining worker, SIGKILL a terminated one."""
        if self.state == WorkerState.KILLING:
            if self.process.is_alive() and self.pid is not None:
                log.warning("worker_sigkill", generation=self.generation, worker_pid=self.pid)
                self.process.kill()
            self.deadline = float("inf")
        else:
            self.terminate(now, reason="did not exit when asked")

    def reap(self) -> None:
        """Collect the exited process and close the pipe."""
        self.process.join(timeout=0)
        self.conn.close()
        code = self.process.exitcode
        signalled = signal.Signals(-code).name if code is not None and code < 0 else None
        self.set_state(WorkerState.DEAD, exitcode=code, signal=signalled)
        if code not in (0, None) and self.pid is not None:  # killed or crashed: reaped
            self._remove_prompt_files(self.pid)

    def _remove_prompt_files(self, pid: int) -> None:
        try:
            removed = promptfiles.remove_files_of(pid)
        except OSError as error:  # the temp directory itself: nothing of ours to do
            log.warning("prompt_files_not_removed", worker_pid=pid, error=str(error))
            return
        if removed:
            log.info("prompt_files_removed", worker_pid=pid, files=removed)

    def kill_now(self) -> None:
        """At shutdown only: SIGKILL and wait (a short, bounded wait)."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.reap()
