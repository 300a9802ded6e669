"""A Locust load test of cosyvoiced's HTTP intake, then of Piper's own server, in one run.

    .venv/bin/pip install -e '.[bench]'   # locust; flask for piper.http_server
    .venv/bin/python bench/load.py [--users 50] [--seconds 60] [--spawn-rate 10]

Locust runs as a library, headless, in this process. Each side gets the same load:
`--users` closed-loop users (each asks again as soon as it has read its last answer in
full), started `--spawn-rate` a second, for `--seconds`; then the users finish the request
they are in and stop. The sentences are bench.common's, in the same order on both sides.

- cosyvoiced: the default engine (the embedded Piper voice) and the defaults `make run`
  has, OpenAI voice names included; HTTP on loopback with no API keys, so all users are one
  client to it (`http.max_pending_per_client` applies to them together). The result cache
  is off unless `--cache`: Piper's server has none and the sentences repeat. Each user
  posts `/v1/audio/speech` (`tts-1`, voice `alloy`, `wav`).
- Piper's server (`python -m piper.http_server`, the same voice): `POST /synthesize`.

A refused request is retried as OpenAI's client does: after its `Retry-After` (up to 60 s),
else after 0.5 s; any other error waits 0.5 s too, so a failing server is not spun on.

For each side: latency of the good answers (whole response read: a wav with audio in it)
as p50/p95/max; requests done; errors by HTTP status and, for cosyvoiced, the OpenAI error
code, 429s counted apart with and without `Retry-After`; resident memory of the server's
processes (supervisor and workers) every second: at start, peak and end. Then the ratios
cosyvoiced/Piper for p50 and p95. Prints one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from anywhere: the repository, not bench/ (whose zmq.py would shadow pyzmq, which
# locust imports), on the path.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

# Locust patches the standard library for gevent when it is imported: before anything
# imports ssl, socket or threading.
import locust  # noqa: E402

# isort: split

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, ClassVar  # noqa: E402

import gevent  # noqa: E402
from locust.contrib.fasthttp import FastResponse  # noqa: E402
from locust.env import Environment  # noqa: E402

from bench.common import Daemon, free_port, percentile, sentences  # noqa: E402
from bench.peer import piper_http_server, tree_rss_mb  # noqa: E402

REQUEST_TIMEOUT_S = 300.0  # a slow answer is measured, not cut off
MAX_RETRY_AFTER_S = 60.0  # as OpenAI's Python client: a longer Retry-After is not honoured
BACKOFF_S = 0.5  # OpenAI's client's first back-off, where the server gives no Retry-After
RSS_EVERY_S = 1.0
WAV_HEADER_BYTES = 44
VOICES = ("alloy", "echo", "fable", "onyx", "nova", "shimmer")  # as etc/cosyvoiced.dev.toml
VOICE = "en_US-joe-medium"


@dataclass
class Side:
    """One server under load: what to post, and what came back."""

    name: str
    path: str
    body: Callable[[str], dict[str, Any]]
    texts: Iterator[str]
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    requests: int = 0

    def record(self, response_time: float, response: FastResponse | None,
               exception: BaseException | None, **_: Any) -> None:
        """Locust's request event: one request done (or failed)."""
        self.requests += 1
        outcome = classify(response, exception)
        if outcome is None:
            self.latencies_s.append(response_time / 1000)
        else:
            self.errors[outcome] += 1


def classify(response: FastResponse | None, exception: BaseException | None) -> str | None:
    """None for a good answer, else what went wrong: "STATUS [code] [with[out] Retry-After]"."""
    status = response.status_code if response is not None else 0
    if not status:
        return f"connection {type(exception).__name__}"
    assert response is not None
    if status == 200:
        body = response.content or b""
        good = body[:4] == b"RIFF" and len(body) > WAV_HEADER_BYTES
        return None if good else "200 not_audio"
    outcome = f"{status} {error_code(response.content)}".rstrip()
    if status == 429:
        with_header = response.headers.get("Retry-After") is not None
        outcome += " with Retry-After" if with_header else " without Retry-After"
    return outcome


