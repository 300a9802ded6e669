"""The web console, driven in a real headless Chromium (Debian's `chromium`, through
Playwright pointed at it; `make browser` installs it). Each test starts the real daemon with
the HTTP listener and talks to it only through the page (and the drop folder, for jobs
from elsewhere). Screenshots of each view go to $COSYVOICED_SCREENSHOTS (`make test` sets
it), else to the test's temp directory."""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import shutil
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from playwright.sync_api import Browser, Locator, Page, sync_playwright

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port, wait_until
from tests.redisserver import RedisServer, redis_server_fixture  # noqa: F401

CHROMIUM = ("chromium", "chromium-browser")  # Debian's, then Ubuntu's name
SCREENSHOTS_ENV = "COSYVOICED_SCREENSHOTS"
TONE = "tests.engines.faulty:load"
CLONING = "tests.engines.faulty:cloning"
PCM_RATE = 24000
WAIT_MS = 30_000
ADMIN_KEY, APP_KEY = "sk-console-admin-01", "sk-console-app-02"
# One segment per sentence, so a job's progress moves sentence by sentence.
SEGMENTS = {"pack_segment_chars": 0, "first_segment_words": 0}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = next(filter(None, map(shutil.which, CHROMIUM)), None)
    if executable is None:
        pytest.skip("no Chromium here: `make browser` installs Debian's chromium (as root)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable,
            # expose-gc: a test sees what the page lets go (window.gc)
            args=["--autoplay-policy=no-user-gesture-required", "--js-flags=--expose-gc"])
        yield launched
        launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _listen(daemon: Daemon) -> str:
    text = daemon.config_path.read_text()
    return text.split('listen = "', 1)[1].split('"', 1)[0]


def _daemon(make_daemon: DaemonFactory, name: str = "d", **sections: dict[str, Any]) -> Daemon:
    http = {"listen": f"127.0.0.1:{free_port()}"} | sections.pop("http", {})
    engine = sections.pop("engine", {"name": TONE})
    daemon = make_daemon(name, engine=engine, http=http, scheduling=SEGMENTS, **sections)
    daemon.start()
    return daemon


# Script errors and refusals (a CSP violation included) of each page, by page.
PAGE_ERRORS: dict[int, list[str]] = {}


def _open(browser: Browser, daemon: Daemon, width: int = 1100, bypass_csp: bool = True) -> Page:
    """The console in a fresh page. The test's own waits evaluate strings, which the page's
    Content-Security-Policy forbids: they bypass it, except where a test checks it."""
    page = browser.new_page(viewport={"width": width, "height": 900}, bypass_csp=bypass_csp)
    errors = PAGE_ERRORS.setdefault(id(page), [])
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text)
            if message.type == "error" and "401" not in message.text else None)
    page.goto(f"http://{_listen(daemon)}/")
    return page


def _live(page: Page) -> None:
    page.wait_for_function("document.getElementById('status').textContent.startsWith('live ·')",
                           timeout=WAIT_MS)


def _tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _shot(page: Page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    assert not PAGE_ERRORS.get(id(page)), PAGE_ERRORS[id(page)]


def _row(page: Page, table: str, job: str) -> Locator:
    return page.locator(f"#{table} tbody tr[data-id='{job}']")


def _job_line(daemon: Daemon, job: str) -> dict[str, Any]:
    lines: list[dict[str, Any]] = wait_until(
        lambda: [e for e in daemon.log_events("job") if e.get("job") == job], 10,
        f"the summary line of {job}")
    return lines[0]


def _post(daemon: Daemon, path: str, body: dict[str, Any], key: str = "") -> int:
    request = urllib.request.Request(
        f"http://{_listen(daemon)}/{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"} |
        ({"Authorization": f"Bearer {key}"} if key else {}))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_speak_plays_the_audio_the_daemon_made(make_daemon: DaemonFactory, browser: Browser,
                                              shots: Path) -> None:
    daemon = _daemon(make_daemon)
    page = _open(browser, daemon)
    _live(page)
    # Without keys there is no key to give, and nothing to download yet.
    assert not page.get_by_role("button", name="API key", exact=True).is_visible()
    assert not page.locator("#speak-download").is_visible()
    page.get_by_label("Text", exact=True).fill("Hello from the console. It speaks as it goes.")
    page.get_by_role("button", name="Speak", exact=True).click()
    result = page.locator("#speak-result[data-samples]")
    result.wait_for(timeout=WAIT_MS)
    job = result.get_attribute("data-job")
    samples = int(result.get_attribute("data-samples") or 0)
    assert job, "the page names the daemon's job"
    record = _job_line(daemon, job)
    # Web Audio got every sample the daemon made for the job (its record rounds to 1 ms).
    assert samples / PCM_RATE == pytest.approx(record["audio_s"], abs=0.001), (samples, record)
    assert float(result.get_attribute("data-rms") or 0) > 0.05  # a tone, not silence
    assert int(result.get_attribute("data-scheduled") or 0) == samples
    assert "first audio after" in (result.text_content() or "")
    assert page.locator("#speak-download").is_visible()
    _shot(page, shots, "speak")


