"""First audio over HTTP streaming and over Wyoming, against ZeroMQ, in one run.

    .venv/bin/python bench/intakes.py [--sentences 40] [--streamed-only]

One daemon listens on all three. For each sentence, in an order that rotates so none
always goes first: ZeroMQ `synthesize` streamed (request sent -> first PCM frame), HTTP
`POST /v1/audio/speech` (request sent -> first body bytes) as `wav` (the voice's rate, no
encoder: what the transport adds) and as `mp3` (the default format: LAME in the path too),
and Wyoming `synthesize` (-> first `audio-chunk`). Every reply is read to its end before
the next request. The target: each p50 of the paired differences (intake - ZeroMQ) within
+5 ms.

Then text streamed in, as from an LLM: ElevenLabs' multi-stream-input WebSocket, one
context per text (that sentence and the next one's), sent a word-token at a time at
TOKENS_PER_S. First audio is timed from the text's first token. Its target: at most the
moment the first sentence's last token was sent, plus that sentence's synthesis (ZeroMQ's
first audio for it alone, asked in the same rotation), plus WS_TARGET_MS. Twice: with
`flush: true` on the token that ends the sentence (as LiveKit's plugin sends each sentence
its tokenizer found), and without (the daemon's splitter finds the end: a "." after a plain
word, "!" or "?" it knows at once to be one, as these texts' sentences end).
`--streamed-only` runs this part alone (with its ZeroMQ baseline). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

# Run from anywhere: the repository, not bench/ (whose zmq.py would shadow pyzmq), on the path.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import aiohttp  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.tts import Synthesize  # noqa: E402

from bench.common import Daemon, free_port, percentile, sentences, streamed_timing, summary_ms  # noqa: E402
from cosyvoiced.client import Client  # noqa: E402
from cosyvoiced.config import Config  # noqa: E402
from cosyvoiced.sentences import sentences as split_sentences  # noqa: E402

TARGET_MS = 5.0
TOKENS_PER_S = 20.0  # an LLM's pace
WS_TARGET_MS = 50.0
Timed = tuple[float, float]  # (first audio, end) seconds after the request was sent


class HttpSpeech:
    """One keep-alive connection, read as a player would: each chunk as it comes."""

    def __init__(self, port: int) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def __call__(self, text: str, fmt: str) -> Timed:
        body = json.dumps({"model": "tts-1", "voice": "en_US-joe-medium", "input": text,
                           "response_format": fmt})
        started = time.perf_counter()
        self._connection.request("POST", "/v1/audio/speech", body,
                                 {"Content-Type": "application/json"})
        reply = self._connection.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {reply.read()!r}")
        first = 0.0
        while reply.read1(65536):
            first = first or time.perf_counter() - started
        return first, time.perf_counter() - started

    def close(self) -> None:
        self._connection.close()


class WyomingSpeech:
    """One connection, kept open, driven from this thread by a loop of its own."""

    def __init__(self, port: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = AsyncTcpClient("127.0.0.1", port)
        self._loop.run_until_complete(self._client.connect())

    async def _speak(self, text: str) -> Timed:
        started = time.perf_counter()
        await self._client.write_event(Synthesize(text).event())
        first = 0.0
        while True:
            event = await self._client.read_event()
            if event is None or event.type == "error":
                raise RuntimeError(f"wyoming: {event}")
            if event.type == "audio-chunk":
                first = first or time.perf_counter() - started
            elif event.type == "audio-stop":
                return first, time.perf_counter() - started

    def __call__(self, text: str) -> Timed:
        return self._loop.run_until_complete(self._speak(text))

    def close(self) -> None:
        self._loop.run_until_complete(self._client.disconnect())
        self._loop.close()


class WebSocketSpeech:
    """ElevenLabs' multi-stream-input: one socket, kept open, a context per text."""

    def __init__(self, port: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._port = port
        self._contexts = 0
        self._session, self._ws = self._loop.run_until_complete(self._connect())

    async def _connect(self) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(
            f"ws://127.0.0.1:{self._port}/v1/text-to-speech/en_US-joe-medium/"
            "multi-stream-input?output_format=pcm_22050")
        return session, ws

    async def _speak(self, text: str, flush: bool) -> tuple[float, float]:
        """(first audio, the first sentence's last token sent), from the first token."""
        self._contexts += 1
        context = f"c{self._contexts}"
        first_sentence = split_sentences(text)[0].rstrip()
        tokens = [word if n == 0 else f" {word}" for n, word in enumerate(text.split(" "))]
        reader = asyncio.create_task(self._first_audio(context))
        await self._ws.send_json({"text": " ", "context_id": context})
        started, sentence_sent, sent = time.perf_counter(), 0.0, ""
        for token in tokens:
            sent += token
            ends = not sentence_sent and sent.rstrip() == first_sentence
            await self._ws.send_json({"text": token, "context_id": context,
                                      "flush": flush and ends})
            if ends:
                sentence_sent = time.perf_counter() - started
            await asyncio.sleep(1 / TOKENS_PER_S)
        await self._ws.send_json({"context_id": context, "close_context": True})
        return await reader - started, sentence_sent

    async def _first_audio(self, context: str) -> float:
        first = 0.0
        while True:
            frame = await self._ws.receive()
            if frame.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"websocket: {frame.type} {frame.data}")
            reply = json.loads(frame.data)
            if "error" in reply or reply.get("contextId") != context:
                raise RuntimeError(f"websocket: {reply}")
            if reply.get("audio"):
                first = first or time.perf_counter()
            if reply.get("isFinal"):
                return first

    def __call__(self, text: str, flush: bool) -> tuple[float, float]:
        return self._loop.run_until_complete(self._speak(text, flush))

    def close(self) -> None:
        self._loop.run_until_complete(self._ws.close())
        self._loop.run_until_complete(self._session.close())
        self._loop.close()