def error_code(body: bytes | None) -> str:
    """The `code` of an OpenAI-shaped error body; "" for anything else."""
    try:
        code = json.loads(body or b"")["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return ""
    return str(code)


def retry_delay_s(response: FastResponse) -> float:
    """How long a client waits before its next request, after this answer."""
    if response.status_code == 200:
        return 0.0
    try:
        retry_after = float(response.headers.get("Retry-After") or "")
    except ValueError:
        return BACKOFF_S
    return retry_after if 0 < retry_after <= MAX_RETRY_AFTER_S else BACKOFF_S


def user_class(side: Side, server: str) -> type[locust.FastHttpUser]:
    """A Locust user that posts `side`'s requests to `server`, one after another."""

    class SpeechUser(locust.FastHttpUser):  # type: ignore[misc] # Any to mypy (setup.cfg)
        host = server
        network_timeout = REQUEST_TIMEOUT_S
        connection_timeout = REQUEST_TIMEOUT_S
        delay_s = 0.0

        def wait_time(self) -> float:
            # A wait, not a sleep in the task: stopping the run does not wait for it.
            return self.delay_s

        def speak(self) -> None:
            # The body is read in full before the request counts as done (stream=False).
            response = self.client.request(
                "POST", side.path, data=json.dumps(side.body(next(side.texts))),
                headers={"Content-Type": "application/json"}, name=side.path)
            self.delay_s = retry_delay_s(response)

        # Its only task; not @locust.task, which mypy sees as untyped.
        tasks: ClassVar[list[Callable[[Any], None]]] = [speak]

    SpeechUser.__name__ = f"{side.name}_user"
    return SpeechUser


def sample_rss(pid: int, samples: list[float]) -> None:
    """Append the server's resident memory (all its processes) every second, until killed."""
    while True:
        gevent.sleep(RSS_EVERY_S)
        samples.append(tree_rss_mb(pid))


def load(side: Side, host: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """Hold `args.users` users against `host` for `args.seconds`; what they saw."""
    environment = Environment(user_classes=[user_class(side, host)],
                              stop_timeout=REQUEST_TIMEOUT_S)
    environment.events.request.add_listener(side.record)
    runner = environment.create_local_runner()
    rss = [tree_rss_mb(pid)]
    sampler = gevent.spawn(sample_rss, pid, rss)
    started = time.monotonic()
    runner.start(args.users, spawn_rate=args.spawn_rate)
    gevent.sleep(args.seconds)
    runner.stop()  # each user finishes the request it is in: no slow answer is left out
    elapsed = time.monotonic() - started
    runner.quit()
    sampler.kill()
    rss.append(tree_rss_mb(pid))
    return report(side, rss, elapsed)


def report(side: Side, rss: list[float], elapsed_s: float) -> dict[str, Any]:
    ok = side.latencies_s
    latency = {"p50": ms(percentile(ok, 0.5)), "p95": ms(percentile(ok, 0.95)),
               "max": ms(max(ok))} if ok else None
    refused_well = "with Retry-After"
    return {"server": side.name, "requests": side.requests, "ok": len(ok),
            "ok_per_s": round(len(ok) / elapsed_s, 2), "latency_ms": latency,
            "errors": dict(sorted(side.errors.items())),
            "errors_but_429_with_retry_after": sum(
                n for what, n in side.errors.items()
                if not (what.startswith("429") and what.endswith(refused_well))),
            "rss_mb": {"start": rss[0], "peak": max(rss), "end": rss[-1],
                       "end_minus_start": round(rss[-1] - rss[0], 1),
                       "second_half_growth": second_half_growth(rss),
                       "every_s": rss}}


# Memory is flat when the second half of the run adds at most this: the first half fills
# the worker's buffers and the allocators' pools; what grows after that is held for good.
FLAT_GROWTH_MB = 32.0


def second_half_growth(rss: list[float]) -> float:
    """How much the peak of the run's second half is above its midpoint's RSS."""
    middle = len(rss) // 2
    return round(max(rss[middle:]) - rss[middle], 1)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def openai_speech(text: str) -> dict[str, Any]:
    return {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "wav"}


def piper_speech(text: str) -> dict[str, Any]:
    return {"text": text}


def warm_up(side: Side, host: str) -> None:
    """One request before the clock starts: the first synthesis loads what it needs."""
    speaker = user_class(side, host)
    user = speaker(Environment(user_classes=[speaker]))
    response = user.client.request("POST", side.path,
                                   data=json.dumps(side.body("Hello there.")),
                                   headers={"Content-Type": "application/json"})
    failure = classify(response, None)
    if failure is not None:  # a server that cannot answer one request is not load-tested
        raise RuntimeError(f"{side.name}: the warm-up request failed: {failure}")


def run_cosyvoiced(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    cache = {"cache": {"max_bytes": 512 << 20}} if args.cache else {}
    with tempfile.TemporaryDirectory(prefix="cvd-bench-") as root:
        daemon = Daemon(Path(root), log={"level": "info"},
                        http={"listen": f"127.0.0.1:{port}"},
                        http__voices=dict.fromkeys(VOICES, VOICE), **cache)
        daemon.start()
        try:
            assert daemon.process is not None
            host = f"http://127.0.0.1:{port}"
            warm_up(Side("cosyvoiced", "/v1/audio/speech", openai_speech, iter([])), host)
            side = Side("cosyvoiced", "/v1/audio/speech", openai_speech,
                        itertools.cycle(sentences(args.sentences)))
            return load(side, host, daemon.process.pid, args)
        finally:
            daemon.stop()


def run_piper(args: argparse.Namespace) -> dict[str, Any]:
    with piper_http_server() as (pid, port):
        host = f"http://127.0.0.1:{port}"
        warm_up(Side("piper.http_server", "/synthesize", piper_speech, iter([])), host)
        side = Side("piper.http_server", "/synthesize", piper_speech,
                    itertools.cycle(sentences(args.sentences)))
        return load(side, host, pid, args)


def ratio(ours: dict[str, Any], theirs: dict[str, Any], key: str) -> float | None:
    if not (ours["latency_ms"] and theirs["latency_ms"]):
        return None
    ours_ms: float = ours["latency_ms"][key]
    theirs_ms: float = theirs["latency_ms"][key]
    return round(ours_ms / theirs_ms, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--spawn-rate", type=float, default=10.0, help="users started a second")
    parser.add_argument("--sentences", type=int, default=40)
    parser.add_argument("--cache", action="store_true",
                        help="cosyvoiced's result cache on, as `make run` has it")
    args = parser.parse_args()
    if importlib.util.find_spec("flask") is None:  # only piper.http_server needs it
        print("bench/load.py: piper.http_server needs flask: "
              ".venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 2
    ours = run_cosyvoiced(args)
    theirs = run_piper(args)
    result = {"benchmark": "load", "cpus": os.cpu_count(), "users": args.users,
              "seconds": args.seconds, "spawn_rate": args.spawn_rate,
              "result_cache": args.cache, "cosyvoiced": ours, "piper_http_server": theirs,
              "cosyvoiced_over_piper": {"p50": ratio(ours, theirs, "p50"),
                                        "p95": ratio(ours, theirs, "p95")},
              "target": {
                  "no_error_but_429_with_retry_after":
                      ours["errors_but_429_with_retry_after"] == 0,
                  "p95_below_piper": (ratio(ours, theirs, "p95") or 2.0) < 1.0,
                  "rss_flat": ours["rss_mb"]["second_half_growth"] <= FLAT_GROWTH_MB}}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
