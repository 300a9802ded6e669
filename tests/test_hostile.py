"""Every hostile input of issue 20 against ONE daemon (the real Piper voice, every intake
on), then what an operator must see: the same main pid throughout, /readyz ready, a normal
request served in under twice its idle time, and the whole process tree's memory back
within 100 MiB of where it started once the clients are gone. Each finding also has its own
test that fails without its defence (README, "Reliability"); this one shows they hold
together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import zmq
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart

from cosyvoiced import config
from cosyvoiced.client import Client, DaemonError, Result
from tests.audiofile import read_audio
from tests.daemon import Daemon, free_port, wait_until

# It times a normal client idle and under attack: alone, not beside another test's daemons.
pytestmark = pytest.mark.serial

KEY = "sk-hostile-test-key"
LIMITED_KEY = "sk-hostile-limited-key"  # 2 requests a minute
SLOWLORIS = 200
IDLE_WYOMING = 100
# A normal request, each time another text of the same length: a cache hit would time the
# cache, not the worker.
NORMAL = "The morning {} train arrived a little later than the timetable promised."
COLOURS = ("red", "tan", "sky", "ash", "oak", "jet", "ink", "sea")
RSS_SLACK = 100 << 20
CACHED = " ".join(["A cached answer that a client asks for and never reads."] * 18)
TAGGED = "[x] " + " ".join(["word"] * 400)  # 2,000 characters, no punctuation
OGG_TEXT = " ".join(["The long paragraph goes on for the Ogg encoder to chew on."] * 28)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    keys = tmp_path / "api_keys"
    keys.write_text(f"tester {KEY}\nlimited {LIMITED_KEY}\n")
    # onnxruntime's memory arena as configured by default: it keeps its peak, which the
    # warm-up below reaches (a segment is at most scheduling.max_segment_chars, whatever
    # the text).
    running = Daemon(tmp_path / "d", spool={"max_text_chars": 20_000},
                     cache={"max_bytes": "256MiB"},
                     http={"listen": f"127.0.0.1:{free_port()}", "api_keys_file": str(keys),
                           "header_timeout_s": 2.0, "body_timeout_s": 2.0,
                           "idle_timeout_s": 2.0, "send_timeout_s": 3.0},
                     http__keys__limited={"rate_limit": 2},
                     wyoming={"listen": f"tcp://127.0.0.1:{free_port()}",
                              "idle_timeout_s": 3.0, "read_timeout_s": 2.0},
                     metrics={"listen": f"127.0.0.1:{free_port()}"})
    running.start()
    yield running
    running.stop()


def _rss_by_process(pid: int) -> dict[int, int]:
    """Resident memory of the daemon and of every process under it (workers, encoder)."""
    found, pending = {}, [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    found[current] = int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                pending.extend(int(child) for child in children)
    return found


def _tree_rss(pid: int) -> int:
    return sum(_rss_by_process(pid).values())


def _mib(figures: dict[int, int]) -> dict[int, int]:
    return {pid: rss >> 20 for pid, rss in figures.items()}


def _timed(speak: Callable[[], object]) -> float:
    started = time.perf_counter()
    speak()
    return time.perf_counter() - started


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _post(listen: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(f"http://{listen}/v1/audio/speech", data=body,
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            reply.read()
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _raw(listen: str, data: bytes) -> socket.socket:
    host, port = listen.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(data)
    return sock


def _speech_head(length: int) -> bytes:
    return (b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Length: "
            + str(length).encode() + b"\r\n\r\n")


def _speech_request(text: str) -> bytes:
    body = json.dumps({"model": "tts-1", "voice": "en_US-joe-medium", "input": text,
                       "response_format": "pcm"}).encode()
    return _speech_head(len(body)) + body


async def _wyoming_attacks(host: str, port: int, idle_closed: Callable[[], int]) -> None:
    """Non-readers of a long text, idle connections, a flood of streamed sentences, and a
    `synthesize` without text."""
    clients = [AsyncTcpClient(host, port) for _ in range(18 + IDLE_WYOMING)]
    for client in clients:
        await client.connect()
    closed_before = idle_closed()
    for client in clients[:10]:  # ask for a long text and never read it
        await client.write_event(Synthesize(text=CACHED).event())
    for client in clients[11:17]:  # anonymous flood: every sentence a job
        await client.write_event(SynthesizeStart().event())
        for n in range(16):
            await client.write_event(SynthesizeChunk(text=f"Flood sentence {n}. ").event())
    await clients[17].write_event(Event(type="synthesize", data={}))  # no text
    # The idle ones (10, 18 and on) pass wyoming.idle_timeout_s and are closed.
    deadline = time.monotonic() + 30
    while idle_closed() < closed_before + IDLE_WYOMING + 1:
        assert time.monotonic() < deadline, "idle Wyoming connections are still open"
        await asyncio.sleep(0.1)
    for client in clients:
        await client.disconnect()


def _short_body(listen: str) -> int:
    """A body shorter than its Content-Length: the status it gets."""
    with _raw(listen, _speech_head(1000) + b'{"model": ') as sock:
        sock.settimeout(20)
        return _status(sock)


def _endless_body(listen: str) -> int:
    """A chunked body that never ends: the status it gets."""
    head = _speech_head(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
    with _raw(listen, head) as sock:
        deadline = time.monotonic() + 20
        while not select.select([sock], [], [], 0.1)[0]:
            assert time.monotonic() < deadline, "an endless body got no answer"
            sock.sendall(b"1\r\n \r\n")
        return _status(sock)


def _status(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        more = sock.recv(4096)
        assert more, f"closed without an answer: {head!r}"
        head += more
    return int(head.split()[1])


def _zmq_ogg(endpoint: str) -> Result:
    with Client(endpoint, timeout_s=180) as speaker:
        return speaker.synthesize(OGG_TEXT, format="ogg")


def _zmq_attacks(daemon: Daemon) -> None:
    """A header nested 30,000 deep; another client's job."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with context.socket(zmq.DEALER) as raw:
        raw.connect(daemon.endpoint)
        raw.send(b"[" * 30_000 + b"]" * 30_000)
        assert raw.poll(10_000)
        assert json.loads(raw.recv())["code"] == "bad_request"
    dropped = wait_until(lambda: [e["job"] for e in daemon.log_events("job_queued")
                                  if e["source"] == "inbox"], 30, "the Ogg job queued")[0]
    with Client(daemon.endpoint, timeout_s=30) as stranger:
        for ask in (stranger.cancel, stranger.status):
            with pytest.raises(DaemonError) as refused:
                ask(dropped)
            assert refused.value.code == "not_found"
        assert stranger.stats()["running"] == []


