"""What the daemon tells systemd (sd_notify over $NOTIFY_SOCKET, via sdnotify)."""

from __future__ import annotations

import os
import time

import sdnotify


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


class Notifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING; a no-op when not run by systemd."""

    def __init__(self) -> None:
        self._systemd = sdnotify.SystemdNotifier()
        if self._systemd.socket is not None:
            # Never stall the supervisor on a busy manager: a message that does not fit is
            # dropped (sdnotify swallows the error), the next tick sends a fresh one.
            self._systemd.socket.setblocking(False)
        self._status = ""
        self.watchdog_interval_s = watchdog_interval_s()
        self._last_ping = float("-inf")
        self.pings = 0

    def ready(self) -> None:
        self._systemd.notify("READY=1")

    def stopping(self) -> None:
        self._systemd.notify("STOPPING=1")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before the start-up timeout (sent while a model loads)."""
        self._systemd.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def status(self, line: str) -> None:
        if line != self._status:
            self._status = line
            self._systemd.notify(f"STATUS={line}")

    def next_watchdog_at(self) -> float | None:
        """When the next WATCHDOG=1 is due (monotonic), or None without a watchdog."""
        if self.watchdog_interval_s is None:
            return None
        return self._last_ping + self.watchdog_interval_s

    def watchdog_due(self, now: float) -> bool:
        due = self.next_watchdog_at()
        # A wake-up a hair early still counts: waiting a whole interval more would double it.
        return due is not None and now >= due - 0.005

    def watchdog(self, now: float) -> None:
        self._last_ping = now
        self.pings += 1
        self._systemd.notify("WATCHDOG=1")
