"""Bytes one thread hands another and the other takes away, counted against a limit: what
an intake's loop hands the supervisor (clone prompts), and what the cluster's event reader
does (events' audio). Thread-safe."""

from __future__ import annotations

import threading


class Tally:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = 0

    def take(self, size: int, limit: int) -> bool:
        """Count `size` in, unless that passes `limit` (one always fits)."""
        with self._lock:
            if self.held and self.held + size > limit:
                return False
            self.held += size
            return True

    def add(self, size: int) -> None:
        """Count `size` in, whatever the limit (it was read already)."""
        with self._lock:
            self.held += size

    def give(self, size: int) -> None:
        with self._lock:
            self.held -= size
