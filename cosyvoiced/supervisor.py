"""The supervisor: the arbiter (gunicorn's Arbiter, Postfix's master). It builds the parts,
runs the workers and the tick, and stays out of the data path: jobs live in the job book
(jobs.py), intakes see one service (service.py), the cluster is sharing.py.

Signal handlers only record the signal. One tick acts, always in this order:
1. signals (stop, reload);
2. the intakes' queues into the service (drop-folder claims, ZeroMQ, HTTP, Wyoming: in
   turns, within one budget), and a dead intake thread is noticed;
3. the cluster's jobs and events (sharing.poll);
4. encoded results published (the encoder process's);
5. the workers' messages, to the catalog or the job book;
6. the workers checked (dead, hung, silent) and managed (recycle, spare, spawn);
7. dispatch: the next segments to the idle workers;
8. what the job book recorded, drained (closed jobs to the metrics, spool and cluster);
9. jobs wanted from the cluster (sharing.offer);
10. inbox rescan, stop progress, STATUS=, WATCHDOG=1, the roster; 11. the heap (heap.py).
Because the watchdog ping comes from the tick, a supervisor that stops ticking stops
pinging, and systemd restarts it. Each step is timed (tickclock.py).
"""

from __future__ import annotations

import queue
import signal
import time
from dataclasses import replace
from types import FrameType

from zmq import ZMQError

from cosyvoiced import __version__, config, heap, logs, reload, report
from cosyvoiced.config import Config
from cosyvoiced.encoding import Encoder
from cosyvoiced.jobs import JobBook
from cosyvoiced.messages import EngineReady, FromWorker
from cosyvoiced.metrics import Metrics
from cosyvoiced.notify import Notifier
from cosyvoiced.pool import GIVE_UP, REVERT_ENGINE, WorkerPool, warn_if_gpus_unused
from cosyvoiced.resultcache import ResultCache
from cosyvoiced.service import Intakes, Service
from cosyvoiced.sharing import Sharing
from cosyvoiced.speakers import SpeakerStore
from cosyvoiced.spool import Claimed, Spool
from cosyvoiced.tickclock import TickClock
from cosyvoiced.wakeup import Wakeup
from cosyvoiced.workerhandle import WorkerHandle

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_LISTEN = 1  # an address to listen on is taken or not ours
EXIT_WORKER_START = 3  # every slot failed to load `worker.max_start_failures` times in a row
EXIT_INTAKE_DIED = 4  # an intake's thread died: systemd restarts the whole service
EXTEND_TIMEOUT_S = 15.0  # asked for, again and again, while the engine loads before READY
MAX_TICK_S = 1.0
ENCODER_STOP_S = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

log = logs.get_logger("cosyvoiced.supervisor")


