"""The supervisor as a process supervisor: hangs, crashes, memory recycling, spare workers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, assert_speech, process_alive, thread_fault, wait_until

FAULTY = "tests.engines.faulty:load"
QUICK = {"job_timeout_s": 2.0, "kill_grace_s": 1.0, "heartbeat_interval_s": 0.5,
         "heartbeat_timeout_s": 3.0}


def generations(daemon: Daemon) -> list[int]:
    return [e["generation"] for e in daemon.log_events("worker_state") if e["state"] == "starting"]


def faulty_daemon(make_daemon: DaemonFactory, **worker: Any) -> Daemon:
    daemon = make_daemon(engine={"name": FAULTY}, worker=QUICK | worker)
    daemon.start()
    return daemon


def test_hung_job_is_killed_retried_then_quarantined(make_daemon: DaemonFactory) -> None:
    daemon = faulty_daemon(make_daemon)
    daemon.drop("before.txt", "A normal job first.")
    daemon.drop("hang.txt", "This one will HANG.")
    daemon.drop("after.txt", "A normal job after the poison one.")
    record = daemon.wait_failed("hang.txt", timeout_s=60)
    assert record["code"] == "worker_crashed"
    assert "hung (no progress for 2 s)" in record["message"]
    daemon.wait_done("before.txt")
    daemon.wait_done("after.txt")
    lost = [e["reason"] for e in daemon.log_events("worker_lost")]
    assert lost == ["job_timeout", "job_timeout"]
    assert len(daemon.log_events("job_retry")) == 1
    assert len(generations(daemon)) == 3  # the first, the retry's, and the one after


def test_job_that_hangs_once_succeeds_on_retry(make_daemon: DaemonFactory,
                                               tmp_path: Path) -> None:
    daemon = faulty_daemon(make_daemon)
    daemon.drop("once.txt", f"Hang the first time. HANG_ONCE@{tmp_path / 'marker'}.")
    daemon.wait_done("once.txt", timeout_s=60)
    assert [e["reason"] for e in daemon.log_events("job_retry")] == ["job_timeout"]


def test_a_failing_engine_thread_is_logged_as_an_error(make_daemon: DaemonFactory) -> None:
    daemon = faulty_daemon(make_daemon)
    daemon.drop("thread.txt", "A library THREAD fails in the background.")
    daemon.wait_done("thread.txt")
    (failure,) = daemon.log_events("worker_thread_failed")
    assert (failure["level"], failure["thread"]) == ("error", "library-thread")
    assert "RuntimeError: a library thread failed" in failure["exception"]


def test_heartbeat_survives_a_slow_torch_import_and_an_idle_worker_lives(
        make_daemon: DaemonFactory) -> None:
    """On a GPU host importing torch takes longer than a heartbeat interval: the heartbeat
    thread then finds torch half-imported in sys.modules. It must go on beating, or the idle
    worker counts as silent and is killed and reloaded, again and again."""
    settings = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 1.0}
    daemon = make_daemon(engine={"name": "tests.engines.faulty:slow_torch"}, worker=settings)
    daemon.start()
    with Client(daemon.endpoint) as client:
        ready_at = client.stats()["uptime_s"]
        # Idle for three heartbeat timeouts, on the daemon's own clock.
        wait_until(lambda: client.stats()["uptime_s"] > ready_at + 3.0, 30, "an idle spell")
        figures = [client.stats()["workers"][0] for _ in range(2)]
    assert not daemon.log_events("worker_thread_failed")
    assert not daemon.log_events("memory_probe_failed")  # never touched while half-imported
    assert not daemon.log_events("worker_lost")
    assert all(worker["generation"] == 1 and worker["rss_bytes"] > 0 for worker in figures)


def test_crashing_job_is_retried_once_then_failed(make_daemon: DaemonFactory) -> None:
    daemon = faulty_daemon(make_daemon)
    daemon.drop("abort.txt", "This one will ABORT the process.")
    daemon.drop("fine.txt", "And this one is fine.")
    record = daemon.wait_failed("abort.txt", timeout_s=60)
    assert record["code"] == "worker_crashed"
    assert "died" in record["message"]
    daemon.wait_done("fine.txt")
    exits = [e for e in daemon.log_events("worker_state") if e["state"] == "dead"]
    assert [e["signal"] for e in exits[:2]] == ["SIGABRT", "SIGABRT"]


def test_leaking_worker_is_recycled_at_the_rss_limit(make_daemon: DaemonFactory) -> None:
    daemon = faulty_daemon(make_daemon, rss_limit="200MiB")
    names = [f"leak-{n}.txt" for n in range(6)]
    for name in names:
        daemon.drop(name, "This job will LEAK memory.")
    for name in names:
        daemon.wait_done(name)
    recycles = daemon.log_events("worker_recycle")
    assert recycles, "the leak must trip the limit"
    assert {r["reason"] for r in recycles} == {"rss"}
    assert all(r["rss_bytes"] > 200 << 20 for r in recycles)
    # Each recycle replaces the worker once the old one has exited.
    wait_until(lambda: len(generations(daemon)) == len(daemon.log_events("worker_recycle")) + 1,
               30, "one new worker per recycle")
    assert daemon.notify is not None
    notify = daemon.notify
    wait_until(lambda: "recycled rss" in notify.statuses()[-1], 10, "the recycle in STATUS=")


def test_piper_workers_over_a_low_rss_limit_are_replaced_and_the_thrash_reported(
        make_daemon: DaemonFactory) -> None:
    """The real engine under an RSS limit below what a Piper worker holds once it has spoken
    (a fresh worker's footprint less 48 MiB: Piper's RSS stays flat from job to job, within a
    few MiB after long paragraphs, so no text makes a worker cross a limit above it): each
    worker is replaced after its job, every job is still spoken, and the daemon says the
    limit is too low, for a fresh worker and for the recycles in a row."""
    probe = make_daemon("probe")
    probe.start()
    with Client(probe.endpoint) as client:
        fresh = wait_until(lambda: fresh_worker(client), 30, "a fresh worker's figures")
    probe.stop()
    daemon = make_daemon(worker={"rss_limit": int(fresh["rss_bytes"]) - (48 << 20)})
    daemon.start()
    wait_until(lambda: daemon.log_events("memory_limit_below_idle"), 30,
               "the warning that a fresh worker is over the limit")
    text = "The next jobs are served by the new worker."
    for n in range(4):
        daemon.drop(f"next-{n}.txt", text)
        record = daemon.wait_done(f"next-{n}.txt")
        assert_speech(daemon.outbox / record["file"], 22050, text)
    wait_until(lambda: daemon.log_events("memory_recycle_thrash"), 30, "the thrash warning")
    recycles = daemon.log_events("worker_recycle")
    assert {r["reason"] for r in recycles} == {"rss"}
    assert len(recycles) >= 3
    assert len(set(busy_generations(daemon))) >= 4, "each job on a worker of its own"


@pytest.mark.parametrize("spare", [False, True])
def test_max_jobs_recycles_without_losing_queued_jobs(make_daemon: DaemonFactory,
                                                      spare: bool) -> None:
    daemon = faulty_daemon(make_daemon, max_jobs=2, spare=spare)
    names = [f"job-{n}.txt" for n in range(7)]
    for name in names:
        daemon.drop(name, "Count me. SLOW@0.2")
    for name in names:
        daemon.wait_done(name)
    if spare:
        # The old worker keeps serving while its replacement loads, so how many of these
        # jobs it serves depends on how fast the spare loads here; once the spare is
        # promoted, the next job is the new generation's.
        wait_until(lambda: daemon.log_events("worker_promoted"), 60, "the spare's promotion")
        daemon.drop("after-promotion.txt", "Count me.")
        daemon.wait_done("after-promotion.txt")
        assert busy_generations(daemon)[-1] > 1
    recycles = daemon.log_events("worker_recycle")
    assert {r["reason"] for r in recycles} == {"max_jobs"}
    per_generation = Counter(busy_generations(daemon))
    if spare:
        assert recycles
    else:
        assert len(recycles) >= 3
        assert max(per_generation.values()) <= 2
        assert not daemon.log_events("worker_promoted")
    with Client(daemon.endpoint) as client:
        wait_until(lambda: client.stats()["recycles"]["max_jobs"]
                   == len(daemon.log_events("worker_recycle")), 30, "stats that count the recycles")
        worker = wait_until(lambda: fresh_worker(client), 30, "a worker")
    assert worker["generation"] > 1


def busy_generations(daemon: Daemon) -> list[int]:
    """The generation of the worker that took each job, in order."""
    return [e["generation"] for e in daemon.log_events("worker_state") if e["state"] == "busy"]


def test_a_ready_worker_reports_the_memory_of_its_loaded_model(
        make_daemon: DaemonFactory) -> None:
    """Heartbeats 30 s apart: the only one before READY=1 is sent as the worker starts, before
    the voice loads. A ready worker used to show that figure (45 MiB, against 240 with its
    60 MB model), and its limits were judged by it."""
    daemon = make_daemon(worker={"heartbeat_interval_s": 30.0, "heartbeat_timeout_s": 90.0})
    daemon.start()
    with Client(daemon.endpoint) as client:
        worker = wait_until(lambda: fresh_worker(client), 30, "the ready worker")
    assert int(worker["rss_bytes"]) > 150 << 20, f"{int(worker['rss_bytes']) >> 20} MiB"


def test_stopped_worker_is_killed_and_replaced(make_daemon: DaemonFactory) -> None:
    daemon = faulty_daemon(make_daemon)
    worker_pid = [e["worker_pid"] for e in daemon.log_events("worker_state")][-1]
    os.kill(worker_pid, signal.SIGSTOP)  # no heartbeats; SIGTERM stays pending: SIGKILL it is
    wait_until(lambda: any(e["reason"] == "heartbeat_timeout"
                           for e in daemon.log_events("worker_lost")), 30, "the silent worker")
    wait_until(lambda: daemon.log_events("worker_sigkill"), 30, "the escalation to SIGKILL")
    daemon.drop("after-stop.txt", "Served by the replacement.")
    daemon.wait_done("after-stop.txt")


def test_engine_that_fails_to_load_exits_with_code_3(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine={"name": "tests.engines.faulty:broken"},
                         worker={"max_start_failures": 3})
    daemon.start(wait_ready=False)
    assert daemon.wait_exit(timeout_s=90) == 3
    fatal = daemon.log_events("worker_start_failed")
    assert "this model cannot load" in fatal[0]["reason"]
    assert len(generations(daemon)) == 3


@pytest.mark.serial
def test_watchdog_pings_stop_while_the_supervisor_is_blocked(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine={"name": FAULTY})
    daemon.start(extra_env={"WATCHDOG_USEC": "1000000"})
    assert daemon.notify is not None
    assert daemon.process is not None
    notify = daemon.notify
    wait_until(lambda: notify.count("WATCHDOG=1") >= 3, 10, "watchdog pings")
    os.kill(daemon.process.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    time.sleep(2.5)  # the stretch under test: no ping may arrive in it
    os.kill(daemon.process.pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    wait_until(lambda: any(t > resumed_at for t in notify.times("WATCHDOG=1")), 10,
               "pings after SIGCONT")
    during = [t for t in notify.times("WATCHDOG=1") if stopped_at + 0.2 < t < resumed_at]
    assert during == []


def fresh_worker(client: Client, after_generation: int = 0) -> dict[str, Any] | None:
    """The serving worker newer than `after_generation`, once it reports its memory; None
    meanwhile (after a recycle with no spare, there is no worker until the new one starts)."""
    for worker in client.stats()["workers"]:
        if worker["generation"] > after_generation and worker["state"] == "idle" and \
                worker["rss_bytes"]:
            return dict(worker)
    return None


def limit_from_footprint(daemon: Daemon, key: str, engine: str, headroom: int,
                         devices: tuple[str, ...] = ("cpu",)) -> int:
    """Reload the daemon with a `key` limit `headroom` above its fresh worker's footprint
    (measured, since a CUDA context alone is hundreds of MiB on some GPUs)."""
    with Client(daemon.endpoint) as client:
        worker = wait_until(lambda: fresh_worker(client), 30, "the fresh worker's figures")
    figure = "gpu_bytes" if key == "gpu_memory_limit" else "rss_bytes"
    limit = int(worker[figure]) + headroom
    assert daemon.notify is not None
    notify = daemon.notify
    daemon.configure(engine={"name": engine},
                     worker=QUICK | {key: limit, "devices": list(devices)})
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: notify.count("READY=1") == 2, 30, "the reload")
    return limit


def test_recycling_after_every_job_is_reported_as_thrash(make_daemon: DaemonFactory) -> None:
    """A limit below what one job needs: every worker serves one job and is replaced."""
    daemon = faulty_daemon(make_daemon)
    limit = limit_from_footprint(daemon, "rss_limit", FAULTY, headroom=32 << 20)
    for n in range(4):
        daemon.drop(f"leak-{n}.txt", "This job will LEAK more than the limit allows.")
        daemon.wait_done(f"leak-{n}.txt")
    (warning,) = wait_until(lambda: daemon.log_events("memory_recycle_thrash"), 30,
                            "the thrash warning")
    assert warning["level"] == "warning"
    assert warning["rss_limit"] == limit
    assert warning["rss_bytes"] > limit
    assert warning["segments_served"] == [1, 1, 1]
    with Client(daemon.endpoint) as client:
        assert client.stats()["recycle_thrash"] is True
    assert daemon.notify is not None
    assert "raise the limit" in daemon.notify.statuses()[-1]


@pytest.mark.gpu
def test_gpu_memory_limit_recycles_and_nvml_drops(make_daemon: DaemonFactory) -> None:
    """On an NVIDIA host: a worker that keeps 256 MiB of CUDA memory per job serves several
    jobs, is recycled at the limit, and NVML's figure for the new worker is back near the
    fresh worker's (measured after CUDA is initialised: its warm-up allocates)."""
    engine = "tests.engines.faulty:cuda_leak"
    daemon = make_daemon(engine={"name": engine}, worker=QUICK | {"devices": ["cuda:0"]})
    daemon.start()
    with Client(daemon.endpoint) as client:
        baseline = wait_until(lambda: (w := fresh_worker(client)) and w["gpu_bytes"] and w,
                              30, "the NVML figure")
    limit = limit_from_footprint(daemon, "gpu_memory_limit", engine, headroom=640 << 20,
                                 devices=("cuda:0",))
    for n in range(8):
        daemon.drop(f"cuda-{n}.txt", "Allocate a quarter gigabyte.")
    for n in range(8):
        daemon.wait_done(f"cuda-{n}.txt")
    recycles = daemon.log_events("worker_recycle")
    assert recycles
    assert {r["reason"] for r in recycles} == {"gpu_memory"}
    assert all(r["gpu_bytes"] > limit for r in recycles)
    assert all(r["segments_served"] >= 2 for r in recycles)  # several jobs per worker
    assert not daemon.log_events("memory_recycle_thrash")
    with Client(daemon.endpoint) as client:
        after = wait_until(lambda: (w := fresh_worker(client, recycles[-1]["generation"]))
                           and w["gpu_bytes"] and w, 60, "the new worker's NVML figure")
    # The new worker may have served the last jobs already: 256 MiB kept for each.
    kept = after["segments_served"] * (256 << 20)
    assert abs(after["gpu_bytes"] - kept - baseline["gpu_bytes"]) < 128 << 20
    print(json.dumps({"baseline": baseline, "limit": limit, "recycles": recycles,
                      "after": after}))  # figures for the notes


