"""The last structured log lines, kept in memory for the web console's live tail.

A logging handler on the supervisor's root logger (beside stdout and the file): every line
the daemon writes, its workers' included, is kept rendered, numbered, in a bounded ring.
Readers take the lines after the last number they saw, and may ask to be told (from any
thread) when a line comes in, so the console pushes lines rather than polling for them.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

KEPT_LINES = 200

Listener = Callable[[], None]


class LogRing(logging.Handler):
    def __init__(self, kept: int = KEPT_LINES) -> None:
        super().__init__()
        self._lines: deque[tuple[int, str]] = deque(maxlen=kept)
        self._guard = threading.Lock()
        self._listeners: list[Listener] = []
        self._last = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - a line that cannot render must not stop logging
            self.handleError(record)
            return
        with self._guard:
            self._last += 1
            self._lines.append((self._last, line))
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def since(self, seen: int) -> tuple[list[str], int]:
        """The lines after number `seen` still kept, and the number of the last one."""
        with self._guard:
            return [line for number, line in self._lines if number > seen], self._last

    def listen(self, listener: Listener) -> None:
        with self._guard:
            self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        with self._guard:
            if listener in self._listeners:
                self._listeners.remove(listener)


RING = LogRing()  # the supervisor's: installed by logs.configure_supervisor