def _fetched(page: Page, url: str) -> bool:
    return bool(page.evaluate("url => fetch(url).then(() => true, () => false)", url))


def test_each_result_lets_the_audio_before_it_go(make_daemon: DaemonFactory,
                                                 browser: Browser) -> None:
    """Every result's audio was held by an object URL never revoked (two for a WAV): a
    page that spoke all day kept all of it."""
    daemon = _daemon(make_daemon)
    page = _open(browser, daemon)
    _live(page)
    page.get_by_label("Text", exact=True).fill("Hello there.")
    urls: list[str] = []
    for audio_format in ("pcm", "wav", "wav"):
        page.select_option("#speak-format", audio_format)
        page.get_by_role("button", name="Speak", exact=True).click()
        page.wait_for_function("""before => {
            const result = document.getElementById('speak-result');
            return result.textContent.startsWith('Job ') &&
                document.getElementById('speak-download').href !== before;
        }""", arg=urls[-1] if urls else "", timeout=WAIT_MS)
        urls.append(page.locator("#speak-download").get_attribute("href") or "")
        assert page.locator("#speak-audio").get_attribute("src") in (None, urls[-1])
    assert [_fetched(page, url) for url in urls] == [False, False, True]


# Boards as a page open for days is sent them: three jobs in hand, the last 50 ended.
FEED_BOARDS = """async count => {
  const { showBoard } = await import("./console/static/board.js");
  const held = [];
  const ended = [];
  for (let n = 0; n < count; n++) {
    const jobs = [0, 1, 2].map(k => ({id: `fed-${3 * n + k}`, source: "http", voice: "tone",
        state: "running", chars: 12, segments_done: 1, segments: 3, audio_s: 1.5,
        received_at: 1e9, served_by: "tts1", worker: 0, cancelling: false}));
    if (n < 100) held.push(...jobs.map(job => new WeakRef(job)));
    ended.unshift(...jobs.map(job => ({id: job.id, state: "done", source: "http"})));
    ended.length = Math.min(ended.length, 50);
    showBoard({engine: "tone", ready: true, stopping: false, voices: [], jobs, ended: [...ended],
               counts: {}, workers: [], cache: null, cluster: null, hosts: null}, true);
  }
  for (let round = 0; round < 5; round++) {  // a WeakRef holds its target within the task
    await new Promise(resolve => setTimeout(resolve, 50));
    gc();
  }
  return held.filter(ref => ref.deref() !== undefined).length;
}"""


def test_the_board_forgets_the_jobs_it_no_longer_shows(make_daemon: DaemonFactory,
                                                       browser: Browser) -> None:
    """board.js kept every job it was ever shown (200,000 boards: +52 MiB, about 270 B a
    job, for tables of 53 rows). Of the first 100 boards' 300 jobs, long gone from its
    tables, the page now keeps none (but what a garbage collection may leave: a few, where
    the old page kept all 300)."""
    daemon = _daemon(make_daemon)
    page = _open(browser, daemon)
    _live(page)
    kept = page.evaluate(FEED_BOARDS, 2000)
    assert kept < 30, f"{kept} of 300 jobs no longer shown are still held"


def _register(page: Page, name: str, prompt: Path, transcript: str) -> None:
    """Fill in and send the Clone view's form, once the page is live."""
    _live(page)
    _tab(page, "Clone")
    page.get_by_label("Voice name").fill(name)
    page.get_by_label("Audio, 3 to 30 s of one speaker").set_input_files(str(prompt))
    page.get_by_label("What is said in the audio").fill(transcript)
    page.get_by_role("button", name="Register the voice").click()


