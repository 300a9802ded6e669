"""Several daemons on one real Redis (issue 13): shared jobs, hosts that die, Redis down.

Every daemon runs the tone engine (tests/engines/faulty.py): 50 ms of tone per character
of each sentence, so a job's exact length in samples is known and a lost or doubled
segment shows. `SLOW@s` makes a sentence take that long, so jobs are in flight when a host
is killed. A "receive-only" host has an engine that never finishes loading: it takes jobs
in and serves none, so the jobs it receives are served elsewhere.
"""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import soundfile

from cosyvoiced import config, service
from cosyvoiced.client import Client, DaemonError
from cosyvoiced.memory import heap_bytes
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port, wait_until
from tests.engines.faulty import SAMPLE_RATE, SECONDS_PER_CHAR
from tests.redisserver import RedisServer, redis_server_fixture  # noqa: F401
from tests.slowlink import SlowLink

TONE = "tests.engines.faulty:load"
NEVER_READY = "tests.engines.faulty:never_ready"
CLONING = "tests.engines.faulty:cloning"
JOB_STREAMS = ("cosyvoiced:jobs:interactive", "cosyvoiced:jobs:bulk")
CLAIM_IDLE_S = 3.0
QUICK = {"job_timeout_s": 10.0, "kill_grace_s": 1.0, "heartbeat_interval_s": 0.5,
         "heartbeat_timeout_s": 3.0}


def expected_samples(text: str) -> int:
    sentences = filter(None, (s.strip() for s in re.split(r"(?<=\.)\s", text)))
    return sum(int(len(s) * SECONDS_PER_CHAR * SAMPLE_RATE) for s in sentences)


def host(make_daemon: DaemonFactory, server: RedisServer, name: str, *,
         serves: bool = True, spool: dict[str, Any] | None = None, engine: str = TONE,
         scheduling: dict[str, Any] | None = None, **cluster: Any) -> Daemon:
    engine = engine if serves else NEVER_READY
    worker = QUICK if serves else QUICK | {"start_timeout_s": 3600.0}
    return make_daemon(name, engine={"name": engine}, worker=worker, spool=spool or {},
                       scheduling=scheduling or {}, cluster={"redis": server.url, "name": name,
                                "claim_idle_s": CLAIM_IDLE_S} | cluster)


def start(daemon: Daemon, serves: bool = True) -> Daemon:
    daemon.start(wait_ready=serves)
    if not serves:
        wait_until(lambda: daemon.log_events("cluster_joined"), 30, f"{daemon.root.name} joins")
    return daemon


def records(daemon: Daemon) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in daemon.outbox.glob("*.json")]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def assert_exact_audio(path: Path, text: str) -> None:
    audio, rate = soundfile.read(path, dtype="float32")
    assert rate == SAMPLE_RATE
    assert len(audio) == expected_samples(text), f"{path.name}: lost or doubled audio"
    assert float(np.abs(audio).max()) > 0.1


