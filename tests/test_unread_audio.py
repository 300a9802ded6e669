"""The per-client bound on audio made and not read yet (intake/reply.py, 64 MiB): a client
that asks for long results and reads none of them is cut off at the bound (`client_too_slow`
in the log, the reply that passes it ended there and its job cancelled), what it has under
the bound stays whole, and another client is served as usual.

The tone engine makes about 50 ms of audio per character: 10,600 characters are 520 s,
50 MB of float32 at 24 kHz (the rate of OpenAI's `pcm`), so one such result is under
64 MiB (and over the cache's entry cap: each is made afresh). HTTP asks for such
results, each made whole before the next, until the bound is passed: what the kernel's
socket buffers hold is not unread for the daemon, and their size depends on the machine.
Wyoming's client is its connection, which asks one thing at a time, so it asks for one
result far over the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from wyoming.audio import AudioChunk, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize

from cosyvoiced import config
from cosyvoiced.intake.reply import MAX_BUFFERED_BYTES
from tests.daemon import Daemon, free_port, wait_until
from tests.engines.faulty import SAMPLE_RATE, SECONDS_PER_CHAR

KEYS = {"greedy": "sk-greedy-0123456789", "polite": "sk-polite-0123456789",
        "hoarder": "sk-hoarder-0123456789"}
TONE = "tone"
LONG = " ".join(["The tone goes on and on, sentence after sentence, for a good while yet."]
                * 146)
# 256 s: a cache entry (under its cap of 12 MiB, 16-bit), 25 MB unread as float32 at 24 kHz
CACHED = " ".join(["The tone goes on and on, sentence after sentence, for a good while yet."]
                  * 70)
OVER_THE_BOUND = " ".join([LONG] * 3)  # one Wyoming result of 1,560 s: 138 MB at 22,050 Hz
# What the kernel's socket buffers (4 MiB each way on loopback here, 16-bit audio) and
# asyncio's may take from a client that does not read: not unread for the daemon.
IN_SOCKETS = 32 << 20
MAX_NON_READERS = 8
SHORT = "A short answer for a client who reads."
OPENAI_PCM_RATE = 24_000
WAIT_S = 60.0


def _float32_bytes(text: str) -> int:
    return int(len(text) * SECONDS_PER_CHAR * SAMPLE_RATE) * 4


def test_the_texts_straddle_the_bound() -> None:
    assert _float32_bytes(OVER_THE_BOUND) - IN_SOCKETS > MAX_BUFFERED_BYTES


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("unread")
    keys = root / "api_keys"
    keys.write_text("".join(f"{name} {token}\n" for name, token in KEYS.items()))
    running = Daemon(root, engine={"name": "tests.engines.faulty:load"},
                     cache={"max_bytes": "512MiB"}, spool={"max_text_chars": 35_000},
                     # The send timeout far beyond the test: the bound, not it, cuts.
                     http={"listen": f"127.0.0.1:{free_port()}", "api_keys_file": str(keys),
                           "send_timeout_s": 120.0},
                     wyoming={"listen": f"tcp://127.0.0.1:{free_port()}",
                              "idle_timeout_s": 120.0})
    running.start()
    yield running
    running.stop()


def _http(daemon: Daemon) -> tuple[str, int]:
    host, port = config.load(daemon.config_path).http.listen.rsplit(":", 1)
    return host, int(port)


def _openai(daemon: Daemon, key: str) -> openai.OpenAI:
    host, port = _http(daemon)
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=KEYS[key],
                         max_retries=0, timeout=WAIT_S)


def _speak(daemon: Daemon, key: str, text: str) -> bytes:
    with _openai(daemon, key) as client:
        return client.audio.speech.create(model="tts-1", voice=TONE, input=text,
                                          response_format="pcm").content


def _audio_s(pcm: bytes) -> float:
    return len(pcm) / 2 / OPENAI_PCM_RATE


def _never_read(daemon: Daemon, key: str, text: str) -> socket.socket:
    """A request whose answer is not read (a small receive window: it backs up soon)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(_http(daemon))
    body = json.dumps({"model": "tts-1", "voice": TONE, "input": text,
                       "response_format": "pcm"}).encode()
    sock.sendall(f"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\n"
                 f"Authorization: Bearer {KEYS[key]}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _events(daemon: Daemon, name: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events(name) if all(e.get(k) == v for k, v in match.items())]


def test_an_http_client_that_reads_nothing_is_cut_at_the_bound(daemon: Daemon) -> None:
    whole = _speak(daemon, "greedy", LONG)  # a client that reads: served whole
    assert 2 * len(whole) < MAX_BUFFERED_BYTES  # float32, as the daemon holds 16-bit PCM
    with contextlib.ExitStack() as held:
        # 50 MB unread a time, until the bound is passed: the reply that passes it is
        # ended there, and one asked at the bound is refused before its first byte.
        unread: list[http.client.HTTPResponse] = []
        while not _events(daemon, "client_too_slow"):
            assert len(unread) < MAX_NON_READERS, "never cut"
            unread.append(_unread_reply(held, daemon, "greedy", LONG))
            _made_or_cut(daemon, unread[-1].headers["x-cosyvoiced-job"])
        cuts = {e["job"] for e in _events(daemon, "client_too_slow")}
        # Cut once, it is refused until it reads what it has.
        refused = _unread_reply(held, daemon, "greedy", SHORT)
        assert _outcome(refused, cuts, b"") == "busy"
        assert {e["source"] for e in _events(daemon, "client_too_slow")} == {"http"}
        assert _events(daemon, "client_too_slow")[0]["max_buffered_bytes"] == \
            MAX_BUFFERED_BYTES
        # Another client is served meanwhile, the long text too.
        assert _audio_s(_speak(daemon, "polite", SHORT)) > 1.0
        replayed = _speak(daemon, "polite", LONG)
        assert len(replayed) == len(whole)
        # When the greedy client reads at last, the replies under the bound are whole, the
        # one that passed it is cut short (a chunked body without its last chunk, as every
        # HTTP client tells), and any asked after it got 429 busy.
        outcomes = [_outcome(reply, cuts, replayed) for reply in unread]
    assert outcomes[0] == "whole", outcomes
    assert "cut short" in outcomes, outcomes
    assert set(outcomes[outcomes.index("cut short") + 1:]) <= {"busy", "cut short"}, outcomes
    # Nothing of it is held any more: the greedy client is served again.
    assert len(_speak(daemon, "greedy", LONG)) == len(whole)


def test_cache_hits_cut_at_the_bound_are_counted_undelivered(daemon: Daemon) -> None:
    """A cache hit is played whole in one tick: the one that passed the bound ended done in
    the tick that cut its client off, and the cancel found no job. The log, `stats` and the
    metrics said done, as if the reply had been heard."""
    _speak(daemon, "hoarder", CACHED)  # recorded: the same text is a hit from now
    jobs: list[str] = []
    with contextlib.ExitStack() as held:
        # Hits of 25 MB a time, until one passes the bound: it is cut, the next refused.
        while (reply := _unread_reply(held, daemon, "hoarder", CACHED)).status == 200:
            assert len(jobs) < 2 * MAX_NON_READERS, "never cut"
            jobs.append(reply.headers["x-cosyvoiced-job"])
            wait_until(lambda: _events_of(daemon, "job", jobs[-1:]), WAIT_S, "the hit")
        assert reply.status == 429
    cut = wait_until(lambda: _events_of(daemon, "client_too_slow", jobs), 10, "the cut")
    ended = _events_of(daemon, "job", jobs)
    assert [(e["outcome"], e["cached"]) for e in ended] == [("done", True)] * len(jobs)
    # (The hits under the bound count too, once their connections are closed unread.)
    wait_until(lambda: {e["job"] for e in cut} <= {
        e["job"] for e in _events_of(daemon, "reply_undelivered", jobs)}, 10,
        "the cut hit to be counted undelivered")


def _events_of(daemon: Daemon, name: str, jobs: list[str]) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events(name) if e.get("job") in jobs]