def _http_small_ones(listen: str, metrics: str) -> None:
    authorized = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    speech = {"model": "tts-1", "voice": "en_US-joe-medium"}
    assert _post(listen, json.dumps(speech | {"input": "Null \u0000 here."}).encode(),
                 authorized) == 400
    assert _post(listen, b"[" * 100_000 + b"]" * 100_000, authorized) == 400
    assert _post(listen, json.dumps(speech | {"input": "x", "response_format": {}}).encode(),
                 authorized) == 400
    assert _post(listen, b"{}", {"Expect": "100-continue"}) == 401
    assert _get(f"http://{metrics}/anything") == 404
    # A key over its rate (2 a minute): 429 rate_limit_exceeded, and when to come back.
    with openai.OpenAI(base_url=f"http://{listen}/v1", api_key=LIMITED_KEY, max_retries=0,
                       timeout=60) as limited:
        def speak(text: str) -> bytes:
            return limited.audio.speech.create(model="tts-1", voice="en_US-joe-medium",
                                               input=text, response_format="pcm").content

        assert speak("One.")
        assert speak("Two.")
        with pytest.raises(openai.RateLimitError) as refused:
            speak("Three.")
    assert refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.response.headers["retry-after"]) >= 1


def _assert_ogg(made: Future[Result]) -> None:
    """The ZeroMQ client's Ogg result is the whole text, as audio."""
    result = made.result(timeout=180)
    samples, rate = read_audio(result.audio)
    assert rate == result.sample_rate
    assert len(samples) / rate > len(OGG_TEXT) * 0.03, "shorter than the text"
    assert float((samples ** 2).mean()) ** 0.5 > 0.02, "silence"


