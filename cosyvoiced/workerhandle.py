"""The supervisor's handle on one worker process: spawn, talk, watch, stop, kill.

It never imports the engine: the worker module is started by name with `spawn`, so the
supervisor stays free of torch, onnxruntime and any CUDA state.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from enum import StrEnum
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from cosyvoiced import logs, worker
from cosyvoiced.config import Config
from cosyvoiced.messages import FromWorker, Shutdown, ToWorker

log = logs.get_logger("cosyvoiced.supervisor")


class WorkerState(StrEnum):
    STARTING = "starting"  # process spawned, engine loading
    WARMING = "warming"  # engine loaded, warm-up synthesis running
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"  # asked to exit after the job in hand
    DEAD = "dead"


def _spawn_worker(config: Config, conn: Connection) -> BaseProcess:
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=worker.main, name="cosyvoiced-worker", daemon=False,
        args=(conn, config.engine, config.log.level, config.worker.heartbeat_interval_s))
    process.start()
    return process


class WorkerHandle:
    def __init__(self, config: Config, generation: int, now: float) -> None:
        parent, child = multiprocessing.get_context("spawn").Pipe(duplex=True)
        self.generation = generation
        self.state = WorkerState.STARTING
        self.started_at = now
        self.last_heard = now
        self.rss_bytes = 0
        self.jobs_served = 0
        self.conn = parent
        self.process = _spawn_worker(config, child)
        child.close()
        log.info("worker_state", state=str(self.state), generation=generation,
                 worker_pid=self.process.pid)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def set_state(self, state: WorkerState, **detail: object) -> None:
        if state != self.state:
            log.info("worker_state", state=str(state), previous=str(self.state),
                     generation=self.generation, worker_pid=self.pid, **detail)
            self.state = state

    def messages(self, now: float) -> Iterator[FromWorker]:
        """Whatever the worker has sent so far, without blocking."""
        try:
            while self.conn.poll():
                message: FromWorker = self.conn.recv()
                self.last_heard = now
                yield message
        except (EOFError, OSError):
            return

    def send(self, message: ToWorker) -> bool:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):
            return False
        return True

    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self, timeout_s: float) -> None:
        """Ask the worker to exit; escalate to SIGTERM, then SIGKILL, if it does not."""
        self.send(Shutdown())
        self.process.join(timeout_s)
        self.kill()

    def kill(self, grace_s: float = 5.0) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(grace_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
        self.set_state(WorkerState.DEAD, exitcode=self.process.exitcode)

    def exitcode(self) -> int | None:
        return self.process.exitcode

    def uptime(self) -> float:
        return time.monotonic() - self.started_at
