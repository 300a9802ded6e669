"""The supervisor's end of one worker's pipe, read and written by two threads of its own.

The tick used to read the pipe itself (`while conn.poll(): conn.recv()`). `poll()` says only
that a message has begun: a worker that froze partway through one bigger than the socket's
buffer (about 208 KiB; a non-streamed CosyVoice segment is one chunk of 1-2 MB) - SIGSTOP, a
cgroup freeze, a native thread holding its GIL, a GPU driver hang - held the tick in `recv()`
for good: no watchdog ping, no timeout acted on, SIGTERM not heard. Writing was the same: a
`RunSegment` to a worker that reads nothing. So, as the encoder does (encoding.py):

- the reading thread receives whole messages into a buffer that the tick empties (`take`);
  while something waits there, this object is readable for the tick's wait (`fileno`), which
  is how the tick is woken;
- the writing thread writes what `send` queued, so a worker that reads nothing holds that
  thread, never the tick.

A worker that stalls is then only silent, and the heartbeat and job timeouts find it as they
find a hung engine. Bounds: the buffer holds at most MAX_HELD_BYTES and MAX_HELD_MESSAGES
(one message more when it is empty), after which the reader waits for the tick, and the worker
with it; at most MAX_QUEUED_SENDS messages wait to be written. A thread that dies, or a
message that cannot be unpickled, is logged and `failure()` says why: the handle then kills
the worker (workerhandle.py), whose job follows the crash rules.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from cosyvoiced import logs
from cosyvoiced.messages import FromWorker, ToWorker

log = logs.get_logger("cosyvoiced.supervisor")

MAX_HELD_BYTES = 16 << 20  # received, not yet taken by the tick: eight 2 MB segments
MAX_HELD_MESSAGES = 1024  # small ones (log lines) count too
MAX_QUEUED_SENDS = 64  # a worker is sent a few at a time (its segments, a cancel, a shutdown)
_JOIN_S = 1.0  # at close, how long each thread may take to end (the socket is shut down first)


class WorkerPipe:
    """One worker's pipe (`conn`, a duplex `multiprocessing` Pipe end): `send` and `take`
    never block on the worker; `fileno` makes it a waitable for `multiprocessing.connection
    .wait`, ready while messages wait to be taken (or the pipe ended or failed)."""

    def __init__(self, conn: Connection, name: str) -> None:
        self._conn = conn
        self._lock = threading.Condition()
        self._held: deque[tuple[FromWorker, int]] = deque()  # with each message's size
        self._held_bytes = 0
        self._sends: deque[memoryview] = deque()  # the first is being written
        self._ended = False  # the reader met the end of the pipe: the worker is gone
        self._broken = False  # a write failed: the worker is gone
        self._closing = False
        self._closed = False
        self._said_full = False
        self._failure: str | None = None
        self._ready_in, self._ready_out = socket.socketpair()
        for end in (self._ready_in, self._ready_out):
            end.setblocking(False)
        self._threads = [
            threading.Thread(target=self._guarded, args=(self._read_loop,),
                             name=f"{name}-read", daemon=True),
            threading.Thread(target=self._guarded, args=(self._write_loop,),
                             name=f"{name}-write", daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- the tick's side ---------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        """Readable while there is something for the tick (what `wait` needs)."""
        return self._ready_in.fileno()

    def failure(self) -> str | None:
        """Why the worker's messages can no longer be read, if a thread died or a message
        could not be unpickled."""
        with self._lock:
            return self._failure

    def send(self, message: ToWorker) -> bool:
        """Queue `message` for the writing thread. False if it cannot go: the worker is gone,
        the pipe is closed, or MAX_QUEUED_SENDS are still unwritten."""
        # Pickled here: a message that cannot be pickled is the caller's error, as it was.
        data = ForkingPickler.dumps(message)
        with self._lock:
            if self._closing or self._broken or self._ended or self._failure is not None:
                return False
            if len(self._sends) >= MAX_QUEUED_SENDS:
                if not self._said_full:  # once until the worker reads again
                    self._said_full = True
                    log.warning("worker_pipe_full", thread=self._threads[1].name,
                                unwritten=len(self._sends), message="the worker reads nothing")
                return False
            self._sends.append(data)
            self._lock.notify_all()
        return True

    def take(self, until_end_s: float = 0.0) -> list[FromWorker]:
        """What the worker sent since the last call, in order. Never waits, unless
        `until_end_s`: then up to that long for the reader to reach the end of the pipe (a
        worker that exited: the last messages it sent)."""
        with contextlib.suppress(BlockingIOError, OSError):
            while self._ready_in.recv(4096):  # before taking: a later message wakes again
                pass
        taken: list[FromWorker] = []
        deadline = time.monotonic() + until_end_s
        with self._lock:
            while True:
                taken.extend(message for message, _ in self._held)
                self._held.clear()
                self._held_bytes = 0
                self._lock.notify_all()  # the reader may wait for room
                remaining = deadline - time.monotonic()
                if self._ended or self._closing or self._failure is not None or remaining <= 0:
                    return taken
                self._lock.wait_for(lambda: self._ended or self._failure is not None or
                                    bool(self._held), remaining)

    def close(self) -> None:
        """Stop both threads (the socket is shut down: a read or write in progress ends) and
        close the pipe. Quick: the worker has exited, or is being killed."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        with contextlib.suppress(OSError), socket.fromfd(
                self._conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as end:
            end.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(_JOIN_S)
        running = [thread.name for thread in self._threads if thread.is_alive()]
        if running:
            # Never close a descriptor a thread may still be in a read of: its number is
            # given to the next file opened, and the thread would read that.
            log.error("worker_pipe_not_closed", threads=running)
            return
        self._conn.close()
        self._ready_in.close()
        self._ready_out.close()

    # -- the threads -------------------------------------------------------------------------
    def _read_loop(self) -> None:
        while True:
            try:
                data = self._conn.recv_bytes()
            except (EOFError, OSError):
                break  # the worker is gone (or the pipe was shut down at close)
            try:
                message: FromWorker = ForkingPickler.loads(data)
            except Exception as error:  # noqa: BLE001 - reported: the handle kills the worker
                self._fail(f"a message from the worker could not be read: "
                           f"{type(error).__name__}: {error}")
                return
            if not self._hold(message, len(data)):
                return
        with self._lock:
            self._ended = True
            self._lock.notify_all()
        self._wake()

    def _hold(self, message: FromWorker, size: int) -> bool:
        """Keep `message` for the tick, once there is room; False if closing."""
        with self._lock:
            self._lock.wait_for(lambda: self._closing or not self._held or (
                self._held_bytes + size <= MAX_HELD_BYTES and
                len(self._held) < MAX_HELD_MESSAGES))
            if self._closing:
                return False
            self._held.append((message, size))
            self._held_bytes += size
        self._wake()  # after it is held: a `take` that drained the wake-up before sees it
        return True

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._closing or bool(self._sends))
                if self._closing:
                    return
                data = self._sends[0]
            try:
                self._conn.send_bytes(data)
            except (OSError, ValueError):
                with self._lock:
                    self._broken = True  # the worker is gone: the tick sees it exit
                    self._sends.clear()
                return
            with self._lock:
                self._sends.popleft()
                self._said_full = False

    def _guarded(self, loop: Callable[[], None]) -> None:
        """A thread that dies says so loudly, and `failure()` turns the tick to it."""
        try:
            loop()
        except Exception as error:
            name = threading.current_thread().name
            log.critical("worker_pipe_thread_died", thread=name, exc_info=True)
            self._fail(f"{name} died: {type(error).__name__}: {error}")

    def _fail(self, reason: str) -> None:
        with self._lock:
            self._failure = self._failure or reason
            self._lock.notify_all()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # one pending is enough
            self._ready_out.send(b"\0")
