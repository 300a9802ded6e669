"""Who is in the cluster: each host's figures, seen through Redis (the console shows them).

Every PUBLISH_S, and when its state changes, each host adds one entry to a stream of its
own prefix (`<prefix>:hosts`) with what its tick noted: its state, engine, workers, idle
places, the jobs queued and running here, the jobs it shared and those it serves for
others. Each host then reads the entries added since its last read and keeps every host's
latest. An entry's id is Redis's clock, so "last seen" needs no agreement between the
hosts' clocks. The tick hands the figures over (`note`), so a host whose supervisor stops
ticking stops being seen, as its jobs are taken over; a host that stops cleanly says so
(`stopped`). Entries older than FORGET_S are trimmed, and a host not seen for that long is
no longer listed.

Each daemon's entries carry a token of its own (`instance`): an entry of this host's name
with another token, added after this daemon's first, is another live host configured with
the same `cluster.name`. Both would read the one event stream and the one consumer's
pending jobs as their own (a restart of either takes the jobs the other is serving), so it
is said loudly: `cluster_name_taken` in the log, in STATUS= and in `stats`, while it lasts.

Only XADD and XRANGE, on a key under the prefix: the README's ACL for the daemons covers
them. A thread with a connection of its own: the tick never waits on Redis, and the job
path's threads (cluster.py) never wait on this.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cosyvoiced import clusterwire as wire
from cosyvoiced import logs
from cosyvoiced.config import HOST_NAME
from cosyvoiced.ledger import LedgerView
from cosyvoiced.sharing import Sharing
from cosyvoiced.untrusted import json_value

if TYPE_CHECKING:  # imported by the thread: a host alone never imports redis
    import redis

PUBLISH_S = 2.0
# Not seen for longer: shown as lost. A host adds an entry every PUBLISH_S to PUBLISH_S + a
# tick, and reads the others' as often: what it knows can be twice that old.
LOST_AFTER_S = 5 * PUBLISH_S
FORGET_S = 600.0  # not seen for longer: no longer listed, and its entries are trimmed
READ_BATCH = 500
STOP_S = 2.0  # the longest a stopping daemon waits to say so
STOPPED = "stopped"
# Hosts known at once, and an entry's figures at most: whoever can write to Redis could
# add entries of made-up names, or of figures of any size, and each was kept until the
# daemon stopped. Past MAX_HOSTS, the host seen longest ago goes.
MAX_HOSTS = 256
MAX_FIGURES_BYTES = 16 << 10
INSTANCE = "instance"  # a figure: the token of the daemon that added the entry
CLASH_LOG_S = 60.0  # another live host of this name: logged again this often

Figures = dict[str, Any]

log = logs.get_logger("cosyvoiced.roster")


@dataclass(frozen=True)
class Seen:
    at_ms: int  # Redis's clock: the id of the host's latest entry
    figures: Figures


def host_figures(ledger: LedgerView, *, engine: str, workers: int, idle: int,
                 for_others: int) -> Figures:
    """This host's figures, from the tick's state. `idle`: the segments its workers could
    start now; `for_others`: jobs it serves for other hosts (counted in queued/running)."""
    here = [running for running in ledger.jobs.values() if not running.remote]
    return {"engine": engine, "workers": workers, "idle": idle,
            "queued": sum(1 for running in here if not running.started),
            "running": sum(1 for running in here if running.started),
            "shared": len(ledger.jobs) - len(here), "for_others": for_others}


def of_cluster(sharing: Sharing) -> Roster | None:
    """The roster of `sharing`'s cluster; None for a host that serves alone."""
    link = sharing.link
    return None if link is None else Roster(sharing.name, link.keys.hosts(), link.client)


def entry_fields(name: str, figures: Figures) -> dict[str, bytes]:
    return {"host": name.encode(), "figures": json.dumps(figures).encode()}


def entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def fold(known: dict[str, Seen], entries: Iterable[tuple[str, wire.Fields]]) -> \
        dict[str, Seen]:
    """Every host's latest figures, after `entries` (oldest first). An entry that is not a
    daemon's (another version, or not ours) is skipped."""
    latest = dict(known)  # in the order they were last seen: the oldest first
    for entry_id, fields in entries:
        try:
            name, data = fields[b"host"].decode(), fields[b"figures"]
            if not HOST_NAME.fullmatch(name) or len(data) > MAX_FIGURES_BYTES:
                continue
            figures = json_value(data)
            at_ms = entry_ms(entry_id)
        except (KeyError, ValueError):  # UnicodeDecodeError and NotJSON included
            continue
        if isinstance(figures, dict):
            latest.pop(name, None)
            latest[name] = Seen(at_ms, figures)
            if len(latest) > MAX_HOSTS:
                del latest[next(iter(latest))]
    return latest


def other_instances(entries: Iterable[tuple[str, wire.Fields]], name: str,
                    instance: str) -> set[str]:
    """The tokens of other daemons among `entries` that are named `name`."""
    tokens = set()
    for _entry_id, fields in entries:
        if fields.get(b"host") != name.encode():
            continue
        try:
            figures = json_value(fields[b"figures"])
        except (KeyError, ValueError):
            continue
        token = figures.get(INSTANCE) if isinstance(figures, dict) else None
        if isinstance(token, str) and token != instance:
            tokens.add(token[:32])
    return tokens


def rows(known: dict[str, Seen], me: str, mine: Figures, now_ms: float) -> list[Figures]:
    """The hosts as the console lists them: this one first (its figures as the tick has
    them now), then the others by name, each alive or not and seen how long ago. `now_ms`
    is Redis's clock now, as near as this host can tell."""
    listed = []
    for name, seen in known.items():
        ago_s = max(0.0, (now_ms - seen.at_ms) / 1000)
        if name != me and ago_s <= FORGET_S:
            alive = ago_s <= LOST_AFTER_S and seen.figures.get("state") != STOPPED
            listed.append(seen.figures | {"name": name, "me": False, "alive": alive,
                                          "seen_s_ago": round(ago_s)})
    listed.sort(key=lambda row: row["name"])
    return [mine | {"name": me, "me": True, "alive": True, "seen_s_ago": 0}, *listed]