def test_clone_by_upload_registers_a_voice_that_then_speaks(
        make_daemon: DaemonFactory, browser: Browser, shots: Path, tmp_path: Path) -> None:
    daemon = _daemon(make_daemon, engine={"name": CLONING},
                     engine__cosyvoice={"speakers_file": str(tmp_path / "speakers.json")})
    prompt = tmp_path / "alice.wav"
    prompt_s = 3.0
    t = np.arange(int(prompt_s * 16000), dtype=np.float32) / 16000
    soundfile.write(prompt, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    page = _open(browser, daemon)
    _register(page, "alice", prompt, "A steady hum, for three seconds.")
    page.locator("#clone-result.ok").wait_for(timeout=WAIT_MS)
    page.locator("#clone-voices li", has_text="alice").wait_for(timeout=WAIT_MS)
    _shot(page, shots, "clone")
    # The new voice is in the Speak list, and speaks: its text's tone, then its voice's.
    _tab(page, "Speak")
    page.get_by_label("Voice", exact=True).select_option("alice")
    text = "Alice speaks now."
    page.get_by_label("Text", exact=True).fill(text)
    page.get_by_role("button", name="Speak", exact=True).click()
    result = page.locator("#speak-result[data-samples]")
    result.wait_for(timeout=WAIT_MS)
    record = _job_line(daemon, result.get_attribute("data-job") or "")
    assert record["voice"] == "alice"
    seconds = int(result.get_attribute("data-samples") or 0) / PCM_RATE
    assert seconds == pytest.approx(len(text) * 0.05 + prompt_s, abs=0.05)


def test_an_engine_that_cannot_clone_says_so_in_the_page(
        make_daemon: DaemonFactory, browser: Browser, tmp_path: Path) -> None:
    daemon = _daemon(make_daemon)
    prompt = tmp_path / "bob.wav"
    soundfile.write(prompt, np.zeros(3 * 16000, dtype=np.float32), 16000)
    page = _open(browser, daemon)
    _register(page, "bob", prompt, "Nothing at all.")
    error = page.locator("#clone-result.error")
    error.wait_for(timeout=WAIT_MS)
    assert (error.text_content() or "").startswith("not_supported: ")


def test_a_drop_folder_job_moves_ends_and_has_its_log_lines_and_cancel_works(
        make_daemon: DaemonFactory, browser: Browser, shots: Path) -> None:
    daemon = _daemon(make_daemon)
    page = _open(browser, daemon)
    _live(page)
    _tab(page, "Jobs")
    daemon.drop("slow.txt", " ".join(f"{n} SLOW@0.6 now." for n in ("One", "Two", "Three",
                                                                     "Four")))
    row = page.locator("#jobs-table tbody tr").first
    row.wait_for(timeout=WAIT_MS)
    job = row.get_attribute("data-id") or ""
    assert row.locator("td").nth(1).text_content() == "inbox"
    # Its progress moves while it runs: pushed to the page, segment by segment.
    page.wait_for_function(
        f"document.querySelector(\"#jobs-table tr[data-id='{job}'] progress\")?.value >= 1",
        timeout=WAIT_MS)
    assert "/4 segments" in (row.locator("td").nth(3).text_content() or "")
    _shot(page, shots, "jobs")
    ended = _row(page, "ended-table", job)
    ended.wait_for(timeout=WAIT_MS)
    assert ended.locator("td").nth(3).text_content() == "done"
    assert daemon.wait_done("slow.txt")["job"] == job
    assert _row(page, "jobs-table", job).count() == 0

    # Its row links to its lines in the log tail.
    ended.get_by_role("button", name=f"Show the log lines of job {job}").click()
    assert page.locator("#logs").is_visible()
    page.get_by_label("Level at least").select_option("debug")
    lines = page.locator(f"#log-lines li[data-job='{job}']")
    wait_until(lambda: lines.count() >= 2, 10, "the job's log lines")
    assert page.locator("#log-lines li").count() == lines.count()  # the filter holds
    assert any("job" in (text or "").split()[2:3] and "outcome=done" in (text or "")
               for text in lines.all_text_contents())
    _shot(page, shots, "logs")

    # Cancel: a job in progress ends as cancelled, in the page and in failed/.
    _tab(page, "Jobs")
    daemon.drop("doomed.txt", " ".join(f"Part {n} SLOW@0.6 now." for n in range(8)))
    doomed = page.locator("#jobs-table tbody tr").first
    doomed.wait_for(timeout=WAIT_MS)
    doomed_id = doomed.get_attribute("data-id") or ""
    doomed.get_by_role("button", name=f"Cancel job {doomed_id}").click()
    gone = _row(page, "ended-table", doomed_id)
    gone.wait_for(timeout=WAIT_MS)
    assert gone.locator("td").nth(3).text_content() == "cancelled"
    assert daemon.wait_failed("doomed.txt")["code"] == "cancelled"
    assert any(e.get("action") == "cancel" and e.get("job") == doomed_id
               for e in daemon.log_events("console_action"))


def test_the_recycle_button_replaces_the_worker_and_loses_no_job(
        make_daemon: DaemonFactory, browser: Browser, shots: Path) -> None:
    daemon = _daemon(make_daemon)
    page = _open(browser, daemon)
    _live(page)
    _tab(page, "Workers")
    card = page.locator("#worker-list article[data-slot='0']")
    card.wait_for(timeout=WAIT_MS)
    page.wait_for_function("document.querySelector(\"#worker-list article[data-slot='0']\")"
                           "?.dataset.state === 'idle'", timeout=WAIT_MS)
    before = card.get_attribute("data-pid")
    assert not page.locator("#hosts").is_visible()  # no cluster: no hosts
    _shot(page, shots, "workers")
    text = " ".join(f"Part {n} SLOW@0.4 now." for n in range(5))
    daemon.drop("busy.txt", text)
    page.wait_for_function("document.querySelector(\"#worker-list article[data-slot='0']\")"
                           "?.dataset.state === 'busy'", timeout=WAIT_MS)
    page.get_by_role("button", name="Recycle worker 0").click()
    page.wait_for_function(
        f"(() => {{ const card = document.querySelector(\"#worker-list article[data-slot='0']\");"
        f" return card && card.dataset.pid !== '{before}'; }})()", timeout=WAIT_MS)
    assert "Last recycle: console" in (page.locator("#worker-list article[data-slot='0']")
                                       .text_content() or "")
    # The job in hand went on with the new worker: all of its audio, nothing failed.
    record = daemon.wait_done("busy.txt")
    samples, rate = soundfile.read(daemon.outbox / "busy.wav", dtype="float32")
    assert len(samples) / rate == pytest.approx(record["audio_s"], abs=0.01)
    # The tone engine: 50 ms a character, every sentence of the five made once.
    assert record["audio_s"] == pytest.approx(5 * len("Part 0 SLOW@0.4 now.") * 0.05, abs=0.05)
    assert float(np.sqrt(np.mean(samples**2))) > 0.05
    assert not list(daemon.failed.glob("*.error.json"))
    recycles = [e for e in daemon.log_events("worker_recycle") if e.get("reason") == "console"]
    assert len(recycles) == 1
    assert [e["key"] for e in daemon.log_events("console_action")] == ["console"]


def test_with_keys_the_page_asks_for_one_and_actions_need_an_admin_key(
        make_daemon: DaemonFactory, browser: Browser, shots: Path, tmp_path: Path) -> None:
    keys = tmp_path / "api_keys"
    keys.write_text(f"ops {ADMIN_KEY}\napp {APP_KEY}\n")
    daemon = _daemon(make_daemon, http={"api_keys_file": str(keys)},
                     http__keys__ops={"admin": True})
    page = _open(browser, daemon)
    form = page.locator("#key-form")
    form.wait_for(timeout=WAIT_MS)
    _shot(page, shots, "key")
    # Without a key, every action is refused; a plain key may not act on the daemon.
    for path, body in (("console/recycle", {"slot": 0}), ("console/reload", {})):
        assert _post(daemon, path, body) == 401
        assert _post(daemon, path, body, APP_KEY) == 403
    assert not daemon.log_events("worker_recycle")
    page.get_by_role("textbox", name="API key").fill(APP_KEY)
    page.get_by_role("button", name="Use this key").click()
    _live(page)
    _tab(page, "Workers")
    recycle = page.get_by_role("button", name="Recycle worker 0")
    recycle.wait_for(timeout=WAIT_MS)
    assert recycle.is_disabled()
    # An admin key acts, and the action is logged with the key's name.
    page.get_by_role("button", name="API key", exact=True).click()
    page.get_by_role("textbox", name="API key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Use this key").click()
    _live(page)
    page.wait_for_function("!document.getElementById('reload-config').disabled",
                           timeout=WAIT_MS)
    page.get_by_role("button", name="Reload config").click()
    wait_until(lambda: daemon.log_events("config_reloaded") or
               daemon.log_events("reload_unchanged") or
               [e for e in daemon.log_events() if e["event"].startswith("reload")], 10,
               "the reload")
    assert [(e["action"], e["key"]) for e in daemon.log_events("console_action")] == \
        [("reload", "ops")]


def test_the_page_fits_a_phone_and_works_behind_a_proxy_sub_path(
        make_daemon: DaemonFactory, browser: Browser, shots: Path) -> None:
    daemon = _daemon(make_daemon)
    page = _open(browser, daemon, width=360, bypass_csp=False)
    page.locator("#status", has_text="live ·").wait_for(timeout=WAIT_MS)
    for name in ("Speak", "Clone", "Jobs", "Workers", "Logs"):
        _tab(page, name)
        overflow = page.evaluate("document.documentElement.scrollWidth")
        assert overflow <= 360, f"{name}: {overflow} px wide at 360"
        _shot(page, shots, f"narrow-{name.lower()}")
    # Every request the page makes is relative: nothing absolute for a proxy to break.
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.reload()
    page.locator("#status", has_text="live ·").wait_for(timeout=WAIT_MS)
    base = f"http://{_listen(daemon)}/"
    assert urls
    assert all(url.startswith(base) for url in urls)
    sources = page.evaluate("[...document.querySelectorAll('script[src], link[href]')]"
                            ".map(e => e.getAttribute('src') || e.getAttribute('href'))")
    assert all(not s.startswith(("/", "http")) for s in sources), sources


def test_the_workers_view_lists_the_cluster_s_hosts(
        make_daemon: DaemonFactory, browser: Browser, shots: Path,
        redis_server: RedisServer) -> None:
    cluster = {"redis": redis_server.url, "claim_idle_s": 3.0}
    a = _daemon(make_daemon, "a", cluster=cluster | {"name": "a"})
    b = _daemon(make_daemon, "b", cluster=cluster | {"name": "b"})
    page = _open(browser, a)
    _live(page)
    _tab(page, "Workers")
    hosts = page.get_by_role("table", name="Hosts in the cluster, this one first")
    for name in ("a", "b"):  # b's entry says ready within a few seconds of b's start
        hosts.locator(f"tbody tr[data-id='{name}'][data-alive='true']",
                      has_text="ready").wait_for(timeout=WAIT_MS)
    rows = hosts.locator("tbody tr")
    assert rows.count() == 2
    # This host first, and marked; each row headed by its host's name, with its figures.
    assert rows.nth(0).get_attribute("data-me") == "true"
    assert rows.nth(0).get_by_role("rowheader").text_content() == "a"
    assert rows.nth(0).locator("td").nth(0).text_content() == "ready (this host)"
    other = rows.nth(1).locator("td")
    assert rows.nth(1).get_by_role("rowheader").text_content() == "b"
    assert (other.nth(0).text_content() or "").startswith("ready, seen ")
    assert other.nth(1).text_content() == "faulty"  # the engine, as the daemon names it
    assert other.nth(2).text_content() == "1 (1 free)"
    _shot(page, shots, "workers-cluster")
    page.set_viewport_size({"width": 360, "height": 900})
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    _shot(page, shots, "narrow-workers-cluster")
    # A host that stops says so, and the console of the other shows it.
    b.signal(signal.SIGTERM)
    assert b.wait_exit() == 0
    stopped = hosts.locator("tbody tr[data-id='b'][data-alive='false']")
    stopped.wait_for(timeout=WAIT_MS)
    assert (stopped.locator("td").nth(0).text_content() or "").startswith("stopped, ")


def _get(daemon: Daemon, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{_listen(daemon)}/{path}", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_the_console_serves_only_its_own_files_and_can_be_turned_off(
        make_daemon: DaemonFactory) -> None:
    daemon = _daemon(make_daemon)
    assert _get(daemon, "console/static/app.js") == 200
    for path in ("console/static/..%2F..%2Fconfig.py", "console/static/.hidden.js",
                 "console/static/index.html", "console/static/missing.js"):
        assert _get(daemon, path) == 404, path
    off = _daemon(make_daemon, "off", http={"console": False})
    assert _get(off, "") == 404
    assert _get(off, "console/events") == 404
    assert _get(off, "healthz") == 200


def _lan_address() -> str:
    """This host's address on its network (no packet is sent: a UDP socket's route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
        except OSError:
            pytest.skip("this host has no IPv4 route off loopback")
        address = str(probe.getsockname()[0])
    if ipaddress.ip_address(address).is_loopback:
        pytest.skip("this host has no IPv4 address off loopback")
    return address


def _ask(url: str, data: bytes | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read())


def test_without_keys_only_loopback_is_the_operator(make_daemon: DaemonFactory) -> None:
    """http.allow_insecure opens a listener without keys to the network; its console gave
    every host there the operator's rights: the log tail, recycling workers, reloading."""
    address = _lan_address()
    port = free_port()
    _daemon(make_daemon, http={"listen": f"0.0.0.0:{port}", "allow_insecure": True})
    for host, operator in (("127.0.0.1", True), (address, False)):
        status, session = _ask(f"http://{host}:{port}/console/session")
        assert status == 200
        assert (session["view"], session["logs"], session["act"]) == \
            (True, operator, operator), host
    status, refused = _ask(f"http://{address}:{port}/console/reload", b"{}")
    assert (status, refused["error"]["code"]) == (403, "forbidden")


# A page of another site, on the operator's machine: what any page may send without a key.
ATTACKER_PAGE = """<!doctype html><script>
async function attack(daemon) {
  for (const [path, body] of [["console/recycle", '{"slot": 0}'], ["console/reload", "{}"],
      ["v1/audio/speech", '{"model": "tts-1", "voice": "tone", "input": "Hello there."}']]) {
    try { await fetch(`http://${daemon}/${path}`, {method: "POST", mode: "no-cors", body}); }
    catch (error) {}
  }
  return await new Promise(resolve => {
    const socket = new WebSocket(`ws://${daemon}/v1/text-to-speech/tone/multi-stream-input`);
    socket.onopen = () => socket.send('{"text": "Hello there. ", "flush": true}');
    socket.onmessage = event => resolve("heard " + event.data.slice(0, 40));
    socket.onerror = () => resolve("refused");
  });
}
// A GET of a frame or an image names no Origin: only Sec-Fetch-Site tells it is this page's.
function frame(url, count) {
  for (let n = 0; n < count; n++) {
    const tag = document.createElement(n % 2 ? "img" : "iframe");
    tag.src = url;
    document.body.append(tag);
  }
}
</script>"""


@pytest.fixture
def attacker_site() -> Iterator[str]:
    """Another origin on loopback (another port), serving ATTACKER_PAGE."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = ATTACKER_PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_without_keys_a_page_of_another_site_cannot_act(
        make_daemon: DaemonFactory, browser: Browser, attacker_site: str) -> None:
    """Without keys, a loopback peer is the operator, and a browser on the operator's
    machine is one: any page could recycle workers, reload, queue speech and hear a voice
    (a text/plain fetch needs no preflight; a WebSocket ignores the same-origin rule)."""
    daemon = _daemon(make_daemon)
    page = browser.new_page()
    page.goto(attacker_site)
    assert page.evaluate("attack", _listen(daemon)) == "refused"
    refused = wait_until(lambda: daemon.log_events("http_requests_refused"), 10,
                         "the refusals' log line")
    assert refused[0]["code"] == "cross_origin", refused
    assert not daemon.log_events("console_action")
    assert not daemon.log_events("job")
    # The console's own page, same origin, still acts.
    own = _open(browser, daemon)
    _live(own)
    assert own.evaluate("""fetch("console/reload", {method: "POST", body: "{}"})
                           .then(response => response.status)""") == 200


def test_without_keys_frames_of_another_site_cannot_hold_the_console_s_streams(
        make_daemon: DaemonFactory, browser: Browser, attacker_site: str) -> None:
    """A browser sends no Origin on a frame's or an image's GET: four of another site's
    iframes of console/events took all 4 of the loopback host's streams (200), and the
    operator's own page was refused 429 too_many_streams for 20 s and more."""
    daemon = _daemon(make_daemon)
    attacker = browser.new_page()
    attacker.goto(attacker_site)
    attacker.evaluate("url => frame(url, 8)", f"http://{_listen(daemon)}/console/events")

    def seen() -> list[dict[str, Any]]:  # refused as another site's, or (before) 5 to 8 of 8
        return [e for e in daemon.log_events("http_requests_refused")
                if e.get("path") == "/console/events"] + \
            daemon.log_events("console_streams_refused")

    wait_until(seen, 10, "the frames' requests to be answered")
    own = _open(browser, daemon)
    _live(own)
    assert not daemon.log_events("console_streams_refused")
    assert [e["code"] for e in seen()] == ["cross_origin"]
    attacker.close()


def _status_of(url: str, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), ""
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read())["error"]["code"]