def _made_or_cut(daemon: Daemon, job: str) -> None:
    """Wait until the job's audio is all made (unread), or a client was cut."""
    wait_until(lambda: _events(daemon, "job", job=job) or _events(daemon, "client_too_slow"),
               WAIT_S, "the reply made whole, or cut")


def _unread_reply(held: contextlib.ExitStack, daemon: Daemon, key: str,
                  text: str) -> http.client.HTTPResponse:
    """A request whose head is read, and then nothing more of it."""
    sock = held.enter_context(_never_read(daemon, key, text))
    sock.settimeout(WAIT_S)
    reply = http.client.HTTPResponse(sock)
    reply.begin()
    return reply


def _outcome(reply: http.client.HTTPResponse, cuts: set[str], whole: bytes) -> str:
    if reply.status == 429:
        assert json.loads(reply.read())["error"]["code"] == "busy"
        assert int(reply.headers["retry-after"]) >= 1
        return "busy"
    assert reply.status == 200
    if reply.headers["x-cosyvoiced-job"] not in cuts:
        assert reply.read() == whole  # the same tone, made again
        return "whole"
    with pytest.raises(http.client.IncompleteRead) as truncated:
        reply.read()
    assert 0 < len(truncated.value.partial) < len(whole)
    return "cut short"


# -- Wyoming ---------------------------------------------------------------------------------
def _wyoming(daemon: Daemon) -> tuple[str, int]:
    host, port = config.load(daemon.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")
    return host, int(port)


async def _wyoming_speak(address: tuple[str, int], text: str) -> float:
    """Audio seconds a reading client gets for `text`."""
    samples = 0
    async with AsyncTcpClient(*address) as client, asyncio.timeout(WAIT_S):
        await client.write_event(Synthesize(text=text).event())
        while (event := await client.read_event()) is not None:
            if AudioChunk.is_type(event.type):
                samples += len(AudioChunk.from_event(event).audio) // 2
            elif AudioStop.is_type(event.type):
                return samples / SAMPLE_RATE
            assert event.type != "error", event
    raise AssertionError("closed before audio-stop")


def test_a_wyoming_client_that_reads_nothing_has_its_job_cancelled_at_the_bound(
        daemon: Daemon) -> None:
    address = _wyoming(daemon)
    before = len(_events(daemon, "client_too_slow", source="wyoming"))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(address)
    try:
        data = json.dumps({"text": OVER_THE_BOUND}).encode()
        sock.sendall(json.dumps({"type": "synthesize", "data_length": len(data)}).encode()
                     + b"\n" + data)
        # It is cut where its unread audio reaches the bound; its job is cancelled.
        cut = wait_until(lambda: _events(daemon, "client_too_slow", source="wyoming")[before:],
                         WAIT_S, "the Wyoming client to be cut at the bound")
        (ended,) = wait_until(lambda: _events(daemon, "job", job=cut[0]["job"]), WAIT_S,
                              "the cut job to end")
        assert ended["outcome"] == "cancelled"
        # Another connection is served meanwhile.
        assert asyncio.run(_wyoming_speak(address, SHORT)) > 1.0
    finally:
        sock.close()
