"""A daemon's link to the other daemons: Redis Streams, driven by three threads.

The supervisor's tick never waits on Redis. It queues commands (share a job, send an event,
settle a job) and reads what the threads hand over in `inbound`, after a `wake()`:
- the writer runs the commands in order; while Redis is down, a job not yet shared comes
  back as `ShareFailed` (the tick serves it here instead) and every other command waits;
- the job reader takes jobs from the shared streams while this host has idle workers
  (`want`), interactive first, takes over jobs that another host left unacknowledged for
  `cluster.claim_idle_s`, and keeps the jobs taken here from looking abandoned;
- the event reader reads this host's event stream: the progress and outcomes of the jobs
  it received, and cancellations of jobs it serves.
Each thread has a connection of its own (a blocking read holds one). Any of them may find
Redis down; they retry until it is back, then `up` is true again.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis

from cosyvoiced import audio, logs
from cosyvoiced import clusterwire as wire
from cosyvoiced.clusterwire import Inbound, SharedLost, ShareFailed
from cosyvoiced.config import ClusterConfig, read_password
from cosyvoiced.job import Job, ResultAudio
from cosyvoiced.scheduler import priority_of
from cosyvoiced.tally import Tally

RETRY_S = 0.5  # between tries while Redis is down
# A command Redis refuses (out of memory: maxmemory with noeviction frees some as entries
# are deleted) is tried this many times, RETRY_S apart, then dropped with a log line.
REFUSED_TRIES = 3
# ... except one that settles a job taken here (its outcome): dropped, the job was taken
# over by another host and made again, and each takeover counted as a crash, until the
# poison rule failed a job no host or worker had dropped. It is kept aside instead, its job
# still heartbeated, and tried again at growing intervals up to this, without holding the
# commands behind it; the log says so once a REFUSED_LOG_S.
KEPT_RETRY_MAX_S = 5.0
REFUSED_LOG_S = 60.0
# Settles kept aside at most (each may hold a reply's audio): past it, the oldest goes, and
# its job is left to be taken over.
MAX_KEPT = 256
BLOCK_MS = 500  # a blocking read's longest wait: how soon a stop is noticed
SOCKET_TIMEOUT_S = 5.0  # > BLOCK_MS: a Redis that stops answering is noticed
# A command that sends more than this (a shared job's prompt, up to 64 MiB) may take a
# second more for each MIN_LINK_BYTES_PER_S it sends: with the usual timeout it failed every
# try on a link slower than 20 MB/s, and every later command of the host waited behind it
# for good.
QUICK_COMMAND_BYTES = 1 << 20
MIN_LINK_BYTES_PER_S = 1 << 20
# Events read at once, and the audio of those the tick has not taken yet, at most, past
# which the reader waits: a restarted host may find thousands of parts (a 20,000 character
# text is about 100 MB of float32, in 100 `part` events).
EVENT_BATCH = 16
EVENT_BYTES_WAITING = 32 << 20
# A host with no idle worker but room for one more job in its turns takes a job that no
# idle host took within this long (idle hosts wait in a blocking read: they take a new job
# at once), checking this often.
UNTAKEN_MS = 50
BUSY_POLL_S = 0.1

log = logs.get_logger("cosyvoiced.cluster")


Command = Callable[[redis.Redis], None]


@dataclass(frozen=True)
class _Queued:
    """A command for the writer. `share_of`: a job whose share goes back to the tick while
    Redis is down; `settles`: the job taken here that it settles (kept if refused)."""

    command: Command
    share_of: str | None = None
    settles: wire.SharedJob | None = None


@dataclass
class _Kept:
    """A settling command Redis refused, to try again at `next_at` (monotonic)."""

    queued: _Queued
    since: float
    tries: int = 1
    next_at: float = 0.0

    def refused_again(self, now: float) -> None:
        self.tries += 1
        self.next_at = now + min(KEPT_RETRY_MAX_S, RETRY_S * 2 ** (self.tries - 1))


def safe_url(url: str) -> str:
    """The Redis URL without its password, for logs and status: redis-py takes one in the
    user part and as a `password` query parameter."""
    base, asks, query = url.partition("?")
    if asks:
        url = base + asks + "&".join(
            "password=***" if unquote(piece.partition("=")[0]) == "password" else piece
            for piece in query.split("&"))
    parts = urlsplit(base)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=user + host)) + url[len(base):]


class _Commands:
    """What the tick asks of Redis, as commands the writer thread runs in order (so a
    job's `share` always goes before its `withdraw` or `audit`). Never blocks."""

    settings: ClusterConfig
    host: str
    keys: wire.Keys
    _commands: queue.Queue[_Queued]
    _shared: dict[str, tuple[str, str]]  # writer only: job id -> stream, entry

    def _release(self, shared: wire.SharedJob) -> None:
        raise NotImplementedError

    def client(self, timeout_s: float = SOCKET_TIMEOUT_S) -> redis.Redis:
        raise NotImplementedError

    def _post(self, item: Inbound) -> None:
        raise NotImplementedError

    def share(self, job: Job, prompt: bytes | None) -> None:
        """Put a received job onto the shared stream, unless it is there already (a restart
        of this host finds its jobs in work/ again)."""
        stream = self.keys.jobs(priority_of(job))
        marker = self.keys.marker(self.host, job.id)
        fields = wire.job_fields(job, self.host, prompt)
        ttl_s = int(self.settings.outcome_ttl_s)

        def command(client: redis.Redis) -> None:
            # Only this host writes its markers, and only this thread: no WATCH needed.
            if client.exists(marker):
                return
            pipe = client.pipeline()  # both or neither, whenever this host is killed
            pipe.set(marker, b"shared", ex=ttl_s)
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
            entry: Any = pipe.execute()[1]
            self._shared[job.id] = (stream, entry.decode())

        self._queue(self._sized(len(prompt or b""), command), share_of=job.id)

    def withdraw(self, job_id: str) -> None:
        """A received job ended here (cancelled, or served here while Redis was down):
        take it off the shared stream if it is still there."""
        marker = self.keys.marker(self.host, job_id)

        def command(client: redis.Redis) -> None:
            where = self._shared.pop(job_id, None)
            holder = _holder(client, *where) if where is not None else None
            pipe = client.pipeline()
            if holder is not None and holder != self.host:
                # Taken into that host's turns, not started (started, the tick sends its
                # CANCEL): deleting the entry did not stop it, and it made the whole job
                # for nobody.
                self._add_event(pipe, holder, wire.Event(wire.CANCEL, job_id, self.host))
            if where is not None:
                pipe.xdel(where[0], where[1])
            pipe.delete(marker)
            pipe.execute()

        self._queue(command)

    def send(self, host: str, event: wire.Event) -> None:
        self._queue(self._sized(len(event.audio), lambda client: self._add_event(
            client.pipeline(), host, event).execute()))

    def complete(self, host: str, event: wire.Event, shared: wire.SharedJob,
                 made: ResultAudio | None = None) -> None:
        """The outcome of another host's job, and the job settled, in one transaction: it
        is never both done and still waiting to be taken over. The audio of a whole reply
        (`made`) goes first, as `part` events made on the writer thread, never on the tick,
        one at a time: a long reply's (100 MB) is never all in memory (remoteaudio.py)."""

        def command(client: redis.Redis) -> None:
            if made is not None:
                for seq, part in enumerate(audio.float32_parts(made, wire.PART_BYTES)):
                    self._add_event(client.pipeline(), host, replace(
                        event, kind=wire.PART, detail={"seq": seq}, audio=part)).execute()
            pipe = self._add_event(client.pipeline(), host, event)
            pipe.xack(shared.stream, wire.GROUP, shared.entry)
            pipe.xdel(shared.stream, shared.entry)
            pipe.execute()

        self._queue(self._settling(shared, command), settles=shared)

    def settle(self, shared: wire.SharedJob) -> None:
        """A job of this host's own, served here, has its outcome written."""
        marker = self.keys.marker(self.host, shared.job.id)

        def command(client: redis.Redis) -> None:
            pipe = client.pipeline()
            pipe.xack(shared.stream, wire.GROUP, shared.entry)
            pipe.xdel(shared.stream, shared.entry)
            pipe.delete(marker)
            pipe.execute()
            self._shared.pop(shared.job.id, None)

        self._queue(self._settling(shared, command), settles=shared)

    def count_start(self, shared: wire.SharedJob) -> None:
        """A job taken here has started: its delivery now counts (see `_uncounted`)."""
        def command(client: redis.Redis) -> None:
            client.xclaim(shared.stream, wire.GROUP, self.host, 0, [shared.entry],
                          retrycount=shared.deliveries, justid=True)

        self._queue(command)

    def requeue(self, shared: wire.SharedJob) -> None:
        """Give back a job taken here but not started (this host stops): the others can
        take it at once instead of after claim_idle_s."""
        fields = wire.job_fields(shared.job, shared.host, shared.prompt)

        def command(client: redis.Redis) -> None:
            pipe = client.pipeline()
            pipe.xadd(shared.stream, fields)  # type: ignore[arg-type]
            pipe.xack(shared.stream, wire.GROUP, shared.entry)
            pipe.xdel(shared.stream, shared.entry)
            pipe.execute()

        self._queue(self._sized(len(shared.prompt or b""), self._settling(shared, command)),
                    settles=shared)

    def _settling(self, shared: wire.SharedJob, command: Command) -> Command:
        """`command`, which settles a job taken here: its heartbeat goes on until the
        command has run (stopped when it was queued, a job whose outcome took longer than
        claim_idle_s to send, a long reply's parts over a slow link, was taken over by
        another host and made again; stopped when Redis refused it, the same while Redis
        was out of memory). A refused one is kept and tried again (see _write)."""
        def settling(client: redis.Redis) -> None:
            command(client)
            self._release(shared)

        return settling

    def audit(self, job_ids: list[str]) -> None:
        """Check that the jobs this host waits for are still shared; those that are not come
        back as `SharedLost`. (Queued after their `share`, so never before it.)"""
        markers = [self.keys.marker(self.host, job_id) for job_id in job_ids]

        def command(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=False)
            for marker in markers:
                pipe.exists(marker)
            for job_id, exists in zip(job_ids, pipe.execute(), strict=True):
                if not exists:
                    self._post(SharedLost(job_id))

        self._queue(command)

    def forget(self, entries: list[str], finished: list[str]) -> None:
        """Events read and acted on, and received jobs whose outcome is written here."""
        events = self.keys.events(self.host)
        markers = [self.keys.marker(self.host, job_id) for job_id in finished]

        def command(client: redis.Redis) -> None:
            pipe = client.pipeline()
            if entries:
                pipe.xdel(events, *entries)
            if markers:
                pipe.delete(*markers)
            pipe.execute()
            for job_id in finished:
                self._shared.pop(job_id, None)

        self._queue(command)

    def _sized(self, nbytes: int, command: Command) -> Command:
        """`command`, which sends `nbytes`: a big one runs on a client of its own, whose
        timeout allows for its size over a slow link (QUICK_COMMAND_BYTES)."""
        if nbytes <= QUICK_COMMAND_BYTES:
            return command
        timeout_s = SOCKET_TIMEOUT_S + nbytes / MIN_LINK_BYTES_PER_S

        def sized(_client: redis.Redis) -> None:
            with self.client(timeout_s) as client:
                command(client)

        return sized

    def _queue(self, command: Command, share_of: str | None = None,
               settles: wire.SharedJob | None = None) -> None:
        self._commands.put(_Queued(command, share_of, settles))

    def _add_event(self, pipe: Any, host: str, event: wire.Event) -> Any:
        stream = self.keys.events(host)
        oldest_ms = int((time.time() - self.settings.outcome_ttl_s) * 1000)
        pipe.xadd(stream, wire.event_fields(event), minid=oldest_ms, approximate=True)
        pipe.xtrim(stream, maxlen=self.settings.max_outcomes, approximate=True)
        # Trimmed only as events are added: the stream of a host that is gone for good
        # (or of a name nobody runs) kept every outcome in it, with its audio, for ever.
        pipe.expire(stream, int(self.settings.outcome_ttl_s))
        return pipe


class _EventReader(_Commands):
    """This host's event stream, read into `inbound` by a thread of its own (what other
    hosts say of the jobs they share with it, or serve for it)."""

    event_bytes: Tally
    events_read: int
    _stop: threading.Event
    _replay: threading.Event

    def _failed(self, error: redis.RedisError) -> bool:
        raise NotImplementedError

    def _read_events(self) -> None:
        client = self.client()
        stream = self.keys.events(self.host)
        last = "0-0"  # what is left of the stream was not acted on: read it all
        count = wire.ReadCount(EVENT_BATCH, wire.BIG_EVENT_BYTES)
        while not self._stop.is_set():
            if self.event_bytes.held >= EVENT_BYTES_WAITING:
                self._stop.wait(BUSY_POLL_S)  # the tick takes them first
                continue
            if self._replay.is_set():
                self._replay.clear()
                last = "0-0"
            try:
                answer: Any = client.xread({stream: last}, count=count.count, block=BLOCK_MS)
            except redis.RedisError as error:
                if not self._failed(error):
                    last = "0-0"  # a Redis that lost its data numbers entries anew
                self._stop.wait(RETRY_S)
                continue
            for _stream, entries in answer or []:
                count.after([data for _entry, data in entries])
                for entry, data in entries:
                    last = entry.decode()
                    self._post_event(last, data)

    def _post_event(self, entry: str, data: wire.Fields) -> None:
        try:
            event = wire.read_event(entry, data)
        except wire.WireError as error:
            log.error("event_unreadable", entry=entry, error=str(error))
            self.forget([entry], [])
            return
        self.events_read += 1
        self.event_bytes.add(len(event.audio))
        self._post(event)

    def replay_events(self) -> None:
        """Read this host's events again from the first: those the tick left unread (their
        jobs were not in the book yet) are still in the stream; the rest were acted on and
        deleted (or are about to be: acting on one again finds its job ended)."""
        self._replay.set()

    def taken(self, event: wire.Event) -> None:
        """The tick took `event` off `inbound`: its audio is the tick's now."""
        self.event_bytes.give(len(event.audio))


class _KeptSettles:
    """The commands settling jobs taken here that Redis refused (out of memory), tried
    again at growing intervals, oldest first, without holding the commands behind them;
    their jobs stay held, heartbeated (writer thread only)."""

    def __init__(self, release: Callable[[wire.SharedJob], None]) -> None:
        self._kept: list[_Kept] = []
        self._release = release
        self._logged = -REFUSED_LOG_S

    def __bool__(self) -> bool:
        return bool(self._kept)

    def keep(self, queued: _Queued, error: redis.RedisError) -> None:
        assert queued.settles is not None
        now = time.monotonic()
        self._kept.append(_Kept(queued, since=now, next_at=now + RETRY_S))
        if len(self._kept) > MAX_KEPT:
            oldest = self._kept.pop(0)
            assert oldest.queued.settles is not None
            self._release(oldest.queued.settles)
            log.error("cluster_command_refused", job=oldest.queued.settles.job.id,
                      message=f"dropped: over {MAX_KEPT} outcomes refused by Redis wait")
        self._say(error)

    def retry(self, client: redis.Redis) -> bool:
        """Send those whose time has come; True if one went. What is not a refusal (Redis
        down) is raised."""
        now, sent = time.monotonic(), False
        for kept in [kept for kept in self._kept if kept.next_at <= now]:
            try:
                kept.queued.command(client)
            except redis.RedisError as error:
                if not _refused(error):
                    raise
                kept.refused_again(time.monotonic())
                self._say(error)
                continue
            self._kept.remove(kept)
            assert kept.queued.settles is not None
            log.info("cluster_command_sent", job=kept.queued.settles.job.id, tries=kept.tries,
                     waited_s=round(time.monotonic() - kept.since, 1))
            sent = True
        return sent

    def wait_s(self) -> float:
        """How long the writer may wait for a new command: until a kept one is due."""
        if not self._kept:
            return 0.5
        return max(0.01, min(0.5, min(k.next_at for k in self._kept) - time.monotonic()))

    def _say(self, error: redis.RedisError) -> None:
        now = time.monotonic()
        if now - self._logged < REFUSED_LOG_S:
            return
        self._logged = now
        log.error("cluster_command_refused", error=f"{type(error).__name__}: {error}"[:300],
                  kept=len(self._kept), message="outcomes kept here and tried again until "
                  "Redis takes them; their jobs stay this host's")


class _Refusals:
    """What Redis refused the readers last (NOPERM: a command out of the login's ACL), and
    when; each refusal logged at most once a REFUSED_LOG_S (both reader threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last, self._last_at = "", 0.0
        self._logged: dict[str, float] = {}  # refusal -> when it was logged

    def note(self, error: redis.RedisError) -> None:
        now = time.monotonic()
        text = f"{type(error).__name__}: {error}"[:300]
        with self._lock:
            self._last, self._last_at = text, now
            if now - self._logged.get(text, -REFUSED_LOG_S) < REFUSED_LOG_S:
                return
            if len(self._logged) >= 64:  # the texts are Redis's: bounded
                self._logged.clear()
            self._logged[text] = now
        log.error("cluster_command_refused", error=text, thread=threading.current_thread().name,
                  message="Redis answers but refuses a command this host needs; check the "
                  "login's ACL against the README's (logged once a minute)")

    def recent(self, now: float) -> str | None:
        """The last refusal, if within REFUSED_LOG_S of `now` (monotonic)."""
        with self._lock:
            return self._last if self._last and now - self._last_at < REFUSED_LOG_S else None


class ClusterLink(_EventReader):
    def __init__(self, settings: ClusterConfig, host: str, wake: Callable[[], None]) -> None:
        self.settings = settings
        self.host = host
        self.keys = wire.Keys(settings.key_prefix)
        self.url = safe_url(settings.redis)
        self.inbound: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self.event_bytes = Tally()  # the audio of events in `inbound` (`taken` takes it off)
        self._wake = wake
        self._commands: queue.Queue[_Queued] = queue.Queue()
        self._kept = _KeptSettles(self._release)  # writer only
        self._password = read_password(settings.password_file) if settings.password_file \
            else None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._wanted = 0
        self._room = 0
        self._blocked_reader: int | None = None  # the job reader's client, in a blocking read
        self._capacity = threading.Condition(self._lock)
        self._held: dict[str, set[str]] = {}  # stream -> entries taken here, not settled
        self._shared: dict[str, tuple[str, str]] = {}  # writer only: job id -> stream, entry
        self._replay = threading.Event()  # the event reader starts again from the first
        self.up = False
        self.error = ""  # why Redis is down (no credentials in it)
        self._refusals = _Refusals()
        self.events_read = 0

    # -- lifetime ----------------------------------------------------------------------
    def client(self, timeout_s: float = SOCKET_TIMEOUT_S) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis, password=self._password,
                                    socket_timeout=timeout_s,
                                    socket_connect_timeout=SOCKET_TIMEOUT_S,
                                    client_name=f"cosyvoiced:{self.host}")

    def connect(self) -> bool:
        """One try, now (at start: jobs left in work/ wait for outcomes only if Redis is
        there). The threads keep trying after that."""
        try:
            self._prepare(self.client())
        except redis.RedisError as error:
            self._down(error)
            return False
        self._mark_up()
        return True

    def start(self) -> None:
        for target in (self._write, self._read_jobs, self._read_events):
            thread = threading.Thread(target=self._guarded, args=(target,), daemon=True,
                                      name=f"cluster-{target.__name__.strip('_')}")
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 3.0) -> None:
        """Stop after the commands already queued (outcomes) have gone, or the timeout."""
        self._commands.put(_Queued(lambda _redis: None))
        deadline = time.monotonic() + timeout_s
        while (not self._commands.empty() or self._kept) and self.up and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        with self._capacity:
            self._capacity.notify_all()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- what the tick asks (never blocks) -----------------------------------------------
    def want(self, count: int, room: int = 0) -> None:
        """This host could start `count` more jobs now, and take `room` more into its
        workers' turns (segment by segment) when no other host takes them."""
        with self._capacity:
            wanted_before = self._wanted
            self._wanted, self._room = max(0, count), max(0, room)
            if self._wanted:
                self._capacity.notify_all()
            reader = self._blocked_reader if wanted_before and not self._wanted else None
        if reader is not None:
            # A read still waiting for a job would take the next one shared, which this
            # host can no longer start at once (it served one itself): end that wait.
            self._queue(lambda client: _unblock(client, reader))

    # -- the writer ------------------------------------------------------------------------
    def _write(self) -> None:
        client = self.client()
        pending: _Queued | None = None
        refusals = 0  # of the pending command
        while not self._stop.is_set():
            try:
                if self._kept.retry(client):
                    self._mark_up()
            except redis.RedisError as error:  # (a refusal is handled there): Redis down
                self._down(error)
                self._stop.wait(RETRY_S)
                continue
            if pending is None:
                try:
                    pending = self._commands.get(timeout=self._kept.wait_s())
                except queue.Empty:
                    continue
            if pending.share_of is not None and not self.up:
                self._hand_back(pending.share_of)
                pending = None
                continue
            try:
                pending.command(client)
            except redis.RedisError as error:
                if not _refused(error):
                    self._down(error)
                    if pending.share_of is not None:
                        self._hand_back(pending.share_of)
                        pending = None
                    self._stop.wait(RETRY_S)
                    continue
                if pending.settles is not None:
                    self._kept.keep(pending, error)
                    pending = None
                    continue
                refusals += 1
                if refusals < REFUSED_TRIES:
                    self._stop.wait(RETRY_S)
                    continue
                self._drop_refused(pending.share_of, error)
            pending, refusals = None, 0
            self._mark_up()

    def _drop_refused(self, share_of: str | None, error: redis.RedisError) -> None:
        """Redis answers, and refuses the command each time: it goes (tried for good, it
        held every later command of this host back, and the link went down and up)."""
        log.error("cluster_command_refused", error=f"{type(error).__name__}: {error}"[:300],
                  job=share_of, message="dropped; a share is served here")
        if share_of is not None:
            self._hand_back(share_of)

    def _hand_back(self, job_id: str) -> None:
        self._post(ShareFailed(job_id))

    # -- the job reader --------------------------------------------------------------------
    def _read_jobs(self) -> None:
        client = self.client()
        next_claim = next_heartbeat = 0.0
        while not self._stop.is_set():
            try:
                if not self.up:
                    self._prepare(client)
                    self._mark_up()
                now = time.monotonic()
                if now >= next_heartbeat:
                    next_heartbeat = now + self.settings.claim_idle_s / 3
                    self._unless_refused(partial(self._heartbeat, client), None)
                wanted, room = self._wait_for_capacity()
                if not wanted:
                    self._post_taken(client, self._take_untaken(client) if room else [])
                    continue
                taken = []
                if now >= next_claim:
                    next_claim = now + self.settings.claim_idle_s / 4
                    taken = self._unless_refused(partial(self._take_over, client, wanted), [])
                self._post_taken(client, taken or self._take(client, wanted))
            except redis.RedisError as error:
                self._failed(error)
                self._stop.wait(RETRY_S)

    def _unless_refused(self, step: Callable[[], Any], otherwise: Any) -> Any:
        """`step`, or `otherwise` if Redis refuses it (not in the login's ACL): a step
        refused each time must not keep the reader from the steps after it."""
        try:
            return step()
        except redis.ResponseError as error:
            if not self._failed(error):
                raise
            return otherwise

    def _post_taken(self, client: redis.Redis, taken: list[wire.SharedJob]) -> None:
        taken = self._still_shared(client, taken)
        with self._capacity:
            self._wanted = max(0, self._wanted - len(taken))
        for shared in taken:
            self._hold(shared)
            self._post(shared)
        if taken:
            self._uncounted(client, taken)  # (if Redis fails here, the jobs are ours still)

    def _still_shared(self, client: redis.Redis,
                      taken: list[wire.SharedJob]) -> list[wire.SharedJob]:
        """Those of `taken` that their receiving host still waits for. One it withdrew (it
        served the job itself: Redis was down, or it had restarted) has no marker, and its
        entry goes unserved: the host that withdrew it did not always know the entry (one
        shared by its life before a crash), which another host then made again for
        nobody."""
        if not taken:
            return taken
        pipe = client.pipeline(transaction=False)
        for shared in taken:
            pipe.exists(self.keys.marker(shared.host, shared.job.id))
        kept = []
        for shared, exists in zip(taken, pipe.execute(), strict=True):
            if exists:
                kept.append(shared)
                continue
            log.info("shared_job_withdrawn", job=shared.job.id, received_by=shared.host)
            _drop(client, shared.stream, shared.entry)
        return kept

    def _uncounted(self, client: redis.Redis, taken: list[wire.SharedJob]) -> None:
        """Taking a job does not count as a delivery until it starts here (`count_start`):
        a host killed while a job only waited in its turns did not fail that job, and the
        delivery count tells a poison job by the hosts that died running it."""
        pipe = client.pipeline(transaction=False)
        for shared in taken:
            pipe.xclaim(shared.stream, wire.GROUP, self.host, 0,
                        [shared.entry], retrycount=shared.deliveries - 1, justid=True)
        pipe.execute()

    def _wait_for_capacity(self) -> tuple[int, int]:
        with self._capacity:
            if not self._wanted and not self._stop.is_set():
                self._capacity.wait(BUSY_POLL_S if self._room else 0.5)
            return self._wanted, self._room

    def _take_untaken(self, client: redis.Redis) -> list[wire.SharedJob]:
        """One job that has waited UNTAKEN_MS on a stream (every host is busy): taken into
        this host's turns, its first audio comes after one segment, not after whole jobs."""
        oldest_ms = time.time() * 1000 - UNTAKEN_MS
        for stream in self.keys.job_streams():
            groups: Any = client.xinfo_groups(stream)
            last = next((_text(g["last-delivered-id"]) for g in groups
                         if _text(g["name"]) == wire.GROUP), None)
            if last is None:
                continue
            waiting: Any = client.xrange(stream, min=f"({last}", count=1)
            if waiting and int(_text(waiting[0][0]).split("-")[0]) <= oldest_ms:
                return self._read_group(client, {stream: ">"}, 1, None)
        return []

    def _take(self, client: redis.Redis, wanted: int) -> list[wire.SharedJob]:
        for stream in self.keys.job_streams():  # interactive first
            taken = self._read_group(client, {stream: ">"}, wanted, None)
            if taken:
                return taken
        reader: Any = client.client_id()
        with self._capacity:
            if not self._wanted:  # the tick took it back meanwhile
                return []
            self._blocked_reader = int(reader)
        try:
            return self._read_group(client, dict.fromkeys(self.keys.job_streams(), ">"), 1,
                                    BLOCK_MS)
        finally:
            with self._capacity:
                self._blocked_reader = None

    def _read_group(self, client: redis.Redis, streams: dict[str, str], count: int,
                    block: int | None) -> list[wire.SharedJob]:
        answer: Any = client.xreadgroup(wire.GROUP, self.host, streams,  # type: ignore[arg-type]
                                        count=count, block=block)
        taken = []
        for stream, entries in answer or []:
            for entry, data in entries:
                shared = self._decode(stream.decode(), entry.decode(), data, 1)
                if shared is not None:
                    taken.append(shared)
        return taken

    def _take_over(self, client: redis.Redis, wanted: int) -> list[wire.SharedJob]:
        """Jobs another host took and then left unacknowledged for claim_idle_s."""
        idle_ms = int(self.settings.claim_idle_s * 1000)
        taken: list[wire.SharedJob] = []
        for stream in self.keys.job_streams():
            answer: Any = client.xautoclaim(stream, wire.GROUP, self.host, idle_ms,
                                       count=wanted - len(taken))
            for entry, data in answer[1]:
                if data is None:  # deleted meanwhile (settled by its receiving host)
                    continue
                deliveries = _deliveries(client, stream, entry)
                shared = self._decode(stream, entry.decode(), data, deliveries)
                if shared is not None:
                    shared = replace(shared, taken_over=True)
                    log.warning("job_taken_over", job=shared.job.id, received_by=shared.host,
                                deliveries=deliveries,
                                message=f"its host left it for {self.settings.claim_idle_s:g} s")
                    taken.append(shared)
            if len(taken) >= wanted:
                break
        return taken

    def _decode(self, stream: str, entry: str, data: wire.Fields,
                deliveries: int) -> wire.SharedJob | None:
        try:
            return wire.read_job(stream, entry, data, deliveries)
        except wire.WireError as error:
            # Its receiving host (a newer version's, in a rolling upgrade) waited for it
            # for outcome_ttl_s: its marker goes too, so that host's audit finds the job
            # lost and serves it itself.
            owner = wire.owner_of(data)
            marker = self.keys.marker(*owner) if owner else None
            log.error("shared_job_unreadable", stream=stream, entry=entry, error=str(error),
                      received_by=owner[0] if owner else None,
                      message="dropped from the stream" + (
                          "; its host serves it itself" if owner else ""))
            self._queue(lambda client: _drop(client, stream, entry, marker))
            return None

    def _heartbeat(self, client: redis.Redis) -> None:
        """Reset the idle time of the jobs taken here, so no other host takes them over
        while they run (JUSTID: their delivery count stays as it is)."""
        with self._lock:
            held = {stream: list(entries) for stream, entries in self._held.items() if entries}
        for stream, entries in held.items():
            client.xclaim(stream, wire.GROUP, self.host, 0, entries,  # type: ignore[arg-type]
                          justid=True)

    def _hold(self, shared: wire.SharedJob) -> None:
        with self._lock:
            self._held.setdefault(shared.stream, set()).add(shared.entry)

    def _release(self, shared: wire.SharedJob) -> None:
        with self._lock:
            self._held.get(shared.stream, set()).discard(shared.entry)

    # -- state -----------------------------------------------------------------------------
    def _prepare(self, client: redis.Redis) -> None:
        """The job streams and their consumer group exist (Redis may have lost them)."""
        client.ping()
        for stream in self.keys.job_streams():
            try:
                client.xgroup_create(stream, wire.GROUP, id="0", mkstream=True)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    def _post(self, item: Inbound) -> None:
        self.inbound.put(item)
        self._wake()

    def _mark_up(self) -> None:
        if not self.up:
            self.up, self.error = True, ""
            self._wake()

    def _failed(self, error: redis.RedisError) -> bool:
        """A reader's command failed: Redis is down, or it answered and refused (True). A
        refusal (NOPERM: a command taken out of the login's ACL) left the link going down
        and up twice a second, and STATUS= said Redis was unreachable while it answered."""
        if not _refused(error):
            self._down(error)
            return False
        self._refusals.note(error)
        return True

    def refusal(self, now: float) -> str | None:
        """What Redis refused in the last REFUSED_LOG_S, if anything (`now`: monotonic)."""
        return self._refusals.recent(now)

    def _down(self, error: redis.RedisError) -> None:
        self.error = f"{type(error).__name__}: {error}"
        if self.up:
            self.up = False
            self._wake()

    def _guarded(self, target: Callable[[], None]) -> None:
        """A thread that fails for another reason than Redis is logged, not silent."""
        while not self._stop.is_set():
            try:
                target()
                return
            except Exception as error:  # noqa: BLE001 - logged; the thread starts over
                log.error("cluster_thread_failed", thread=target.__name__, error=repr(error))
                with contextlib.suppress(Exception):
                    self._down(redis.ConnectionError(repr(error)))
                self._stop.wait(RETRY_S)


def _deliveries(client: redis.Redis, stream: str, entry: bytes) -> int:
    pending: Any = client.xpending_range(stream, wire.GROUP, min=entry, max=entry, count=1)
    return int(pending[0]["times_delivered"]) if pending else 1


def _holder(client: redis.Redis, stream: str, entry: str) -> str | None:
    """The host that took `entry` and has not settled it, if any (its consumer name)."""
    pending: Any = client.xpending_range(stream, wire.GROUP, min=entry, max=entry, count=1)
    return _text(pending[0]["consumer"]) if pending else None


def _drop(client: redis.Redis, stream: str, entry: str, marker: str | None = None) -> None:
    pipe = client.pipeline()
    pipe.xack(stream, wire.GROUP, entry)
    pipe.xdel(stream, entry)
    if marker is not None:
        pipe.delete(marker)
    pipe.execute()


def _refused(error: redis.RedisError) -> bool:
    """Redis answered, and said no (out of memory, no permission, a key of the wrong
    type); not a Redis gone, nor a replica in a failover (READONLY), which come back."""
    return isinstance(error, redis.ResponseError) and not isinstance(error, redis.ReadOnlyError)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _unblock(client: redis.Redis, reader: int) -> None:
    client.client_unblock(reader)