def test_one_daemon_survives_every_hostile_input(daemon: Daemon) -> None:
    assert daemon.process is not None
    pid = daemon.process.pid
    settings = config.load(daemon.config_path)
    listen, metrics = settings.http.listen, settings.metrics.listen
    wy_host, wy_port = settings.wyoming.listen.rsplit("/", 1)[1].split(":")
    client = openai.OpenAI(base_url=f"http://{listen}/v1", api_key=KEY, max_retries=0,
                           timeout=120)

    colours = iter(COLOURS)

    def normal() -> bytes:
        return client.audio.speech.create(model="tts-1", voice="en_US-joe-medium",
                                          input=NORMAL.format(next(colours)),
                                          response_format="pcm").content

    normal()
    client.audio.speech.create(model="tts-1", voice="en_US-joe-medium", input=CACHED,
                               response_format="pcm")  # into the cache
    # The engine's steady state: its arena grows to the longest segment it has made, and a
    # segment is at most scheduling.max_segment_chars (300), whatever the text.
    client.audio.speech.create(model="tts-1", voice="en_US-joe-medium",
                               input=" ".join(["plain"] * 120), response_format="pcm")
    idle_s = statistics.median(_timed(normal) for _ in range(3))
    before = _mib(_rss_by_process(pid))
    baseline = _tree_rss(pid)

    with ThreadPoolExecutor(max_workers=3) as background:
        # -- the drop folder and ZeroMQ: long Ogg results (they killed the supervisor with
        #    SIGSEGV)
        daemon.drop_job("long-ogg", text=OGG_TEXT, format="ogg")
        zmq_ogg = background.submit(_zmq_ogg, daemon.endpoint)
        _zmq_attacks(daemon)
        # -- HTTP: bodies that never end, the small ones, a key over its rate; 20 non-readers
        #    of a cached result, slowloris and idle connections
        bodies = [background.submit(_short_body, listen),
                  background.submit(_endless_body, listen)]
        _http_small_ones(listen, metrics)
        # A tagged, unpunctuated text (it was made in one call: gigabytes in the worker).
        client.audio.speech.create(model="tts-1", voice="en_US-joe-medium", input=TAGGED,
                                   response_format="pcm")
        held = [_raw(listen, _speech_request(CACHED)) for _ in range(20)]
        held += [_raw(listen, b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\n")
                 for _ in range(SLOWLORIS)]
        held += [_raw(listen, b"") for _ in range(50)]
        # -- Wyoming: non-readers, a flood, idle connections, a bad event
        asyncio.run(_wyoming_attacks(wy_host, int(wy_port),
                                     lambda: len(daemon.log_events("wyoming_idle_closed"))))
        for sock in held:
            sock.close()
        assert [body.result(timeout=30) for body in bodies] == [408, 408]
        _assert_ogg(zmq_ogg)

    # What the operator sees afterwards.
    record = daemon.wait_done("long-ogg.json", timeout_s=180)
    assert record["format"] == "ogg"
    tagged = wait_until(lambda: [e for e in daemon.log_events("job")
                                 if e.get("chars") == len(TAGGED)], 120, "the tagged job")
    assert tagged[0]["segments"] > 5
    assert daemon.process.poll() is None
    assert daemon.process.pid == pid
    assert _get(f"http://{listen}/readyz") == 200
    wait_until(lambda: _tree_rss(pid) < baseline + RSS_SLACK, 60,
               f"memory back within 100 MiB of {baseline >> 20} MiB "
               f"({before} before, now {_mib(_rss_by_process(pid))})")
    busy_s = statistics.median(_timed(normal) for _ in range(3))
    assert busy_s < 2 * idle_s, f"a normal request took {busy_s:.2f} s (idle: {idle_s:.2f} s)"
