"""The console's decisions and its log ring, as pure functions (the browser tests are in
test_console.py)."""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Any

from cosyvoiced import board, clients, roster
from cosyvoiced.logring import LogRing
from tests.daemon import wait_until
from tests.redisserver import RedisServer, needs_redis


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


# -- the cluster's hosts (roster.py) ---------------------------------------------------------
def _entry(at_ms: int, host: str, **figures: Any) -> tuple[str, dict[bytes, bytes]]:
    return f"{at_ms}-0", {key.encode(): value
                          for key, value in roster.entry_fields(host, figures).items()}


def test_the_roster_keeps_each_host_s_latest_figures_and_skips_what_is_not_ours() -> None:
    known = roster.fold({}, [_entry(1000, "b", state="starting"),
                             _entry(1500, "c", state="ready", idle=2),
                             ("1600-0", {b"host": b"x"}),  # no figures: another version's
                             ("1700-0", {b"host": b"y", b"figures": b"not json"}),
                             ("1800-0", {b"host": b"z", b"figures": b"[1]"}),
                             # nested too deep for json: skipped, not the roster's end
                             ("1900-0", {b"host": b"w",
                                         b"figures": b"[" * 100_000 + b"]" * 100_000})])
    known = roster.fold(known, [_entry(2000, "b", state="ready", idle=1)])
    assert known == {"b": roster.Seen(2000, {"state": "ready", "idle": 1}),
                     "c": roster.Seen(1500, {"state": "ready", "idle": 2})}


def test_the_roster_keeps_a_bounded_number_of_plain_named_hosts() -> None:
    """Whoever can write to Redis could add entries of made-up names (each kept until the
    daemon stopped), of names no host has, or of figures of any size."""
    made_up = [_entry(1000 + n, f"h{n}", state="ready") for n in range(5 * roster.MAX_HOSTS)]
    known = roster.fold({}, [_entry(500, "real", state="ready"), *made_up])
    known = roster.fold(known, [
        _entry(9000, "real", state="ready"),
        ("9001-0", {b"host": b"<img src=x onerror=alert(1)>", b"figures": b"{}"}),
        ("9002-0", {b"host": b"big", b"figures": b'{"x": "' + b"y" * (1 << 20) + b'"}'})])
    assert len(known) == roster.MAX_HOSTS
    assert known["real"] == roster.Seen(9000, {"state": "ready"}), "seen last: kept"
    assert f"h{5 * roster.MAX_HOSTS - 1}" in known
    assert "h0" not in known, "the host seen longest ago went"
    assert "big" not in known


def test_the_hosts_are_this_one_first_then_the_others_alive_lost_or_stopped() -> None:
    now_ms = 1_000_000.0
    lost_ms = now_ms - (roster.LOST_AFTER_S + 1) * 1000
    known = {"a": roster.Seen(int(now_ms - 60_000), {"state": "starting"}),  # this host's, old
             "d": roster.Seen(int(now_ms - 1500), {"state": "ready", "idle": 0}),
             "c": roster.Seen(int(lost_ms), {"state": "ready"}),
             "b": roster.Seen(int(now_ms - 2000), {"state": roster.STOPPED}),
             "old": roster.Seen(int(now_ms - (roster.FORGET_S + 1) * 1000), {"state": "ready"})}
    rows = roster.rows(known, "a", {"state": "ready", "idle": 1}, now_ms)
    assert [(row["name"], row["me"], row["alive"], row["seen_s_ago"]) for row in rows] == [
        ("a", True, True, 0), ("b", False, False, 2),
        ("c", False, False, round(roster.LOST_AFTER_S + 1)), ("d", False, True, 2)]
    assert rows[0]["state"] == "ready"  # this host as its tick has it now
    assert rows[0]["idle"] == 1
    # Before the first read, this host alone.
    assert [row["name"] for row in roster.rows({}, "a", {}, 0)] == ["a"]


@needs_redis
def test_rosters_on_one_redis_see_each_other_and_a_stop(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", aof=False) as server:
        rosters = {name: roster.Roster(name, "cosyvoiced:hosts",
                                       lambda: server.client(decode_responses=False))
                   for name in "ab"}
        for name, member in rosters.items():
            member.start()
            member.note(0.0, "ready", functools.partial(dict, engine=name))
        rounds = itertools.count(1)

        def seen_by_a() -> list[tuple[str, bool, str]]:
            """a's view after one more of its rounds (one every PUBLISH_S)."""
            rosters["a"].note(next(rounds) * roster.PUBLISH_S, "ready", dict)
            return [(row["name"], row["alive"], row["state"])
                    for row in rosters["a"].hosts(time.monotonic())]

        wait_until(lambda: seen_by_a() == [("a", True, "ready"), ("b", True, "ready")], 10,
                   "a to see b")
        assert rosters["a"].hosts(time.monotonic())[1]["engine"] == "b"
        rosters["b"].stop({"engine": "b"})
        wait_until(lambda: seen_by_a() == [("a", True, "ready"), ("b", False, roster.STOPPED)],
                   10, "a to see b stopped")
        rosters["a"].stop({})


@needs_redis
def test_a_roster_tells_another_live_host_of_its_name_from_its_own_earlier_run(
        tmp_path: Path) -> None:
    """A host restarted under its name reads its earlier run's entries: its own, not a
    clash. A second live host of that name is one, seen by both."""
    with RedisServer(tmp_path / "redis", aof=False) as server:
        def member(name: str) -> roster.Roster:
            made = roster.Roster(name, "cosyvoiced:hosts",
                                 lambda: server.client(decode_responses=False))
            made.start()
            return made

        clock = itertools.count(1)

        def noted(*members: roster.Roster, state: str = "ready") -> bool:
            """One more round of each member's (one every PUBLISH_S)."""
            now = next(clock) * roster.PUBLISH_S
            for each in members:
                each.note(now, state, dict)
            return True

        def seen(by: roster.Roster, name: str) -> str | None:
            return next((row["state"] for row in by.hosts(time.monotonic())
                         if row["name"] == name), None)

        def b_seen_as(state: str) -> bool:
            return noted(other, again, state=state) and seen(again, "b") == state

        earlier = member("a")
        earlier.note(0.0, "ready", dict)
        earlier.stop({})
        other, again = member("b"), member("a")
        for state in ("ready", "busy"):  # "busy": read after again's first entry
            wait_until(functools.partial(b_seen_as, state), 10, f"b {state}")
        assert again.name_clash(time.monotonic()) is None
        twin = member("a")
        wait_until(lambda: noted(other, again, twin) and again.name_clash(time.monotonic())
                   and twin.name_clash(time.monotonic()),
                   10, "both to see the other")
        for each in (other, again, twin):
            each.stop({})