def test_a_limit_below_the_idle_footprint_warns_instead_of_looping(
        make_daemon: DaemonFactory) -> None:
    daemon = faulty_daemon(make_daemon, rss_limit="20MiB")
    wait_until(lambda: daemon.log_events("memory_limit_below_idle"), 30, "the warning")
    assert not daemon.log_events("worker_recycle")  # idle and over: no reload loop
    daemon.drop("served.txt", "Still served.")
    daemon.wait_done("served.txt")
    wait_until(lambda: len(daemon.log_events("memory_limit_below_idle")) >= 2, 30,
               "the replacement's warning")
    assert len(daemon.log_events("worker_recycle")) == 1  # once per job served, no more


def test_piper_without_the_memory_arena_stays_small(make_daemon: DaemonFactory) -> None:
    """With onnxruntime's arena, two long unpunctuated texts leave ~3 GB resident."""
    daemon = make_daemon(engine__piper={"memory_arena": False},
                         spool={"max_text_chars": 5000})
    daemon.start()
    long_text = " ".join(["and the text goes on without a full stop"] * 40)
    for n in range(2):
        daemon.drop(f"long-{n}.txt", long_text)
        daemon.wait_done(f"long-{n}.txt", timeout_s=120)
    with Client(daemon.endpoint) as client:
        rss = wait_until(lambda: client.stats()["workers"][0]["rss_bytes"], 30, "a memory figure")
    assert rss < 1 << 30, f"{rss >> 20} MiB"


