"""Several workers: placement, concurrency, fair turns between jobs, and no audio lost or
repeated when a worker dies between or inside a job's segments."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, assert_speech, wait_until
from tests.engines.faulty import SAMPLE_RATE, SECONDS_PER_CHAR

FAULTY = "tests.engines.faulty:load"
QUICK = {"kill_grace_s": 1.0, "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 3.0}
UNPACKED = {"pack_segment_chars": 0}


def tone_samples(text: str) -> int:
    """What the tone engine makes of `text`, segment by segment (one per sentence)."""
    sentences = [s for s in text.replace(". ", ".\n").splitlines() if s.strip()]
    return sum(int(len(s.strip()) * SECONDS_PER_CHAR * SAMPLE_RATE) for s in sentences)


def pool_daemon(make_daemon: DaemonFactory, engine: str = FAULTY, **worker: Any) -> Daemon:
    # One segment per sentence: these tests watch jobs move segment by segment.
    daemon = make_daemon(engine={"name": engine}, worker=QUICK | worker,
                         scheduling=UNPACKED)
    daemon.start()
    return daemon


def busy_events(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events("worker_state") if e["state"] == "busy"]


def test_two_workers_serve_two_jobs_at_once(make_daemon: DaemonFactory) -> None:
    daemon = pool_daemon(make_daemon, per_device=2)
    # The operator's view (the admin token): workers' job ids are shown to admins only.
    with Client(daemon.endpoint, admin_token=daemon.admin_token()) as client:
        wait_until(lambda: [w["state"] for w in client.stats()["workers"]] == ["idle", "idle"],
                   60, "two idle workers")
        for name in ("one", "two"):
            daemon.drop(f"{name}.txt", "Take a while. SLOW@2.")
        both = wait_until(lambda: (w := client.stats()["workers"]) and
                          all(x["state"] == "busy" for x in w) and w, 30, "both busy at once")
    assert len({job for worker in both for job in worker["jobs"]}) == 2
    assert {worker["slot"] for worker in both} == {0, 1}
    for name in ("one", "two"):
        record = daemon.wait_done(f"{name}.txt")
        samples, _rate = soundfile.read(daemon.outbox / record["file"])
        assert len(samples) == tone_samples("Take a while. SLOW@2.")


def test_a_worker_killed_inside_a_job_retries_that_segment_only(
        make_daemon: DaemonFactory) -> None:
    """SIGKILL the worker on a job's second segment: the job resumes there on a new worker,
    the other job finishes, and every job's audio is exactly as long as its text makes."""
    daemon = pool_daemon(make_daemon, per_device=2)
    victim = "First part is quick. Second part takes its time SLOW@3. Third part."
    other = "The other job. SLOW@1 it goes on. And ends."
    with Client(daemon.endpoint) as client:
        wait_until(lambda: len(client.stats()["workers"]) == 2, 60, "two workers")
        job = client.submit(victim)
        client.submit(other, output="other")

        def on_second_segment() -> int | None:
            for worker in client.stats()["workers"]:
                if job in worker["jobs"] and client.status(job).get("segments_done") == 1:
                    return int(worker["pid"])
            return None

        os.kill(wait_until(on_second_segment, 30, "the second segment"), signal.SIGKILL)
        wait_until(lambda: client.status(job)["state"] == "done", 60, "the victim's end")
        wait_until(lambda: client.stats()["jobs"]["done"] == 2, 60, "the other job's end")
    (retry,) = daemon.log_events("job_retry")
    assert (retry["job"], retry["segment"], retry["reason"]) == (job, 1, "exited")
    for name, text in ((job, victim), ("other", other)):
        samples, _rate = soundfile.read(daemon.outbox / f"{name}.wav")
        assert len(samples) == tone_samples(text), name  # nothing lost, nothing twice
    assert len(list(daemon.outbox.glob("*.json"))) == 2


def test_each_worker_sees_only_its_own_gpu(make_daemon: DaemonFactory) -> None:
    """On CPU, with a double that reports what its worker was given."""
    daemon = pool_daemon(make_daemon, "tests.engines.faulty:placed",
                         devices=["cuda:0", "cuda:1"], per_device=2)
    seen = wait_until(lambda: len(e := daemon.log_events("placement_seen")) == 4 and e, 60,
                      "four workers placed")
    assert sorted(e["cuda_visible_devices"] for e in seen) == ["0", "0", "1", "1"]
    with Client(daemon.endpoint) as client:
        devices = [w["device"] for w in client.stats()["workers"]]
    assert devices == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_cpu_workers_share_the_cores_and_see_no_gpu(make_daemon: DaemonFactory) -> None:
    daemon = pool_daemon(make_daemon, "tests.engines.faulty:placed", per_device=2)
    seen = wait_until(lambda: len(e := daemon.log_events("placement_seen")) == 2 and e, 60,
                      "two workers placed")
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert [(e["cuda_visible_devices"], e["omp_num_threads"]) for e in seen] == [("", share)] * 2
    assert {e["omp_wait_policy"] for e in seen} == {"PASSIVE"}  # no spinning next to others
    assert {e["piper_threads"] for e in seen} == {int(share)}