def _streamed_report(timed: list[tuple[float, float]], zmq: list[Timed]) -> dict[str, Any]:
    """First audio of text streamed in, against the first sentence's arrival plus its
    synthesis."""
    over = [(first - sent - z[0]) * 1000 for (first, sent), z in zip(timed, zmq, strict=True)]
    p50 = round(percentile(over, 0.5), 2)
    return {"first_audio_from_text_start": summary_ms([t[0] for t in timed]),
            "first_sentence_sent": summary_ms([t[1] for t in timed]),
            "first_audio_minus_sentence_sent_minus_synthesis_ms": {
                "p50": p50, "p95": round(percentile(over, 0.95), 2)},
            "within_target": p50 <= WS_TARGET_MS}


def _report(name: str, timed: list[Timed], zmq: list[Timed]) -> dict[str, Any]:
    firsts = [t[0] for t in timed]
    overhead = [(t[0] - z[0]) * 1000 for t, z in zip(timed, zmq, strict=True)]
    p50 = round(percentile(overhead, 0.5), 2)
    return {"intake": name, "first_audio": summary_ms(firsts),
            "end": summary_ms([t[1] for t in timed]),
            "first_audio_minus_zmq_ms": {"p50": p50,
                                          "p95": round(percentile(overhead, 0.95), 2)},
            "within_target": p50 <= TARGET_MS}


def no_result_cache() -> dict[str, dict[str, Any]]:
    """Config sections that turn a result cache off, where the daemon has one: every
    sentence is asked for more than once here, and must be synthesized each time."""
    return {"cache": {"max_bytes": 0}} if "cache" in {f.name for f in fields(Config)} else {}


def run(count: int, streamed_only: bool = False) -> dict[str, Any]:
    texts = sentences(count)
    http_port, wyoming_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="cvd-bench-") as root:
        daemon = Daemon(Path(root), log={"level": "info"},
                        http={"listen": f"127.0.0.1:{http_port}"},
                        wyoming={"listen": f"tcp://127.0.0.1:{wyoming_port}"},
                        **no_result_cache())
        daemon.start()
        try:
            with Client(daemon.endpoint, timeout_s=120) as client:
                speech = HttpSpeech(http_port)
                wyoming = WyomingSpeech(wyoming_port)
                socket = WebSocketSpeech(http_port)
                streamed = [f"{text} {texts[(n + 1) % count]}" for n, text in enumerate(texts)]
                asks: dict[str, Callable[[str], Timed]] = {
                    "zmq": lambda text: streamed_timing(client, text),
                    "http_wav": lambda text: speech(text, "wav"),
                    "http_mp3": lambda text: speech(text, "mp3"),
                    "wyoming": wyoming,
                }
                if streamed_only:
                    asks = {}
                # The streamed texts' first sentences; those asks get the streamed text.
                streamed_asks: dict[str, Callable[[str], tuple[float, float]]] = {
                    "zmq_first_sentence": lambda text: streamed_timing(
                        client, split_sentences(text)[0].rstrip()),
                    "websocket_flush": lambda text: socket(text, True),
                    "websocket": lambda text: socket(text, False),
                }
                for ask in asks.values():  # connect, warm up, settle
                    ask(texts[0])
                for streamed_ask in streamed_asks.values():
                    streamed_ask(streamed[0])
                timed = _rotated(asks, texts) if asks else {}
                timed.update(_rotated(streamed_asks, streamed))
                speech.close()
                wyoming.close()
                socket.close()
        finally:
            daemon.stop()
    report: dict[str, Any] = {"benchmark": "intakes", "sentences": count,
                              "cpus": os.cpu_count()}
    if not streamed_only:
        zmq = timed["zmq"]
        report |= {
            "target_ms": TARGET_MS,
            "zmq": {"first_audio": summary_ms([t[0] for t in zmq]),
                    "end": summary_ms([t[1] for t in zmq])},
            "http_wav": _report("http (wav)", timed["http_wav"], zmq),
            "http_mp3": _report("http (mp3)", timed["http_mp3"], zmq),
            "wyoming": _report("wyoming", timed["wyoming"], zmq)}
    return report | {
        "streamed_text": {
            "tokens_per_s": TOKENS_PER_S, "target_ms": WS_TARGET_MS,
            "synthesis": summary_ms([t[0] for t in timed["zmq_first_sentence"]]),
            "websocket_flush": _streamed_report(timed["websocket_flush"],
                                                timed["zmq_first_sentence"]),
            "websocket": _streamed_report(timed["websocket"], timed["zmq_first_sentence"]),
        },
    }


def _rotated(asks: dict[str, Callable[[str], Timed]], texts: list[str]
             ) -> dict[str, list[Timed]]:
    """Each ask for each text, in an order that rotates so none always goes first."""
    timed: dict[str, list[Timed]] = {name: [] for name in asks}
    names = list(asks)
    for n, text in enumerate(texts):
        for name in names[n % len(names):] + names[:n % len(names)]:
            timed[name].append(asks[name](text))
    return timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=40)
    parser.add_argument("--streamed-only", action="store_true",
                        help="only text streamed in over the WebSocket, against ZeroMQ")
    args = parser.parse_args()
    print(json.dumps(run(args.sentences, args.streamed_only), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