class Supervisor:
    def __init__(self, config: Config, config_path: str | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config, self.config_path = config, config_path
        self.reload_error: str | None = None
        self.intake_failure: str | None = None  # an intake thread that died, and why
        self.metrics, self.notifier = Metrics(), notifier or Notifier()
        self.spool = Spool(config.spool.dir)
        self.wakeup = Wakeup()
        self.wake = self.wakeup.wake  # for the parts that must tick the loop (any thread)
        self.encoder = Encoder(self.wake)  # native codecs, in a process of their own
        self.pool = WorkerPool(lambda: self.config, self.metrics)
        speakers = SpeakerStore(config.engine.cosyvoice.speakers_file)
        self.cache = ResultCache(config, speakers, self.metrics)
        self.book = JobBook(self.spool, self.encoder, self.cache.worker_job, lambda: self.config)
        claims: queue.SimpleQueue[Claimed] = queue.SimpleQueue()
        self.intakes = intakes = Intakes.build(lambda: self.config, self.spool, claims,
                                               self.wake, self.encoder, lambda: self.service.limits)
        self.inbox, self.zmq, self.http, self.wyoming = intakes.all()
        self.service = Service(lambda: self.config, spool=self.spool, book=self.book,
                               cache=self.cache, speakers=speakers, metrics=self.metrics,
                               intakes=intakes, claims=claims, wake=self.wake)
        self.service.pool = self.pool
        self.service.report = lambda identity: report.stats(
            self._snapshot(), time.monotonic() - self.started_at,
            lambda job_id: self.service.visible(job_id, identity))
        self.sharing = Sharing(config.cluster, self.service, book=self.book, prompts=self.spool,
                               metrics=self.metrics)
        self.service.sharing = self.sharing
        self.book.host = self.sharing.name
        self.stop_deadline = self.next_extend = 0.0
        self.tick_clock = TickClock(self.metrics.tick_seconds.observe)
        self.started_at = time.monotonic()
        self.heap = heap.HeapTrim(self.started_at)
        self.exit_code: int | None = None
        self._signals: list[int] = []

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)  # only record it: the tick acts (no logging here)

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        self.wakeup.on_signals((*STOP_SIGNALS, signal.SIGHUP), self._on_signal)
        self.spool.ensure()
        self.service.admin_token = self.spool.new_admin_token()
        self.encoder.start()
        log.info("starting", version=__version__, spool=str(self.spool.root),
                 engine=self.config.engine.name, rss_limit=self.config.worker.rss_limit,
                 per_device=self.config.worker.per_device)  # "auto" resolved: the count
        self.sharing.connect()  # first: jobs left in work/ may be on the shared stream
        self.service.recover()
        self.pool.resize(time.monotonic())
        warn_if_gpus_unused(self.config)
        self.pool.spawn_due(time.monotonic())
        try:
            for intake in (self.zmq, self.http, self.wyoming):
                intake.start()
            if self.config.metrics.listen:
                self.metrics.serve(self.config.metrics)
        except (OSError, ZMQError) as error:
            log.critical("listen_failed", error=str(error),
                         message="cannot listen on a zmq.bind or metrics.listen address")
            for worker in self.pool.handles():
                worker.kill_now()
            return EXIT_LISTEN
        self.inbox.start()
        self.service.start_cluster()
        while self.exit_code is None:
            self.tick(time.monotonic())
            if self.exit_code is None:
                self._wait(self._timeout(time.monotonic()))
        self.service.settle()
        self.service.stop_cluster()  # after the outcomes of the jobs served for others
        self.encoder.stop(ENCODER_STOP_S)
        for intake in (self.zmq, self.http, self.wyoming):
            intake.stop()
        log.info("stopped", exit_code=self.exit_code, **self.book.records.counts)
        return self.exit_code

    def _timeout(self, now: float) -> float:
        deadlines = [self.inbox.next_scan, now + MAX_TICK_S, *self.service.deadlines(),
                     *self.pool.deadlines(self.service.stopping)]
        watchdog = self.notifier.next_watchdog_at()
        if watchdog is not None:
            deadlines.append(watchdog)
        return max(0.0, min(deadlines) - now)

    def _wait(self, timeout: float) -> None:
        self.wakeup.wait(self.pool.waitables(), timeout)

    # -- the tick (its order is the module docstring's) -----------------------------------
    def tick(self, now: float) -> None:
        with self.tick_clock.timing() as timed:  # a slow tick names the step that took long
            timed.run("signals", self._handle_signals, now)
            timed.run("intakes", self._handle_intakes, now)
            timed.run("cluster_events", self.sharing.poll, now)
            timed.run("encoded", self.book.drain_encoded, now)
            timed.run("workers", self._handle_workers, now)
            timed.run("dispatch", self.book.dispatch, self.pool.idle(), now,
                      self.service.stopping, self.pool.stream_places())
            timed.run("settle", self.service.settle)
            timed.run("offer", self.sharing.offer)
            timed.run("rescan", self.inbox.rescan_if_due, now, self.config.spool.rescan_interval_s)
            timed.run("stop", self._progress_stop, now)
            timed.run("report", self._report, now)
            timed.run("heap", self.heap.trim_if_due, now)

    def _handle_signals(self, now: float) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum in STOP_SIGNALS:
                self._begin_stop(now, signal.Signals(signum).name)
            elif signum == signal.SIGHUP and not self.service.stopping:
                self._reload()

    def _reload(self) -> None:
        """Re-read the config; apply what can change live; keep the old one if it is bad."""
        self.notifier.reloading()
        try:
            plan = reload.read(self.config, self.config_path)
        except config.ConfigError as error:
            self.reload_error = str(error)
            log.error("reload_failed", error=str(error), message="keeping the running config")
        else:
            self.config, self.reload_error = plan.config, None
            self.service.reconfigure(plan.config)
            logs.set_level(plan.config.log.level)
            if plan.engine_changed:
                self.pool.reload_pending = set(range(len(self.pool.slots)))
            self.pool.resize(time.monotonic())  # worker.devices, worker.per_device
            reload.report(plan, len(self.pool.slots))
        if self.service.ready:  # else READY=1 comes when the engine is (the first start)
            self.notifier.ready()

    def _handle_intakes(self, now: float) -> None:
        self.intakes.take_inbound(self.service, now)
        self._watch_intakes(now)

    def _watch_intakes(self, now: float) -> None:
        """A dead intake thread is never silent: the daemon says so (STATUS=, /readyz, the
        ready metric) and stops with its own exit code, so that systemd restarts it."""
        if self.intake_failure is not None:
            return
        for part in (self.inbox, self.zmq, self.http, self.wyoming, self.encoder):
            failure = part.failure()
            if failure is not None:
                self.intake_failure = failure
                self.metrics.ready.set(0)
                log.critical("intake_died", reason=failure, exit_code=EXIT_INTAKE_DIED,
                             message="stopping so that the service manager restarts it")
                self._begin_stop(now, failure)  # jobs in progress still finish
                return

    # -- the workers ----------------------------------------------------------------------
    def _handle_workers(self, now: float) -> None:
        for handle, message in [*self.pool.messages(now), *self.pool.reap(now)]:
            self._on_message(handle, message, now)
        self.pool.check_spare(now)
        for worker, reason in self.pool.check(now, self.book.progress):
            if reason == "exited":
                for message in worker.messages(now):  # whatever it sent before it died
                    self._on_message(worker, message, now)
            self._lose(worker, now, reason)
        freed, self.book.freed = self.book.freed, []  # recycled if due, before dispatch
        if not self.service.stopping:
            self.pool.manage(freed, now)

    def _lose(self, worker: WorkerHandle, now: float, reason: str) -> None:
        """A serving worker died or must die: settle its segment, plan a new worker."""
        verdict = self.pool.lose(worker, now, reason, quiet=self.service.stopping)
        self.book.lost(worker, reason, now)
        if verdict == REVERT_ENGINE:
            self._revert_engine()
        elif verdict == GIVE_UP:  # no slot can serve: logged (worker_start_failed)
            self._begin_stop(now, "worker start failures")
            self.exit_code = EXIT_WORKER_START

    def _on_message(self, worker: WorkerHandle, message: FromWorker, now: float) -> None:
        """The pool's own (heartbeats, logs, loading), the catalog's, or the job book's."""
        routed = self.pool.take(worker, message, now, self.service.stopping)
        if isinstance(routed, EngineReady):
            if self.service.engine_ready(routed):  # the first worker: the daemon is ready
                self.notifier.ready()
                log.info("ready", engine=routed.engine, default_voice=routed.default_voice,
                         workers=len(self.pool.slots))
        elif routed is not None:
            self.book.on_worker_message(worker, routed, now)

    def _revert_engine(self) -> None:
        """A reload's engine settings cannot load: serve on with the last that did."""
        self.reload_error = f"the engine settings failed to load ({self.pool.last_load_error})"
        self.config = replace(self.config, engine=self.pool.revert_engine())
        self.service.reconfigure(self.config)

    # -- stopping -------------------------------------------------------------------------
    def _begin_stop(self, now: float, reason: str) -> None:
        if self.service.stopping:
            return
        self.service.stopping = True
        self.stop_deadline = now + self.config.worker.drain_timeout_s
        self.notifier.stopping()
        log.info("stopping", reason=reason, queued=len(self.book.records.queued()),
                 running=[r.job.id for r in self.book.records.in_hand()])
        self.inbox.stop()

    def _progress_stop(self, now: float) -> None:
        if not self.service.stopping:
            return
        abandoned = self.service.drain(now >= self.stop_deadline)
        if abandoned is None:
            return  # the jobs in progress are finishing
        self.pool.retire_all(now, abandoned)
        if not self.pool.retiring and self.exit_code is None:
            self.exit_code = EXIT_OK if self.intake_failure is None else EXIT_INTAKE_DIED

    # -- reporting ------------------------------------------------------------------------
    def _report(self, now: float) -> None:
        self.notifier.status(self.status_line())
        if not self.service.ready and not self.service.stopping and now >= self.next_extend:
            self.notifier.extend_timeout(EXTEND_TIMEOUT_S)
            self.next_extend = now + EXTEND_TIMEOUT_S / 3
        if self.notifier.watchdog_due(now) and self.pool.healthy(now, self.book.progress):
            self.notifier.watchdog(now)
            self.metrics.watchdog_pings.inc()
        report.publish(self.metrics, self.book.records, self.pool)
        self.service.roster_note(now)

    def _snapshot(self) -> report.Snapshot:
        return report.Snapshot(
            self.book.records, self.pool, self.service.engine_name, self.config.engine.name,
            self.service.ready, self.service.stopping, self.intake_failure, self.reload_error,
            self.cache.figures(), *self.service.service_report(time.monotonic()))

    def status_line(self) -> str:
        return report.status_line(self._snapshot())