def test_interactive_goes_first_and_bulk_jobs_take_turns(make_daemon: DaemonFactory) -> None:
    """One worker. Two long drop-folder jobs alternate segment by segment; a ZeroMQ request
    sent meanwhile gets the next segment."""
    daemon = pool_daemon(make_daemon)
    sentences = " ".join(f"Sentence {n} takes SLOW@0.3 seconds." for n in range(6))
    daemon.drop("alpha.txt", sentences)
    with Client(daemon.endpoint) as client:
        wait_until(lambda: busy_events(daemon), 30, "alpha's first segment")
        daemon.drop("beta.txt", sentences)
        wait_until(lambda: len(busy_events(daemon)) >= 4, 30, "two turns each")
        result = client.synthesize("Me first.")
    interactive = result.job
    alpha, beta = (daemon.wait_done(f"{name}.txt")["job"] for name in ("alpha", "beta"))
    order = [e["job"] for e in busy_events(daemon)]
    queued = next(e for e in daemon.log_events("job_queued") if e["job"] == interactive)
    before = [e for e in busy_events(daemon) if e["timestamp"] < queued["timestamp"]]
    # At most the segment in hand when it arrived: then the interactive job.
    assert order[len(before)] == interactive
    bulk = [job for job in order if job != interactive]
    first_beta = bulk.index(beta)
    taking_turns = bulk[first_beta - 1:first_beta + 7]
    assert taking_turns == [alpha, beta] * 4, bulk
    assert order.count(alpha) == order.count(beta) == 6


def test_a_streamed_job_is_as_long_as_the_whole_one(make_daemon: DaemonFactory,
                                                    tmp_path: Path) -> None:
    """Real Piper, deterministic: the early first-segment cut adds no audio and drops none
    beyond the engine's own pause at a clause."""
    daemon = make_daemon(engine__piper={"noise_scale": 0.0, "noise_w_scale": 0.0})
    daemon.start()
    text = ("When the evening came, after a long and quiet day, the travellers reached the "
            "inn. They ate, they talked, and then they slept. Morning came early.")
    with Client(daemon.endpoint) as client:
        whole = client.synthesize(text, format="wav")
        with client.stream(text) as stream:
            streamed = b"".join(stream)
    path = tmp_path / "whole.wav"
    path.write_bytes(whole.audio)
    whole_s = assert_speech(path, 22050, text)
    streamed_s = len(np.frombuffer(streamed, dtype="<i2")) / 22050
    assert abs(streamed_s - whole_s) / whole_s < 0.05, (streamed_s, whole_s)


def reload_with(daemon: Daemon, client: Client, per_device: int) -> None:
    assert daemon.notify is not None
    notify = daemon.notify
    reloads = notify.count("READY=1") + 1
    daemon.configure(engine={"name": FAULTY}, worker=QUICK | {"per_device": per_device},
                     scheduling=UNPACKED)
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: notify.count("READY=1") == reloads, 30, "the reload")
    wait_until(lambda: [w["state"] for w in client.stats()["workers"]] == ["idle"] * per_device,
               60, f"{per_device} idle workers")


def test_a_reload_changes_the_number_of_workers(make_daemon: DaemonFactory) -> None:
    daemon = pool_daemon(make_daemon)
    with Client(daemon.endpoint) as client:
        for count in (3, 1):
            reload_with(daemon, client, count)
            daemon.drop(f"after-{count}.txt", "Served after the reload.")
            daemon.wait_done(f"after-{count}.txt")
    assert [e["workers"] for e in daemon.log_events("reloaded")] == [3, 1]
    # Slot 0's share of the cores changed each time, so its worker was replaced too.
    assert {e["reason"] for e in daemon.log_events("worker_recycle")} == {"reload"}
    assert not daemon.log_events("worker_lost")

    def exits() -> list[dict[str, Any]]:
        return [e for e in daemon.log_events("worker_state") if e["state"] == "dead"]

    # The two removed slots' workers and slot 0's first; they drain after the reload, and
    # may still be exiting when the jobs after it are done.
    wait_until(lambda: len(exits()) >= 3, 30, "three drained workers to exit")
    assert all(e["exitcode"] == 0 for e in exits())  # each drained and exited cleanly
