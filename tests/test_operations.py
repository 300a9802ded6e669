"""What operators meet: reload on SIGHUP, journald priorities, start-up extension, metrics."""

from __future__ import annotations

import json
import re
import signal
import socket
import urllib.request

from tests.conftest import DaemonFactory
from tests.daemon import free_port, wait_until

TEXT = "Operators read this in the journal."


def test_sighup_reloads_what_it_can_and_keeps_a_bad_config_out(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    daemon.start()
    notify = daemon.notify
    assert notify is not None
    daemon.configure(spool={"max_text_chars": 20}, zmq={"max_pending": 5},
                     log={"level": "info", "backups": 9})
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: notify.count("READY=1") == 2, 30, "READY=1 after the reload")
    messages = notify.messages
    reloading = messages.index("RELOADING=1")
    assert re.fullmatch(r"MONOTONIC_USEC=\d+", messages[reloading + 1])
    assert reloading < len(messages) - 1 - messages[::-1].index("READY=1")
    reloaded = daemon.log_events("reloaded")[-1]
    assert set(reloaded["applied"]) == {"spool.max_text_chars", "zmq.max_pending", "log.level"}
    assert reloaded["restart_required"] == ["log.backups"]
    assert reloaded["recycle_worker"] is False
    daemon.drop("now-too-long.txt", "This text is longer than twenty characters.")
    assert daemon.wait_failed("now-too-long.txt")["code"] == "text_too_long"

    daemon.config_path.write_text('[log]\nlevel = "loud"\n')
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: notify.count("READY=1") == 3, 30, "READY=1 after the failed reload")
    wait_until(lambda: "config reload failed" in notify.statuses()[-1], 10, "STATUS= to say so")
    assert "log.level: expected one of" in notify.statuses()[-1]
    daemon.drop("still-limited.txt", "Still longer than twenty characters.")
    assert daemon.wait_failed("still-limited.txt")["code"] == "text_too_long"


def test_reload_of_engine_settings_recycles_the_worker(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    daemon.start()
    daemon.configure(engine__piper={"noise_scale": 0.0, "noise_w_scale": 0.0})
    daemon.signal(signal.SIGHUP)
    recycle = wait_until(lambda: daemon.log_events("worker_recycle"), 30, "the recycle")
    assert recycle[0]["reason"] == "reload"
    wait_until(lambda: [e for e in daemon.log_events("worker_state")
                        if e["state"] == "idle" and e["generation"] == 2], 60, "worker 2")
    daemon.drop("after-reload.txt", TEXT)
    daemon.wait_done("after-reload.txt")


def test_stdout_carries_journald_priorities_and_the_file_stays_json(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    daemon.start(journal=True)
    daemon.drop("bad.txt", b"\xff\xfe")  # a warning: job_rejected
    daemon.wait_failed("bad.txt")
    daemon.drop("good.txt", TEXT)
    daemon.wait_done("good.txt")
    lines = daemon.output().splitlines()
    assert lines
    for line in lines:
        match = re.match(r"<([2-7])>(\{.*\})$", line)
        assert match, line
        json.loads(match.group(2))
    priorities = {json.loads(line[3:])["event"]: line[1] for line in lines}
    assert priorities["ready"] == "6"
    assert priorities["job_rejected"] == "4"
    for line in daemon.log_file.read_text().splitlines():
        assert line.startswith("{")


def test_no_priority_prefixes_on_a_plain_stdout(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    daemon.start()
    assert all(line.startswith("{") for line in daemon.output().splitlines())


def test_start_up_timeout_is_extended_while_the_engine_loads(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    daemon.start()
    assert daemon.notify is not None
    messages = daemon.notify.messages
    extend = [m for m in messages if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extend
    assert messages.index(extend[0]) < messages.index("READY=1")
    assert int(extend[0].split("=")[1]) >= 10_000_000


def test_prometheus_metrics(make_daemon: DaemonFactory) -> None:
    port = free_port()
    daemon = make_daemon(metrics={"listen": f"127.0.0.1:{port}"})
    daemon.start(extra_env={"WATCHDOG_USEC": "1000000"})
    daemon.drop("metered.txt", TEXT)
    daemon.wait_done("metered.txt")
    daemon.drop("rejected.txt", "")
    daemon.wait_failed("rejected.txt")

    def scrape() -> str | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = str(reply.read().decode())
        pinged = re.search(r"^cosyvoiced_watchdog_pings_total [1-9]", text, re.MULTILINE)
        # a job is counted at the tick that settles it, just after its record is written
        counted = 'cosyvoiced_jobs_total{outcome="failed",source="inbox"}' in text
        return text if pinged and counted else None

    text = wait_until(scrape, 30, "metrics with a watchdog ping and both jobs counted")
    assert 'cosyvoiced_jobs_total{outcome="done",source="inbox"} 1.0' in text
    assert 'cosyvoiced_jobs_total{outcome="failed",source="inbox"} 1.0' in text
    assert "cosyvoiced_synthesis_seconds_count 1.0" in text
    assert "cosyvoiced_real_time_factor_bucket" in text
    assert "cosyvoiced_first_chunk_seconds_count 1.0" in text
    assert "cosyvoiced_ready 1.0" in text
    rss = re.search(r'^cosyvoiced_worker_rss_bytes\{device="cpu",slot="0"\} (\S+)$', text,
                    re.MULTILINE)
    assert rss is not None
    assert float(rss.group(1)) > 50e6
    assert "cosyvoiced_workers 1.0" in text
    assert 'cosyvoiced_worker_busy{device="cpu",slot="0"} 0.0' in text
    assert "cosyvoiced_recycle_thrash 0.0" in text


def test_a_taken_address_stops_start_up_with_a_clear_line(make_daemon: DaemonFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = make_daemon(zmq={"bind": [f"tcp://127.0.0.1:{port}"]})
        daemon.start(wait_ready=False)
        assert daemon.wait_exit(timeout_s=60) == 1
    failed = daemon.log_events("listen_failed")
    assert failed
    assert "Address already in use" in failed[0]["error"]