def test_jobs_dropped_on_one_host_are_served_by_all_three(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    a, b, c = (start(host(make_daemon, redis_server, name)) for name in "abc")
    texts = {f"job{n}": f"Job number {n} SLOW@0.4 now. It has a second sentence."
             for n in range(12)}
    for name, text in texts.items():
        a.drop_job(name, text=text)
    done = {name: a.wait_done(f"{name}.json") for name in texts}
    assert {record["served_by"] for record in done.values()} == {"a", "b", "c"}
    for name in done:
        assert_exact_audio(a.outbox / f"{name}.wav", texts[name])
    assert len(records(a)) == len(texts)
    assert not records(b)
    assert not records(c)
    with Client(a.endpoint) as client:
        cluster = client.stats()["cluster"]
    assert cluster["connected"]
    assert cluster["name"] == "a"
    assert a.notify is not None
    assert "cluster a:" in a.notify.statuses()[-1]


def test_a_stream_is_served_by_another_host_chunk_by_chunk(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    receiver = start(host(make_daemon, redis_server, "front", serves=False), serves=False)
    start(host(make_daemon, redis_server, "back"))
    text = "First sentence SLOW@0.3 now. Second sentence here. And a third one to end."
    with Client(receiver.endpoint, timeout_s=30) as client:
        with client.stream(text) as stream:
            chunks = list(stream)
        result = client.synthesize("A whole reply, not streamed.")
        submitted = client.submit("Submitted through the front host.", output="sub")
        status = wait_until(lambda: (s := client.status(submitted))["state"] == "done" and s,
                            30, "the submitted job")
    assert len(chunks) == 3  # one per sentence: streamed as the other host made them
    assert sum(len(chunk) for chunk in chunks) // 2 == expected_samples(text)
    assert stream.end is not None
    assert stream.end["served_by"] == "back"
    assert result.header["served_by"] == "back"
    assert status["served_by"] == "back"
    record = json.loads((receiver.outbox / "sub.json").read_text())
    assert record["served_by"] == "back"


def test_a_voice_cloning_job_travels_with_its_prompt_audio(
        make_daemon: DaemonFactory, redis_server: RedisServer, tmp_path: Path) -> None:
    receiver = start(host(make_daemon, redis_server, "front", serves=False), serves=False)
    back = start(host(make_daemon, redis_server, "back", engine=CLONING))
    prompt_rate, prompt_s = 16000, 1.5
    soundfile.write(tmp_path / "prompt.wav", 0.2 * np.ones(int(prompt_rate * prompt_s)),
                    prompt_rate)
    text = "Say this in the prompt's voice."
    with Client(receiver.endpoint, timeout_s=30) as client:
        result = client.synthesize(text, (tmp_path / "prompt.wav").read_bytes())
    assert result.header["served_by"] == "back"
    (tmp_path / "cloned.wav").write_bytes(result.audio)
    audio, rate = soundfile.read(tmp_path / "cloned.wav")
    assert rate == SAMPLE_RATE
    assert len(audio) == expected_samples(text) + round(prompt_s * SAMPLE_RATE)

    def no_prompts_left() -> bool:  # removed as the job is closed, just after its reply
        return not [*(receiver.spool / "prompts").iterdir(), *(back.spool / "prompts").iterdir()]

    wait_until(no_prompts_left, 10, "both hosts to remove the prompt")


def test_a_host_that_cannot_store_a_taken_job_s_prompt_fails_it_back_and_serves_on(
        make_daemon: DaemonFactory, redis_server: RedisServer, tmp_path: Path) -> None:
    """Writing the prompt audio of a job taken from the stream failed (a full disk) on the
    tick: the serving host died (exit 5), the entry pending under its name, and took it
    again after each restart, for good (its deliveries were reset as never started)."""
    receiver = start(host(make_daemon, redis_server, "front", serves=False), serves=False)
    back = start(host(make_daemon, redis_server, "back", engine=CLONING))
    prompts = back.spool / "prompts"
    prompts.rmdir()
    prompts.write_text("not a directory: every write in it fails, as on a full disk")
    soundfile.write(tmp_path / "prompt.wav", 0.2 * np.ones(16000), 16000)
    with Client(receiver.endpoint, timeout_s=30) as client:
        with pytest.raises(DaemonError) as failed:
            client.synthesize("Say this in the prompt's voice.",
                              (tmp_path / "prompt.wav").read_bytes())
        assert failed.value.code == "internal"
        assert failed.value.message == \
            "back could not store the job's prompt audio: Not a directory"
        prompts.unlink()  # the disk has room again
        prompts.mkdir()
        result = client.synthesize("Served all the same.")
    assert result.header["served_by"] == "back"
    assert back.process is not None
    assert back.process.poll() is None


def test_a_long_drop_served_by_another_host_holds_neither_tick_nor_its_memory(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """16 minutes of audio made on another host (85 MB of float32). Its `done` event carried
    all of it: the serving host's tick joined and copied it into bytes (0.77 s held, on this
    VM), and the receiving host read it whole and held it until the file was written (its
    heap grew 217 MiB). It comes in `part` events of 1 MiB now, made on the link's writer
    thread, and kept on the receiving host's disk as they come (10 MiB)."""
    long_text = " ".join(["A very long text for a very long file, made of tone."] * 370)
    spool = {"max_text_chars": 20_000}
    receiver = start(host(make_daemon, redis_server, "front", serves=False, spool=spool),
                     serves=False)
    server = start(host(make_daemon, redis_server, "back", spool=spool))
    assert receiver.process is not None
    pid = receiver.process.pid
    started_with = peak = heap_bytes(pid)
    receiver.drop_job("long", text=long_text)

    def written() -> bool:
        nonlocal peak
        peak = max(peak, heap_bytes(pid))
        return (receiver.outbox / "long.json").exists()

    wait_until(written, 120, "the long drop's outcome")
    assert receiver.wait_done("long.json")["served_by"] == "back"
    assert_exact_audio(receiver.outbox / "long.wav", long_text)
    grew = peak - started_with
    assert grew < 32 << 20, f"the receiving host grew {grew >> 20} MiB"
    [served] = server.log_events("job")
    assert served["served_by"] == "back"
    for daemon in (receiver, server):
        held = daemon.log_events("tick_slow")
        assert not held, (daemon.root.name, held)


def test_a_receiving_host_killed_while_the_parts_of_a_reply_come_gets_it_whole(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """The parts acted on stay in Redis until the outcome is: killed half way through them,
    the receiving host reads them all again at its restart."""
    text = "A long job whose audio comes back in parts over a slow link. " * 100  # 26 MB
    with SlowLink(redis_server.port, bytes_per_s=64 << 20, back_bytes_per_s=4 << 20) as link:
        receiver = start(host(make_daemon, redis_server, "front", serves=False,
                              redis=f"redis://127.0.0.1:{link.port}/0"), serves=False)
        server = start(host(make_daemon, redis_server, "back"))
        receiver.drop_job("long", text=text)
        with Client(receiver.endpoint) as client:
            wait_until(lambda: client.stats()["reply_audio_bytes"]["disk"], 60,
                       "some parts kept on the receiving host's disk")
        receiver.kill_hard()
        assert not records(receiver)
        start(receiver, serves=False)
        record = receiver.wait_done("long.json", timeout_s=60)
    assert record["served_by"] == "back"
    assert_exact_audio(receiver.outbox / "long.wav", text)
    assert len(server.log_events("job")) == 1, "served once"
    assert not receiver.log_events("outcome_incomplete")


def test_a_serving_host_killed_mid_job_is_taken_over(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    receiver = start(host(make_daemon, redis_server, "front", serves=False), serves=False)
    servers = {name: start(host(make_daemon, redis_server, name)) for name in ("b", "c")}
    text = " ".join(f"Sentence {n} SLOW@0.5 now." for n in range(6))
    with Client(receiver.endpoint, timeout_s=30) as client:
        job = client.submit(text, output="long")
        first = wait_until(lambda: client.status(job).get("served_by"), 30, "a host to start it")
        servers[first].kill_hard()
        status = wait_until(lambda: (s := client.status(job))["state"] == "done" and s,
                            CLAIM_IDLE_S + 30, "another host to finish it")
    (survivor,) = set(servers) - {first}
    assert status["served_by"] == survivor
    assert_exact_audio(receiver.outbox / "long.wav", text)
    assert len(records(receiver)) == 1
    assert servers[survivor].log_events("job_taken_over")


def test_a_job_waiting_in_a_killed_host_s_turns_counts_as_taken_over(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """A job that a killed host had taken into its turns, not started, was taken over
    (`job_taken_over` in the log) but not counted in stats or the metrics: its delivery
    count, reset as never started, read as a first delivery."""
    receiver = start(host(make_daemon, redis_server, "front", serves=False), serves=False)
    first = start(host(make_daemon, redis_server, "b"))
    receiver.drop_job("holds", text="SLOW@4 holds the only worker.")
    wait_until(lambda: any(e["state"] == "busy" for e in first.log_events("worker_state")),
               30, "b to start it")
    receiver.drop_job("waits", text="Waits in the turns of b.")
    redis = redis_server.client()
    wait_until(lambda: redis.xpending("cosyvoiced:jobs:bulk", "hosts")["pending"] == 2, 30,
               "b to take the second into its turns")
    first.kill_hard()
    second = start(host(make_daemon, redis_server, "c"))
    for name in ("holds", "waits"):
        assert receiver.wait_done(f"{name}.json", timeout_s=CLAIM_IDLE_S + 30)[
            "served_by"] == "c"
    assert len(second.log_events("job_taken_over")) == 2
    with Client(second.endpoint) as client:
        assert client.stats()["cluster"]["taken_over"] == 2


def test_jobs_of_a_receiving_host_killed_wait_in_redis_until_it_is_back(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    receiver = start(host(make_daemon, redis_server, "front", serves=False), serves=False)
    server = start(host(make_daemon, redis_server, "back"))
    texts = {f"r{n}": f"Received by the front host SLOW@0.8 now. Number {n}." for n in range(3)}
    for name, text in texts.items():
        receiver.drop_job(name, text=text)
    redis = redis_server.client()
    wait_until(lambda: len(redis.keys("cosyvoiced:job:front:*")) == len(texts), 30,
               "the front host to share its jobs")
    receiver.kill_hard()
    wait_until(lambda: len(server.log_events("job")) == len(texts), 30,
               "the back host to serve them all with the front host down")
    assert not records(receiver)
    start(receiver, serves=False)  # same spool: its jobs are still in work/
    done = {name: receiver.wait_done(f"{name}.json", timeout_s=30) for name in texts}
    assert {record["served_by"] for record in done.values()} == {"back"}
    for name in done:
        assert_exact_audio(receiver.outbox / f"{name}.wav", texts[name])
    # None shared a second time: nothing left to serve or in progress.
    assert redis.xlen("cosyvoiced:jobs:bulk") == 0
    assert redis.xpending("cosyvoiced:jobs:bulk", "hosts")["pending"] == 0
    assert len(server.log_events("job")) == len(texts)
    # The record is the commit point; the work file goes just after it.
    wait_until(lambda: not list(receiver.work.iterdir()), 10, "work/ to empty")


def test_an_outcome_that_comes_while_its_receiving_host_stops_waits_for_its_return(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """A host stopping (SIGTERM) leaves the jobs it shared to Redis, and drains its own
    meanwhile. An outcome that came during that drain matched no job in its book: it was
    deleted as stale. Restarted, the host found the job in work/, its marker in Redis (it
    was not shared again) and no outcome: the job waited for the marker's 7 days."""
    receiver = start(host(make_daemon, redis_server, "front"))
    server = start(host(make_daemon, redis_server, "back"))
    receiver.drop("local.txt", "SLOW@8 keeps the front host busy.")
    wait_until(lambda: receiver.log_events("worker_state") and any(
        e["state"] == "busy" for e in receiver.log_events("worker_state")), 30, "front busy")
    receiver.drop("shared.txt", "SLOW@1.5 served by the back host.")
    wait_until(lambda: any(e["state"] == "busy" for e in server.log_events("worker_state")),
               30, "the back host to serve it")
    receiver.signal(signal.SIGTERM)  # it drains local.txt while the back host ends shared
    wait_until(lambda: server.log_events("job"), 30, "the back host to end it")
    assert receiver.process is not None
    assert receiver.process.poll() is None, "the outcome came after the drain, not in it"
    assert receiver.wait_exit(60) == 0
    assert [e["outcome"] for e in server.log_events("job")] == ["done"]
    start(receiver)
    assert receiver.wait_done("shared.txt", timeout_s=30)["served_by"] == "back"
    assert receiver.outcome_counts()["shared.txt"] == 1


def test_a_job_taken_back_while_redis_was_down_is_shared_again_after_a_crash(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """Redis down, a host takes back the jobs it shared, to serve them itself; one that
    another host had started, after claim_idle_s. Killed before it served it, the host
    found the job's marker in Redis at its restart: taken as shared still, the job waited
    for an outcome no host would send (the marker lives 7 days)."""
    receiver = start(host(make_daemon, redis_server, "front"))
    server = start(host(make_daemon, redis_server, "back"))
    receiver.drop("local.txt", "SLOW@12 keeps the front host busy.")
    wait_until(lambda: any(e["state"] == "busy" for e in receiver.log_events("worker_state")),
               30, "front busy")
    receiver.drop("shared.txt", "SLOW@4 started by the back host.")
    wait_until(lambda: any(e["state"] == "busy" for e in server.log_events("worker_state")),
               30, "the back host to start it")
    redis_server.kill()
    wait_until(lambda: receiver.log_events("job_taken_back"), 30, "the front host to take it")
    redis_server.restart()
    wait_until(lambda: len(receiver.log_events("cluster_up")) >= 1, 30, "front to rejoin")
    wait_until(lambda: not redis_server.client().keys("cosyvoiced:job:front:*"), 10,
               "the taken job's marker to go")
    receiver.kill_hard()  # before its turn came (local.txt holds its worker)
    start(receiver)
    assert receiver.wait_done("shared.txt", timeout_s=60)["served_by"] == "back"
    assert receiver.outcome_counts()["shared.txt"] == 1


def test_a_job_shared_before_a_crash_and_served_here_after_it_is_not_made_again(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """A host killed with a job on the stream, restarted while Redis was down, served the
    job itself: its entry (shared by the life before, so unknown to this one) and marker
    stayed in Redis, and the next host to read the stream made the job again, for nobody.
    The host withdraws it (its marker goes), and a host that takes an entry whose marker is
    gone drops it. (A host that takes its own entry back finds its job done, and settles
    it: the stale entry goes either way.)"""
    receiver = start(host(make_daemon, redis_server, "front",
                          scheduling={"max_active_jobs": 1}))
    receiver.drop("local.txt", "SLOW@6 keeps the front host busy.")
    wait_until(lambda: any(e["state"] == "busy" for e in receiver.log_events("worker_state")),
               30, "front busy")
    receiver.drop("shared.txt", "Shared, then served by its own host after all.")
    redis = redis_server.client()
    wait_until(lambda: redis.keys("cosyvoiced:job:front:*"), 30, "the job shared")
    receiver.kill_hard()
    redis_server.kill()
    start(receiver)  # Redis down: it serves both itself, local.txt first
    redis_server.restart()
    wait_until(lambda: not redis_server.client().keys("cosyvoiced:job:front:*"), 30,
               "the front host to withdraw it")
    server = start(host(make_daemon, redis_server, "back"))
    wait_until(lambda: not redis_server.client().xlen("cosyvoiced:jobs:bulk"), 30,
               "the stale entry to be dropped (by whichever host read it)")
    assert receiver.wait_done("shared.txt", timeout_s=60)["served_by"] == "front"
    assert not server.log_events("job")
    assert redis_server.client().xlen("cosyvoiced:jobs:bulk") == 0
    assert receiver.outcome_counts()["shared.txt"] == 1


def test_more_jobs_than_a_tick_admits_find_their_outcomes_after_a_restart(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """A restarted host admits the jobs left in work/ CLAIMS_PER_TICK (16) a tick, and its
    event reader read every outcome at once: those of jobs not in the book yet were deleted
    as stale, and their jobs waited for good (their markers said they were shared). Those
    events are now left in Redis and read again once every job is in the book."""
    receiver = start(host(make_daemon, redis_server, "front", serves=False), serves=False)
    names = [f"r{n}" for n in range(3 * service.CLAIMS_PER_TICK)]
    for name in names:
        receiver.drop_job(name, text=f"Received by the front host, number {name}.")
    redis = redis_server.client()
    wait_until(lambda: len(redis.keys("cosyvoiced:job:front:*")) == len(names), 60,
               "the front host to share its jobs")
    receiver.kill_hard()
    server = start(host(make_daemon, redis_server, "back"))  # no outcome seen before
    wait_until(lambda: len(server.log_events("job")) == len(names), 60,
               "the back host to serve them all with the front host down")
    start(receiver, serves=False)  # same spool: its jobs are still in work/
    for name in names:
        assert receiver.wait_done(f"{name}.json", timeout_s=60)["served_by"] == "back"
    assert receiver.outcome_counts() == {f"{name}.json": 1 for name in names}
    assert len(server.log_events("job")) == len(names)  # none served twice


def test_an_outcome_too_big_for_the_usual_timeout_arrives_over_a_slow_link(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    """A job's outcome carries its whole audio. Sent in 5 s at most (the writer's timeout,
    which tells a Redis gone), 15 MB of it over a 2 MB/s link failed every try, and every
    later command of the serving host waited behind it for good. A big command's timeout
    now allows for its size. The job's heartbeat stopped as its outcome was queued, not
    sent: an idle host took it over claim_idle_s later and made it again."""
    receiver = start(host(make_daemon, redis_server, "front", serves=False), serves=False)
    text = "A long job, its outcome sent over a slow link. " * 72  # 170 s of tone: 15 MB
    with SlowLink(redis_server.port, bytes_per_s=2 << 20) as link:
        server = start(host(make_daemon, redis_server, "back",
                            redis=f"redis://127.0.0.1:{link.port}/0"))
        receiver.drop_job("long", text=text)
        wait_until(lambda: server.log_events("job"), 30, "the back host to make it")
        idle = start(host(make_daemon, redis_server, "idle"))  # while its outcome is sent
        record = receiver.wait_done("long.json", timeout_s=90)
    assert record["served_by"] == "back"
    assert_exact_audio(receiver.outbox / "long.wav", text)
    assert not idle.log_events("job_taken_over")
    assert not idle.log_events("job")


def test_a_job_that_kills_every_worker_ends_as_worker_crashed(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    receiver = start(host(make_daemon, redis_server, "front", serves=False), serves=False)
    start(host(make_daemon, redis_server, "back"))
    receiver.drop_job("poison", text="This one will ABORT.")
    receiver.drop_job("fine", text="A normal job.")
    record = receiver.wait_failed("poison.json", timeout_s=60)
    assert record["code"] == "worker_crashed"
    assert receiver.wait_done("fine.json")["served_by"] == "back"


def test_with_redis_down_each_host_serves_its_own_jobs_and_rejoins(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    a = host(make_daemon, redis_server, "a")
    port = free_port()
    a.configure(engine={"name": TONE}, worker=QUICK, metrics={"listen": f"127.0.0.1:{port}"},
                cluster={"redis": redis_server.url, "name": "a", "claim_idle_s": CLAIM_IDLE_S})
    start(a)
    start(host(make_daemon, redis_server, "b"))
    assert "cosyvoiced_cluster_connected 1.0" in scrape(port)
    redis_server.kill()
    notify = a.notify
    assert notify is not None
    wait_until(lambda: "Redis unreachable" in notify.statuses()[-1], 30,
               "STATUS= to say Redis is unreachable")
    assert a.log_events("cluster_down")
    assert "cosyvoiced_cluster_connected 0.0" in scrape(port)
    a.drop_job("alone", text="Served while Redis is down.")
    assert a.wait_done("alone.json")["served_by"] == "a"
    with Client(a.endpoint) as client:
        assert client.stats()["cluster"]["connected"] is False
    redis_server.restart()
    wait_until(lambda: a.log_events("cluster_up"), 30, "a to rejoin")
    a.drop_job("back", text="Shared again. SLOW@0.2 now.")
    assert a.wait_done("back.json")["served_by"] in ("a", "b")
    assert len(records(a)) == 2


def test_redis_restarted_mid_run_loses_no_job(make_daemon: DaemonFactory,
                                              redis_server: RedisServer) -> None:
    daemons = [start(host(make_daemon, redis_server, name)) for name in "ab"]
    texts = {f"m{n}": f"Job {n} around a Redis restart SLOW@0.3 now. Done." for n in range(10)}
    for name, text in texts.items():
        daemons[0].drop_job(name, text=text)
    wait_until(lambda: len(records(daemons[0])) >= 2, 30, "the first jobs to finish")
    redis_server.kill()
    redis_server.restart()  # AOF, appendfsync always: the streams survive
    done = {name: daemons[0].wait_done(f"{name}.json", timeout_s=60) for name in texts}
    for name in done:
        assert_exact_audio(daemons[0].outbox / f"{name}.wav", texts[name])
    inputs = Counter(record["input"] for record in records(daemons[0]))
    assert set(inputs.values()) == {1}
    assert len(inputs) == len(texts)


@pytest.mark.parametrize("how", ["url", "password_file"])
def test_credentials_never_reach_the_logs(make_daemon: DaemonFactory, tmp_path: Path,
                                          how: str) -> None:
    password = "s3cret-cluster-password"
    settings: dict[str, Any]
    with RedisServer(tmp_path / "redis", password=password) as server:
        if how == "url":
            settings = {"redis": server.url_with_password}
        else:
            (tmp_path / "redis.password").write_text(password + "\n")
            settings = {"redis": server.url, "password_file": str(tmp_path / "redis.password")}
        daemon = start(host(make_daemon, server, "a", **settings))
        daemon.drop_job("secret", text="Nothing secret here.")
        assert daemon.wait_done("secret.json")["served_by"] == "a"
        server.kill()
        assert daemon.notify is not None
        wait_until(lambda: daemon.log_events("cluster_down"), 30, "the link to go down")
        daemon.signal(signal.SIGTERM)
        daemon.wait_exit()
        seen = daemon.log_file.read_text() + daemon.output() + "".join(daemon.notify.messages)
    assert daemon.log_events("cluster_joined")
    assert password not in seen


def test_jobs_lost_by_a_redis_without_persistence_are_served_anyway(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", aof=False) as server:
        a, _b = (start(host(make_daemon, server, name)) for name in "ab")
        texts = {f"l{n}": f"Job {n} SLOW@0.5 now. Then Redis forgets it." for n in range(6)}
        for name, text in texts.items():
            a.drop_job(name, text=text)
        with Client(a.endpoint) as client:
            wait_until(lambda: client.stats()["cluster"]["shared"] >= 4, 30, "jobs shared")
        server.restart()  # no AOF: the shared streams and markers are gone
        done = {name: a.wait_done(f"{name}.json", timeout_s=CLAIM_IDLE_S * 4 + 30)
                for name in texts}
    for name in done:
        assert_exact_audio(a.outbox / f"{name}.wav", texts[name])
    assert Counter(record["input"] for record in records(a)) == Counter(
        f"{name}.json" for name in texts)


def test_a_host_stopped_finishes_its_segment_and_hands_back_the_jobs_it_took(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    receiver = start(host(make_daemon, redis_server, "front", serves=False), serves=False)
    stopped = start(host(make_daemon, redis_server, "b"))
    texts = {f"s{n}": f"Job {n} SLOW@0.6 now. Second sentence." for n in range(4)}
    for name, text in texts.items():
        receiver.drop_job(name, text=text)
    wait_until(lambda: stopped.log_events("job_queued"), 30, "b to take a job")
    stopped.signal(signal.SIGTERM)
    assert stopped.wait_exit() == 0
    start(host(make_daemon, redis_server, "c"))
    done = {name: receiver.wait_done(f"{name}.json", timeout_s=30) for name in texts}
    for name in done:
        assert_exact_audio(receiver.outbox / f"{name}.wav", texts[name])
    assert "c" in {record["served_by"] for record in done.values()}
    assert len(records(receiver)) == len(texts)


def test_http_speech_through_another_host_and_a_hang_up_cancels_it_there(
        make_daemon: DaemonFactory, redis_server: RedisServer, tmp_path: Path) -> None:
    front = host(make_daemon, redis_server, "front", serves=False)
    front.configure(engine={"name": NEVER_READY}, worker=QUICK | {"start_timeout_s": 3600.0},
                    cluster={"redis": redis_server.url, "name": "front",
                             "claim_idle_s": CLAIM_IDLE_S},
                    http={"listen": f"127.0.0.1:{free_port()}"})
    start(front, serves=False)
    back = start(host(make_daemon, redis_server, "back"))
    listen = config.load(front.config_path).http.listen
    text = "Spoken over HTTP SLOW@0.2 now. By the host behind."
    with openai.OpenAI(base_url=f"http://{listen}/v1", api_key="unused", max_retries=0,
                       timeout=30) as client:
        reply = client.audio.speech.create(model="tts-1", voice="tone", input=text,
                                           response_format="wav")
        (tmp_path / "speech.wav").write_bytes(reply.content)
        long_text = " ".join(f"Sentence {n} SLOW@0.5 now." for n in range(20))
        with client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="tone", input=long_text, response_format="wav") as stream:
            next(chunk for chunk in stream.iter_bytes() if chunk)
    audio, rate = soundfile.read(tmp_path / "speech.wav", dtype="float32")
    assert rate == SAMPLE_RATE
    assert len(audio) == expected_samples(text)
    wait_until(lambda: [e for e in back.log_events("job") if e["outcome"] == "cancelled"],
               30, "the hang-up to cancel the job on the serving host")


@pytest.mark.serial
def test_on_a_busy_cluster_a_short_request_waits_one_segment_not_a_whole_job(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    only = start(host(make_daemon, redis_server, "only"))
    only.drop_job("long", text=" ".join(f"Sentence {n} SLOW@0.4 now." for n in range(10)))
    with Client(only.endpoint, timeout_s=30) as client:
        wait_until(lambda: only.log_events("job_queued"), 30, "the long job to be taken")
        with client.stream("A short request.") as stream:
            next(iter(stream))
            long_done_first = only.outcome("long.json") is not None
            list(stream)
    assert not long_done_first, "the short request waited for the whole long job"
    assert only.wait_done("long.json")["served_by"] == "only"


# Found by the chaos test (tests/test_cluster_chaos.py), each a reproduction.
def test_own_job_started_elsewhere_is_served_after_a_takeover(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    a = start(host(make_daemon, redis_server, "a"))
    b = start(host(make_daemon, redis_server, "b"))
    redis = redis_server.client()

    def a_reads_jobs() -> bool:  # a's job reader in a blocking XREADGROUP (repro 3)
        return any(c["name"] == "cosyvoiced:a" and c["cmd"] == "xreadgroup"
                   and "b" in c["flags"] for c in redis.client_list())

    with Client(a.endpoint, timeout_s=30) as client:
        blocker = client.submit("Blocker SLOW@5 now.", output="blocker")  # served on a
        wait_until(lambda: client.status(blocker)["state"] == "running", 30, "a to start it")
        wait_until(lambda: not a_reads_jobs(), 30, "a to stop asking for jobs")
        victim = client.submit("Victim SLOW@3 now.", output="victim")  # a is busy: shared
        wait_until(lambda: client.status(victim).get("served_by") == "b", 30, "b to start it")
        b.kill_hard()
        status = wait_until(lambda: (s := client.status(victim))["state"] == "done" and s,
                            CLAIM_IDLE_S + 30, "a to take it over and finish it")
    assert status["served_by"] == "a"
    assert [e["job"] for e in a.log_events("job_taken_over")] == [victim]  # deliveries 2
    assert not a.log_events("job_taken_back"), "a settled it; the audit found it gone"


def test_a_job_that_ran_once_under_a_dying_host_is_not_poisoned(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    front = start(host(make_daemon, redis_server, "front", serves=False), serves=False)
    b = start(host(make_daemon, redis_server, "b"))
    redis = redis_server.client()

    def pending_on_b() -> list[Any]:
        rows: list[Any] = []
        for stream in JOB_STREAMS:
            if redis.exists(stream):
                rows += redis.xpending_range(stream, "hosts", "-", "+", 10, consumername="b")
        return rows

    def victim_waits_uncounted_on_b() -> bool:
        """b took the victim into its turns, and uncounted that delivery (its reader does so
        just after the read: a kill between the two left it counted, and the victim was
        poisoned at its third delivery, once in a fresh-clone run)."""
        rows = pending_on_b()  # one stream's, in order: the blocker's, then the victim's
        return len(rows) == 2 and rows[-1]["times_delivered"] == 0

    with Client(front.endpoint, timeout_s=30) as client:
        blocker = client.submit("Blocker SLOW@2 now.", output="blocker")
        wait_until(lambda: client.status(blocker).get("served_by") == "b", 30, "b to start it")
        victim = client.submit("Victim SLOW@4 now.", output="victim")
        wait_until(victim_waits_uncounted_on_b, 30, "b to take the victim into its turns")
        assert client.status(victim).get("served_by") is None  # waiting there, not started
        b.kill_hard()  # delivery 1 ends: the victim never ran on b
        c = start(host(make_daemon, redis_server, "c"))
        wait_until(lambda: client.status(victim).get("served_by") == "c", CLAIM_IDLE_S + 30,
                   "c to take the victim over and start it")
        c.kill_hard()  # delivery 2 ends: the first death while it ran
        if b.notify is not None:
            b.notify.close()
        start(b)  # takes it over: delivery 3
        status = wait_until(lambda: (s := client.status(victim))["state"] in
                            ("done", "failed") and s, CLAIM_IDLE_S + 30, "an outcome")
    assert status["state"] == "done", status


def test_two_jobs_on_two_idle_hosts_run_at_once(make_daemon: DaemonFactory,
                                                redis_server: RedisServer) -> None:
    a = start(host(make_daemon, redis_server, "a"))
    start(host(make_daemon, redis_server, "b"))
    a.drop_job("first", text="First SLOW@2 now.")
    a.drop_job("second", text="Second SLOW@2 now.")
    done = {name: a.wait_done(f"{name}.json") for name in ("first", "second")}
    served = sorted(record["served_by"] for record in done.values())
    waits = {name: json.loads((a.outbox / f"{name}.json").read_text())["timings"]
             for name in done}
    assert served == ["a", "b"], (served, waits)


def test_a_host_with_a_worker_free_serves_its_job_without_redis(
        make_daemon: DaemonFactory, redis_server: RedisServer) -> None:
    only = start(host(make_daemon, redis_server, "only"))
    only.drop_job("direct", text="Served where it arrived.")
    assert only.wait_done("direct.json")["served_by"] == "only"
    redis = redis_server.client()
    # The streams exist (each daemon makes them and its consumer group) and never held it.
    assert [redis.xinfo_stream(stream)["entries-added"] for stream in JOB_STREAMS] == [0, 0]
    assert not redis.keys("cosyvoiced:job:*")