def test_without_keys_a_rebound_name_or_a_proxy_is_refused(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """A DNS rebinding makes a foreign site's page same-origin with the daemon (its name now
    points at 127.0.0.1), and a proxy on the host makes every client a loopback peer."""
    daemon = _daemon(make_daemon, http={"allowed_hosts": ["tts.lan"]})
    listen = _listen(daemon)
    port = listen.rsplit(":", 1)[1]
    session = f"http://{listen}/console/session"
    assert _status_of(session, {"Host": f"rebind.evil.example:{port}"}) == \
        (403, "host_not_allowed")
    assert _status_of(session, {"Host": f"tts.lan:{port}"}) == (200, "")
    assert _status_of(session, {"Host": f"localhost:{port}"}) == (200, "")
    assert _status_of(session, {"X-Forwarded-For": "203.0.113.5"}) == \
        (403, "proxied_without_keys")
    assert _status_of(session, {"Origin": "http://evil.example"}) == (403, "cross_origin")
    # With keys nothing is taken for where it comes from: a web app of another site that
    # holds a key may call the API.
    keys = tmp_path / "api_keys"
    keys.write_text(f"app {APP_KEY}\n")
    keyed = _daemon(make_daemon, "keyed", http={"api_keys_file": str(keys)})
    models = f"http://{_listen(keyed)}/v1/models"
    foreign = {"Origin": "http://app.example", "Host": "tts.example",
               "X-Forwarded-For": "203.0.113.5"}
    assert _status_of(models, foreign | {"Authorization": f"Bearer {APP_KEY}"}) == (200, "")
    assert _status_of(models, foreign) == (401, "invalid_api_key")


def _first_board(daemon: Daemon, key: str, condition: Any) -> dict[str, Any]:
    """The first board this key's event stream sends for which `condition` holds."""
    request = urllib.request.Request(f"http://{_listen(daemon)}/console/events",
                                     headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as stream:
        event = ""
        for line in stream:
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                event = text.removeprefix("event: ")
            elif text.startswith("data: ") and event == "board":
                board: dict[str, Any] = json.loads(text.removeprefix("data: "))
                if condition(board):
                    return board
    raise AssertionError("the event stream ended")


def test_a_key_sees_only_its_own_job_ids_on_the_workers_too(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """The jobs table showed a key its own jobs only, but each worker's card named every
    job in its hands: any key (and any anonymous viewer) saw the others' job ids."""
    keys = tmp_path / "api_keys"
    keys.write_text(f"app {APP_KEY}\nother sk-console-other-03\n")
    daemon = _daemon(make_daemon, http={"api_keys_file": str(keys)})
    body = json.dumps({"model": "tts-1", "voice": "tone", "input": "Slow to say SLOW@8 here."})
    request = urllib.request.Request(
        f"http://{_listen(daemon)}/v1/audio/speech", data=body.encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {APP_KEY}"})
    speaking = threading.Thread(target=lambda: urllib.request.urlopen(request, timeout=60).read(),
                                daemon=True)
    speaking.start()

    def held(board: dict[str, Any]) -> bool:
        return any(worker.get("jobs") for worker in board["workers"])

    mine = _first_board(daemon, APP_KEY, held)
    [job] = [row["id"] for row in mine["jobs"]]
    assert [w["jobs"] for w in mine["workers"] if w["jobs"]] == [[job]]
    theirs = _first_board(daemon, "sk-console-other-03", held)
    assert not theirs["jobs"]
    assert [w["jobs"] for w in theirs["workers"] if w["jobs"]] == [["(another client's)"]]
    assert job not in json.dumps(theirs)
    speaking.join(60)
