"""The console's decisions and its log ring, as pure functions (the browser tests are in
test_console.py)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from cosyvoiced import board, clients
from cosyvoiced.logring import LogRing


def test_without_keys_the_loopback_operator_may_do_everything() -> None:
    assert board.rights(None, keys_on=False) == board.Rights(view=True, logs=True, act=True)


def test_with_keys_a_key_is_needed_and_only_an_admin_key_acts() -> None:
    assert board.rights(None, keys_on=True) == board.Rights(view=False, logs=False, act=False)
    plain = clients.keyed("key", "app")
    admin = clients.keyed("key", "ops", admin=True)
    assert board.rights(plain, keys_on=True) == board.Rights(view=True, logs=False, act=False)
    assert board.rights(admin, keys_on=True) == board.Rights(view=True, logs=True, act=True)


def test_ended_rows_are_the_newest_visible_ones_with_their_error() -> None:
    finished: list[tuple[str, dict[str, Any]]] = [
        (f"j{n}", {"state": "done", "source": "inbox", "output": f"j{n}.wav"})
                for n in range(80)]
    finished.append(("bad", {"state": "failed", "source": "http", "error": {
        "code": "engine_error", "message": "no", "field": None}}))
    rows = board.ended_rows(reversed(finished), 50, lambda job_id: job_id != "j79")
    assert len(rows) == 50
    assert rows[0] == {"id": "bad", "state": "failed", "source": "http",
                       "code": "engine_error", "message": "no"}
    assert rows[1]["id"] == "j78"  # j79 is another client's
    assert rows[1]["output"] == "j78.wav"


def _record(ring: LogRing, message: str) -> None:
    ring.handle(logging.makeLogRecord({"msg": message, "levelno": logging.INFO}))


def test_the_log_ring_keeps_the_last_lines_and_tells_its_listeners() -> None:
    ring = LogRing(kept=3)
    told = threading.Event()
    ring.listen(told.set)
    for n in range(5):
        _record(ring, f"line {n}")
    assert told.is_set()
    lines, last = ring.since(0)
    assert lines == ["line 2", "line 3", "line 4"]
    assert last == 5
    _record(ring, "line 5")
    assert ring.since(last) == (["line 5"], 6)
    ring.unlisten(told.set)
    told.clear()
    _record(ring, "line 6")
    assert not told.is_set()
