"""The drop folder: watch `inbox/` with inotify (watchdog) and claim finished files.

A file counts as finished when it is renamed into the inbox, or when a writer that created
it in place closes it. Claiming is a `rename` into `work/`, so a file is taken exactly once
even if an event and a rescan both see it. Claimed files go to the supervisor, which parses
them and owns every outcome; at most MAX_CLAIMS_WAITING wait for it, and more files wait in
the inbox, claimed in order as room comes, so that no number of drops grows the daemon.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchDescriptor,
)

from cosyvoiced import captions, logs
from cosyvoiced.intake.inboxrules import Stillness, Unclaimable, claim_refusal
from cosyvoiced.job import (
    Deferred,
    ErrorCode,
    Job,
    JobError,
    JobFailure,
    JobResult,
    ResultAudio,
    new_job_id,
)
from cosyvoiced.jobspec import Limits, build_job, check_output_name, check_text
from cosyvoiced.spool import (
    ERROR_SUFFIX,
    POSING_SUFFIX,
    WORK_SEPARATOR,
    Claimed,
    Spool,
    atomic_write,
    is_job_candidate,
    short_name,
)
from cosyvoiced.untrusted import NotJSON, json_value

SOURCE = "inbox"
JOB_SUFFIXES = ("txt", "json")
# A file found by a scan (not an event) is taken only once it has been still this long,
# so a writer still filling it in place is left alone until its close event: QUIET_S for
# the scans that look for what the watch could not see (the first, and after an overflow)
# and the one retry each of them gets, the rescan interval for the periodic ones (a writer
# may pause longer than a second). How "still" is judged: inboxrules.Stillness.
QUIET_S = 1.0
# Names a scan looks at (and claims) in one tick, job files or not: a scan of 100,000 files
# dropped while the daemon was down held its first tick for seconds.
SCAN_STEP = 500
# Claimed files waiting for the supervisor to read them (posted on `claims`, about 280
# bytes each), at most: past it, files stay in inbox/. 200,000 drops claimed at once grew
# the supervisor 54 MiB, bounded only by the disk's inodes. 16 ticks of reading at most
# (CLAIMS_PER_TICK): the supervisor never waits for claims while files wait in the inbox.
MAX_CLAIMS_WAITING = 256
# Names of finished files left in the inbox past MAX_CLAIMS_WAITING, remembered in the
# order they came, to be claimed as room comes. Past it, new names are forgotten until
# these are claimed, and a scan finds them then; a scan that finds more than it may hold
# waits where it is for room, and goes on from there.
MAX_HELD_NAMES = 1024
# A JSON job of an earlier life that this one's limits refuse is read again to find its
# `output` (was it done before the crash?), this much of it at most.
EARLIER_JOB_BYTES = 16 << 20
_ID_TIME = 11  # a job id's leading hex digits: its creation time in ms (job.new_job_id)

log = logs.get_logger("cosyvoiced.intake.inbox")


@dataclass
class _Scan:
    names: Generator[str, None, None]  # left to look at, read as they are taken
    quiet_s: float  # a file changed more recently than this is left for the next scan
    began: float  # monotonic
    # A scan for what the watch could not see: files too fresh to take bring the next scan
    # forward (QUIET_S), once. Fresh again then, they were written since the watch began,
    # so their close event takes them: a file rewritten every second (or dated in the
    # future) never keeps the folder scanned every second.
    retried_soon: bool
    looked: int = 0
    deferred: int = 0  # files too fresh to take
    # Still, but not taken: no room to hold its name. The scan goes on from it, so that
    # every file is found within one pass of the folder, whatever its order.
    pending: str | None = None


def parse(claimed: Claimed, data: bytes, limits: Limits) -> Job:
    """The `Job` a claimed drop-folder file asks for, or a `JobFailure` saying what is wrong."""
    if claimed.suffix not in JOB_SUFFIXES:
        raise JobFailure(ErrorCode.UNSUPPORTED_FILE_TYPE, f"{claimed.original_name!r} is not a "
                         "job file; drop NAME.txt (plain text) or NAME.json")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JobFailure(ErrorCode.INVALID_UTF8, f"the file is not valid UTF-8 (byte "
                         f"{error.start}: {data[error.start:error.start + 1]!r})") from None
    if claimed.suffix == "txt":
        return Job(id=claimed.job_id, source=SOURCE, origin=claimed.work_name,
                   text=check_text(text.removeprefix("\ufeff"), limits,
                                   limits.normalize_txt),
                   format=limits.default_format, output=check_output_name(claimed.stem))
    try:
        fields = json_value(text)
    except NotJSON as error:
        raise JobFailure(ErrorCode.BAD_JSON, f"not valid JSON: {error}") from None
    if not isinstance(fields, dict):
        raise JobFailure(ErrorCode.BAD_JSON, "the JSON must be an object such as "
                         '{"text": "..."}; got ' + type(fields).__name__)
    return build_job(fields, job_id=claimed.job_id, source=SOURCE, origin=claimed.work_name,
                     default_output=claimed.stem, limits=limits)


def _record_refusal(spool: Spool, name: str, job_id: str, error: JobError) -> str:
    """Write failed/NAME.error.json for an entry left in the inbox, named as a moved
    input's would be (Spool.publish_failure): its JOBID~NAME if that is taken, or if the
    name would pose as another input's error record."""
    short = short_name(name)
    base = short
    if short.endswith(ERROR_SUFFIX):
        base = f"{job_id}{WORK_SEPARATOR}{short}{POSING_SUFFIX}"
    elif os.path.lexists(spool.failed / short) or os.path.lexists(
            spool.failed / (short + ERROR_SUFFIX)):
        base = f"{job_id}{WORK_SEPARATOR}{short}"
    record = {"job": job_id, "input": short} | error.to_dict()
    # A name that is not UTF-8 has surrogates: written as JSON's \udcXX escapes.
    data = (json.dumps(record, ensure_ascii=False, indent=2) + "\n").encode(
        errors="backslashreplace")
    atomic_write(spool.failed, base + ERROR_SUFFIX, data)
    return base


