"""What the supervisor's loop sleeps on: a self-pipe that any thread (and every signal, via
`signal.set_wakeup_fd`) can write to, and the workers' pipes and sentinels."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable, Iterable
from multiprocessing.connection import wait
from types import FrameType

Handler = Callable[[int, FrameType | None], None]


class Wakeup:
    def __init__(self) -> None:
        self._receiver, self._sender = socket.socketpair()
        for end in (self._receiver, self._sender):
            end.setblocking(False)

    def wake(self) -> None:
        """Make the loop tick now (safe from any thread)."""
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            self._sender.send(b"\0")

    def on_signals(self, signals: Iterable[int], handler: Handler) -> None:
        """`handler` for each signal; a signal also wakes the loop."""
        signal.set_wakeup_fd(self._sender.fileno(), warn_on_full_buffer=False)
        for signum in signals:
            signal.signal(signum, handler)

    def wait(self, waitables: list[object], timeout: float) -> None:
        """Until one of `waitables` (or a wake-up) is ready, or `timeout` seconds."""
        if self._receiver in wait([self._receiver, *waitables], timeout):  # type: ignore[list-item]
            with contextlib.suppress(BlockingIOError):
                while self._receiver.recv(4096):
                    pass