class Roster:
    """This host's entries in the roster, and what it read of the others'."""

    def __init__(self, name: str, key: str, connect: Callable[[], redis.Redis]) -> None:
        self.name, self.key = name, key
        self._connect = connect
        self._lock = threading.Lock()
        self._noted = threading.Event()
        self._stop = False
        self._pending: Figures | None = None  # noted by the tick, not yet added
        self._mine: Figures = {}
        self._known: dict[str, Seen] = {}
        self._redis_ms = 0  # Redis's clock at the last exchange ...
        self._read_at = 0.0  # ... and this host's monotonic clock then
        self._last_entry = ""  # the newest entry read
        self._next_note = 0.0
        self._state = ""
        self._thread: threading.Thread | None = None
        self.error = ""
        self.instance = secrets.token_hex(8)
        self._clash_at: float | None = None  # monotonic: another live host of this name
        self._clash_logged = -CLASH_LOG_S
        # 500 entries at once, of any size, then the 16 KiB bound: 16 entries of 64 MiB
        # grew the supervisor from 77 to 2,190 MiB. Now one at a time at first, and after
        # a big one.
        self._read_count = wire.ReadCount(READ_BATCH, MAX_FIGURES_BYTES + 1024)
        self._too_big_logged = -CLASH_LOG_S

    # -- the tick's side (never blocks) ---------------------------------------------------
    def note(self, now: float, state: str, figures: Callable[[], Figures]) -> None:
        """Every PUBLISH_S, and at once when `state` changes: this host's state and
        figures, to add to the roster."""
        if now < self._next_note and state == self._state:
            return
        self._next_note, self._state = now + PUBLISH_S, state
        self._hand(figures() | {"state": state})

    def hosts(self, now: float) -> list[Figures]:
        """The hosts, this one first (`now`: monotonic)."""
        with self._lock:
            known = self._known if self._redis_ms else {}
            mine, now_ms = self._mine, self._redis_ms + (now - self._read_at) * 1000
        return rows(known, self.name, mine, now_ms)

    def name_clash(self, now: float) -> str | None:
        """What to tell the operator while another live host uses this host's name."""
        clash_at = self._clash_at
        if clash_at is None or now - clash_at > LOST_AFTER_S:
            return None
        return (f"another live host uses cluster.name {self.name!r} too: each takes the "
                "other's jobs and events as its own; give each host its own cluster.name")

    def _hand(self, figures: Figures, stop: bool = False) -> None:
        with self._lock:
            self._pending, self._mine = figures, figures
            self._stop = self._stop or stop
        self._noted.set()

    # -- lifetime -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cluster-roster", daemon=True)
        self._thread.start()

    def stop(self, figures: Figures) -> None:
        """Say this host stopped (`figures`), waiting STOP_S at most."""
        self._hand(figures | {"state": STOPPED}, stop=True)
        if self._thread is not None:
            self._thread.join(0 if self.error else STOP_S)  # Redis down: no wait

    # -- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        import redis  # noqa: PLC0415 - see TYPE_CHECKING above

        client = self._connect()
        while True:
            self._noted.wait(PUBLISH_S)
            with self._lock:
                figures, self._pending = self._pending, None
                self._noted.clear()
                stopping = self._stop
            if figures is not None:
                try:
                    self._exchange(client, figures)
                except redis.RedisError as error:  # the cluster link logs Redis down
                    self.error = f"{type(error).__name__}: {error}"
                except Exception as error:  # noqa: BLE001 - logged; the next round tries again
                    log.error("roster_failed", error=repr(error))
            if stopping:
                return

    def _exchange(self, client: redis.Redis, figures: Figures) -> None:
        """Add this host's entry, then read the entries added since the last read."""
        trim: dict[str, Any] = {}
        if self._redis_ms:
            trim = {"minid": int(self._redis_ms - FORGET_S * 1000), "approximate": True}
        fields = entry_fields(self.name, figures | {INSTANCE: self.instance})
        entry = _text(client.xadd(self.key, fields, **trim))  # type: ignore[arg-type]
        added_at, now_ms = time.monotonic(), entry_ms(entry)
        known = self._known
        # Entries before this daemon's first may be its own earlier run's (a restart).
        since_mine = bool(self._last_entry) and entry_ms(self._last_entry) <= now_ms
        if since_mine:
            start = f"({self._last_entry}"
        else:  # the first read, or another Redis (with a clock behind): read it all
            start, known = str(int(now_ms - FORGET_S * 1000)), {}
        # Each exchange starts at one entry a read: whatever came since the last may be big.
        self._read_count.count = 1
        while True:
            count = self._read_count.count
            batch: Any = client.xrange(self.key, min=start, max=entry, count=count)
            entries = [(_text(entry_id), fields) for entry_id, fields in batch]
            self._read_count.after([fields for _entry_id, fields in entries])
            self._say_too_big(entries)
            known = fold(known, entries)
            if since_mine:
                self._check_name(other_instances(entries, self.name, self.instance))
            if len(entries) < count:
                break
            start = f"({entries[-1][0]}"
        with self._lock:
            self._known, self._redis_ms, self._read_at = known, now_ms, added_at
            self._last_entry = entry
        self.error = ""

    def _say_too_big(self, entries: list[tuple[str, wire.Fields]]) -> None:
        """Entries over the bound are skipped (fold); the operator hears of it once a
        minute (CLASH_LOG_S): not a daemon's, or another version's."""
        big = [entry_id for entry_id, fields in entries
               if wire.entry_bytes(fields) > MAX_FIGURES_BYTES + 1024]
        now = time.monotonic()
        if big and now - self._too_big_logged >= CLASH_LOG_S:
            self._too_big_logged = now
            log.error("roster_entry_too_big", key=self.key, entries=big[:4],
                      most_bytes=MAX_FIGURES_BYTES, message="skipped: not a daemon's entry")

    def _check_name(self, others: set[str]) -> None:
        if not others:
            return
        now = time.monotonic()
        self._clash_at = now
        if now - self._clash_logged >= CLASH_LOG_S:
            self._clash_logged = now
            log.error("cluster_name_taken", name=self.name, instance=self.instance,
                      others=sorted(others), message=self.name_clash(now))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