class _InboxWatch:
    """inotify callbacks (watchdog's `InotifyFD` thread): only finished files are taken."""

    def __init__(self, inbox: InboxIntake) -> None:
        self._inbox = inbox

    def on_event(self, event: InotifyEvent) -> None:
        name = os.fsdecode(event.name)
        if event.is_create and self._inbox.is_regular_file(name):
            return  # a writer is filling it in place: wait for its close
        self._inbox.take(name)

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        log.critical("inbox_watch_lost", message="inbox/ was removed; restart the service")

    def on_queue_overflow(self) -> None:
        log.warning("inbox_events_overflow", message="inotify queue overflowed; rescanning")
        self._inbox.request_rescan()  # watchdog before 7.1.1 calls only this one

    def on_events_lost(self) -> None:
        """watchdog 7.1.1 and later: every watch has recovered, so a rescan sees them all.
        A callback without it kills the inotify thread on the first overflow."""
        self._inbox.request_rescan()


class InboxIntake:
    """Claims finished files from `inbox/` and posts them on `claims` (thread-safe)."""

    # Renames into the inbox, closes after writing, and creations (for links and
    # directories, which are never closed). No IN_MOVED_FROM (our own claims), so no event
    # is ever held back waiting for its pair.
    WATCH_MASK = Mask(InotifyConstants.IN_MOVED_TO | InotifyConstants.IN_CLOSE_WRITE
                      | InotifyConstants.IN_CREATE)

    def __init__(self, spool: Spool, claims: queue.SimpleQueue[Claimed],
                 wake: Callable[[], None]) -> None:
        self._spool = spool
        self._claims = claims
        self._wake = wake
        self._accepting = False
        self._inotify: InotifyFD | None = None
        self._lock = threading.Lock()
        self.rescan_requested = threading.Event()
        self._scan_due = 0.0  # monotonic
        self._first = True  # the first scan looks for what the watch could not see
        self._retry_soon = False  # the next scan is the retry of such a scan (QUIET_S)
        self._scan: _Scan | None = None  # the scan under way, a step a tick
        self._stillness = Stillness()
        # Finished files left in inbox/ while MAX_CLAIMS_WAITING are (under _lock): taken
        # first as room comes, in the order they came, and new ones wait behind them.
        self._held: deque[str] = deque()
        self._held_names: set[str] = set()
        # No room to hold another name: new ones are forgotten until those held are taken.
        # Held behind a list that stayed full as it drained, a steady stream of drops kept
        # the forgotten waiting for as long as it lasted.
        self._held_over = False
        self._forgotten = False  # a name came and was forgotten since the scan began
        # Entries whose claim failed, said once each (under _lock); those past its bound
        # are counted, and said in one line at the end of a scan.
        self._unclaimable = Unclaimable()
        self._unsaid_failures = 0
        self._life_began = new_job_id()  # a job id older than this is of an earlier life

    def start(self) -> None:
        # watchdog's low-level inotify reader, not its Observer: the Observer holds every
        # event for 0.5 s after a move out of the directory (each of our claims) to pair
        # moves, which would add half a second to pickup latency under load.
        inotify = InotifyFD()
        inotify.daemon = True  # lives as long as the process
        inotify.start()
        self._inotify = inotify
        inotify.add_callback(os.fsencode(self._spool.inbox), self.WATCH_MASK,
                             _InboxWatch(self), CallbackId(0))
        self._accepting = True

    def failure(self) -> str | None:
        """Why the inotify thread is gone, if it is (files would then wait for rescans)."""
        if self._accepting and self._inotify is not None and not self._inotify.is_alive():
            return "the drop folder's inotify thread stopped"
        return None

    def is_regular_file(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self._spool.inbox / name).st_mode)
        except FileNotFoundError:
            return False

    def request_rescan(self) -> None:
        self.rescan_requested.set()
        self._wake()

    def stop(self) -> None:
        """Take no more files; a claim in progress completes before this returns."""
        with self._lock:
            self._accepting = False

    @property
    def next_scan(self) -> float:
        """When `rescan_if_due` has work (monotonic): the next scan or its next step, or
        now, while names left in the inbox can be claimed (none once stopped: they stay);
        never while a scan waits for room to hold what it finds."""
        if self._accepting and (self._held or self._held_over) and not self._backlog_full():
            return 0.0
        if self._held_over:
            return math.inf  # the claims read by a tick make room, and that tick goes on
        return self._scan_due

    def take(self, name: str) -> None:
        """Claim `inbox/name` if it is a job candidate (or, while MAX_CLAIMS_WAITING claims
        wait to be read, or names are held or forgotten before it, hold it: see `_hold`)."""
        if not is_job_candidate(name) or "/" in name:
            return
        self._take(name, by_scan=False)

    def _take(self, name: str, *, by_scan: bool) -> bool:
        """Claim or hold `name`; False if there was no room to hold it."""
        with self._lock:
            if not self._accepting:
                return True  # it stays in inbox/ for the next start
            if self._held or self._held_over or self._backlog_full():
                return self._hold(name, by_scan=by_scan)
            claimed = self._claim(name)
        self._posted(name, claimed)
        return True

    def _backlog_full(self) -> bool:
        return self._claims.qsize() >= MAX_CLAIMS_WAITING

    def _hold(self, name: str, *, by_scan: bool) -> bool:
        """Leave `name` in the inbox, to be claimed in its turn (under _lock); False if it
        is forgotten instead (a scan keeps its own, `_Scan.pending`)."""
        if name in self._held_names:
            return True
        if self._held_over or len(self._held) >= MAX_HELD_NAMES:
            self._held_over = True
            self._forgotten = self._forgotten or not by_scan
            return False
        if not self._held:
            log.info("drops_left_in_inbox", waiting=self._claims.qsize(),
                     message=f"{MAX_CLAIMS_WAITING} claimed drops wait to be read; more "
                     "stay in inbox/ and are claimed in order as room comes")
        self._held.append(name)
        self._held_names.add(name)
        return True

    def _claim(self, name: str) -> Claimed | None:
        """Move `inbox/name` into work/ and post it on `claims` (under _lock, so that the
        backlog is counted right); None if it is gone or cannot be moved."""
        if self._refused_in_place(name):
            return None
        try:
            claimed = self._spool.claim(name, new_job_id())
        except OSError as error:  # left in inbox/
            self._claim_failed(name, error)
            return None
        if claimed is not None:
            self._claims.put(claimed)
        return claimed

    def _lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.lstat(self._spool.inbox / name)
        except OSError:
            return None

    def _refused_in_place(self, name: str) -> bool:
        if name not in self._unclaimable:
            return False
        info = self._lstat(name)
        return info is not None and self._unclaimable.refused(name, info.st_ino)

    def _claim_failed(self, name: str, error: OSError) -> None:
        """Say once that `name` could not be claimed (under _lock): a scan found it again
        every interval, and logged it each time (12 lines in 12 s for one directory, N a
        scan for N). An entry the daemon may not move, whatever it is, is no job: it gets
        its error record in failed/ where it is (inboxrules.claim_refusal); a file whose
        failure is the disk's stays to be tried by each scan."""
        info = self._lstat(name)
        if info is None or self._unclaimable.known(name, info.st_ino):
            return  # gone (claimed or removed), or said already
        if not self._unclaimable.remember(name, info.st_ino, refused=False):
            self._unsaid_failures += 1
            return
        refusal = claim_refusal(info.st_mode, error)
        if refusal is None:
            log.error("claim_failed", input=ascii(name), error=str(error),
                      message="left in inbox/; each scan tries it again, said once")
            return
        job_id = new_job_id()
        try:
            where = _record_refusal(self._spool, name, job_id, refusal)
        except OSError as failure:
            log.error("claim_failed", input=ascii(name), error=str(error),
                      record_error=str(failure), message="left in inbox/ without a record")
            return
        self._unclaimable.remember(name, info.st_ino, refused=True)
        log.warning("job_rejected", job=job_id, source=SOURCE, input=ascii(name),
                    code=str(refusal.code), message=refusal.message, failed=where)

    def _forget_gone_failures(self) -> None:
        """After a whole scan: entries that could not be claimed and are gone are forgotten
        (their names may come again), and those past the bound are said in one line."""
        with self._lock:
            self._unclaimable.forget_unless(
                lambda name, inode: (info := self._lstat(name)) is not None
                and info.st_ino == inode)
            unsaid, self._unsaid_failures = self._unsaid_failures, 0
        if unsaid:
            log.error("claim_failed", entries=unsaid, message="entries of inbox/ could not "
                      f"be claimed, past the {len(self._unclaimable)} named already")

    def _posted(self, name: str, claimed: Claimed | None) -> None:
        """Say so, once a claim is posted (outside _lock)."""
        if claimed is None:
            return
        if claimed.original_name != name:
            log.warning("input_name_shortened", input=ascii(name),
                        shortened=claimed.original_name, job=claimed.job_id)
        self._wake()

    def _claim_held(self) -> None:
        """Claim the names held in the inbox, oldest first, as the backlog has room (at
        most SCAN_STEP a tick); once none are left, names may be held again, and a scan
        finds those forgotten (the scan under way goes on, or a new one is asked for)."""
        taken: list[tuple[str, Claimed | None]] = []
        with self._lock:
            if not self._accepting:
                return
            while self._held and not self._backlog_full() and len(taken) < SCAN_STEP:
                name = self._held.popleft()
                self._held_names.discard(name)
                taken.append((name, self._claim(name)))
            if self._held_over and not self._held and not self._backlog_full():
                self._held_over = False
                if self._scan is None and self._forgotten:
                    self.rescan_requested.set()
        for name, claimed in taken:
            self._posted(name, claimed)

    def rescan_if_due(self, now: float, interval_s: float) -> None:
        """A scan every `interval_s` (or sooner when asked, and once more QUIET_S after such
        a scan found files too fresh to take): files renamed in while the watch was not
        looking are taken too, SCAN_STEP names a tick (the next tick comes at once while
        names are left). Nothing once stopped (`stop`): no file is taken then."""
        if not self._accepting:
            return
        self._claim_held()
        if self._held_over:
            return  # what a scan finds could not be held: it waits for room
        if self._scan is None:
            if now < self._scan_due and not self.rescan_requested.is_set():
                return
            unseen = self._first or self.rescan_requested.is_set()
            self._first = False
            self.rescan_requested.clear()
            with self._lock:
                self._forgotten = False  # this scan finds them
            soon = unseen or self._retry_soon
            self._scan = _Scan(self._spool.inbox_names(), QUIET_S if soon else interval_s,
                               now, retried_soon=unseen)
        scan = self._scan
        if self._scan_step(scan):
            self._scan_due = now  # the rest at the next tick
            return
        self._scan = None
        self._stillness.scan_ended()
        self._forget_gone_failures()
        self._retry_soon = scan.retried_soon and scan.deferred > 0
        self._scan_due = now + (QUIET_S if self._retry_soon else interval_s)
        with self._lock:
            if self._forgotten:  # names came while it read past where they may be
                self.rescan_requested.set()
                self._scan_due = now
        log.debug("inbox_scanned", names=scan.looked, too_fresh=scan.deferred,
                  next_in_s=round(self._scan_due - now, 3))

    def _scan_step(self, scan: _Scan) -> bool:
        """Look at the next SCAN_STEP names of `scan`, and claim the job files among them
        that have been still for its quiet_s (counting those too fresh to take); False once
        none are left. Every name counts: a million writers' temp files, skipped uncounted,
        were all looked at in one tick (1 s)."""
        if scan.pending is not None:
            name, scan.pending = scan.pending, None
            if not self._take(name, by_scan=True):
                scan.pending = name
                return True
        looked = 0
        for name in itertools.islice(scan.names, SCAN_STEP):
            looked += 1
            if not is_job_candidate(name):
                continue
            try:
                info = os.lstat(self._spool.inbox / name)
            except FileNotFoundError:
                continue
            if not self._stillness.is_still(name, info, time.time(), scan.began,
                                            scan.quiet_s):
                scan.deferred += 1
            elif not self._take(name, by_scan=True):
                scan.pending = name  # the scan waits here for room (rescan_if_due)
                break
        scan.looked += looked
        if scan.pending is not None:
            log.debug("inbox_scan_waiting", names=scan.looked, held=len(self._held),
                      message="the scan goes on once the names held are claimed")
        if looked < SCAN_STEP and scan.pending is None:
            scan.names.close()  # its directory's descriptor
            return False
        return True

    # The methods below run on the supervisor's thread, which owns every outcome.

    def admit(self, claimed: Claimed, limits: Limits, max_file_bytes: int) -> Job | None:
        """The job to run for a claimed file; None if it has already ended (now recorded).

        Raises `JobFailure` for a file that is not a valid job (see `fail`).
        """
        if self._spool.resume_failure(claimed) is not None:
            return None
        # Done before a crash (its record written, its file not yet released)? Asked before
        # the file is judged: a restart with a lower max_text_chars or max_file_bytes
        # failed it too, one input with a result and an error record.
        if self._released_if_done(claimed, claimed.stem):
            return None
        try:
            job = parse(claimed, self._spool.read(claimed, max_file_bytes), limits)
        except JobFailure:
            if self._released_if_done(claimed, self._output_of_earlier_job(claimed)):
                return None
            raise
        job = replace(job, received_at=claimed.claimed_at)
        if job.output != claimed.stem and self._released_if_done(claimed, job.output):
            return None
        if job.prompt_audio is not None:
            job = replace(job, prompt_audio=str(
                self._spool.claim_prompt(claimed, job.prompt_audio)))
        return job

    def _released_if_done(self, claimed: Claimed, output: str | None) -> bool:
        """Whether the job's result is in the outbox under `output`; its file is released
        then (done before a crash: only the cleanup was left)."""
        if output is None or self._spool.finished_result(claimed, output) is None:
            return False
        self._spool.release(claimed)
        return True

    def _output_of_earlier_job(self, claimed: Claimed) -> str | None:
        """The `output` a JSON job that a crash left in work/ names, read without the limits
        of this life (that may have refused it); None for any other file. Only a job of an
        earlier life can have been done (its id is older than this intake), so a file
        refused now is read again only after a crash, and at most EARLIER_JOB_BYTES."""
        if claimed.suffix != "json" or claimed.job_id[:_ID_TIME] >= self._life_began[:_ID_TIME]:
            return None
        try:  # never through a link, nor waiting on a FIFO (Spool.read refused those)
            fd = os.open(self._spool.work / claimed.work_name,
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as stream:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return None
                fields = json_value(stream.read(EARLIER_JOB_BYTES + 1).decode())
        except (OSError, UnicodeDecodeError, NotJSON):
            return None
        output = fields.get("output") if isinstance(fields, dict) else None
        return output if isinstance(output, str) and "/" not in output else None

    def fail(self, claimed: Claimed, error: JobError) -> str:
        name = self._spool.publish_failure(claimed, error)
        log.warning("job_rejected", job=claimed.job_id, source=SOURCE,
                    input=claimed.original_name, code=str(error.code), message=error.message,
                    failed=name)
        return name

    def deliver(self, job: Job, result: JobResult, made: ResultAudio,
                timings: dict[str, float]) -> Deferred:
        """The result, to be encoded (never here: native codecs run in the encoder process),
        then published in the outbox under the base name `publish` returns."""
        record = {
            "input": Claimed(job.origin).original_name,
            "voice": result.voice,
            "format": job.format,
            "sample_rate": result.sample_rate,
            "speed": job.speed,
            "chars": job.chars,
            "audio_s": round(result.audio_s, 4),
            "synth_s": round(result.synth_s, 4),
            "cached": result.cached,
            "timings": timings,
        }
        if result.served_by:
            record["served_by"] = result.served_by

        beside = {captions.FILE_EXTENSIONS[job.captions]:
                  captions.render(result.captions, job.captions)} \
            if job.captions is not None and result.captions is not None else {}

        # The encoder process writes the staged file (its saving thread fsyncs it); the tick
        # publishes it once the encoder's completion (taken under its lock) says so.
        claimed = Claimed(job.origin)
        staged = self._spool.staged_result(claimed, job.format)

        def publish(_written: bytes) -> str:
            assert staged.path is not None, "published once written"
            return self._spool.publish_result(claimed, job.output, job.format, staged.path,
                                              record, beside=beside)

        return Deferred(made, job.format, publish, staged)

    def fail_job(self, job: Job, error: JobError) -> str:
        return self.fail(Claimed(job.origin), error)

    def cancelled(self, job: Job) -> None:
        self.fail_job(job, JobError(ErrorCode.CANCELLED, "cancelled by a client"))

    def started(self, job: Job, sample_rate: int) -> None:
        """Files are written whole, at the end."""

    def chunk(self, job: Job, seq: int, samples: npt.NDArray[np.float32]) -> None:
        """Files are written whole, at the end."""