@pytest.mark.gpu
def test_a_gpu_host_with_only_cpu_workers_is_told_so(make_daemon: DaemonFactory) -> None:
    daemon = faulty_daemon(make_daemon)  # worker.devices left at ["cpu"]
    (warning,) = daemon.log_events("gpus_unused")
    assert warning["gpus"] >= 1
    assert "worker.devices" in warning["message"]


SPAWN_DELAY_S = 3.0


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` now."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_a_child_still_starting_when_the_supervisor_is_killed_goes_with_it(
        make_daemon: DaemonFactory) -> None:
    """A child asks the kernel to kill it with its parent (PR_SET_PDEATHSIG) once it runs,
    a second or more after it is spawned; a supervisor SIGKILLed before that left a worker
    loading its model for good (one such was found 40 minutes after its test). The child
    now sees, once it has asked, whether its parent is already gone, and goes."""
    daemon = make_daemon(engine={"name": "tests.engines.faulty:never_ready"},
                         worker={"start_timeout_s": 3600.0})
    slow = thread_fault("slow_spawn", COSYVOICED_TEST_SPAWN_DELAY_S=str(SPAWN_DELAY_S))
    daemon.start(extra_env=slow, wait_ready=False)
    assert daemon.process is not None
    pid = daemon.process.pid
    spawned = wait_until(lambda: [child for child in _children(pid)
                                  if b"--multiprocessing-fork" in
                                  Path(f"/proc/{child}/cmdline").read_bytes()], 30,
                         "the worker and the encoder to be spawned")
    daemon.kill_hard()  # before they are past their slow start
    try:
        wait_until(lambda: not any(process_alive(child) for child in spawned),
                   SPAWN_DELAY_S + 20, "the children to go with their supervisor")
    finally:
        for child in spawned:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
