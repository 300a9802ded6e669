"""First audio over HTTP streaming and over Wyoming, against ZeroMQ, in one run.

    .venv/bin/python bench/intakes.py [--sentences 40]

One daemon listens on all three. For each sentence, in an order that rotates so none
always goes first: ZeroMQ `synthesize` streamed (request sent -> first PCM frame), HTTP
`POST /v1/audio/speech` (request sent -> first body bytes) as `wav` (the voice's rate, no
encoder: what the transport adds) and as `mp3` (the default format: LAME in the path too),
and Wyoming `synthesize` (-> first `audio-chunk`). Every reply is read to its end before
the next request. The target: each p50 of the paired differences (intake - ZeroMQ) within
+5 ms. Prints one JSON object.
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

from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.tts import Synthesize  # noqa: E402

from bench.common import Daemon, free_port, percentile, sentences, streamed_timing, summary_ms  # noqa: E402
from cosyvoiced.client import Client  # noqa: E402
from cosyvoiced.config import Config  # noqa: E402

TARGET_MS = 5.0
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


def run(count: int) -> dict[str, Any]:
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
                asks: dict[str, Callable[[str], Timed]] = {
                    "zmq": lambda text: streamed_timing(client, text),
                    "http_wav": lambda text: speech(text, "wav"),
                    "http_mp3": lambda text: speech(text, "mp3"),
                    "wyoming": wyoming,
                }
                for ask in asks.values():  # connect, warm up, settle
                    ask(texts[0])
                timed: dict[str, list[Timed]] = {name: [] for name in asks}
                names = list(asks)
                for n, text in enumerate(texts):
                    for name in names[n % len(names):] + names[:n % len(names)]:
                        timed[name].append(asks[name](text))
                speech.close()
                wyoming.close()
        finally:
            daemon.stop()
    zmq = timed["zmq"]
    return {
        "benchmark": "intakes", "sentences": count, "cpus": os.cpu_count(),
        "target_ms": TARGET_MS,
        "zmq": {"first_audio": summary_ms([t[0] for t in zmq]),
                "end": summary_ms([t[1] for t in zmq])},
        "http_wav": _report("http (wav)", timed["http_wav"], zmq),
        "http_mp3": _report("http (mp3)", timed["http_mp3"], zmq),
        "wyoming": _report("wyoming", timed["wyoming"], zmq),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=40)
    args = parser.parse_args()
    print(json.dumps(run(args.sentences), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
