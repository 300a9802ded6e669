"""Every intake at once: the drop folder, ZeroMQ, HTTP and Wyoming each with a burst of the
texts slowest to clean up and split, which is done on the supervisor's tick. Each intake
kept to its own budget, but the four budgets added up in one tick; they share one now
(intake/tickbudget.py), taking it in turns."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiohttp
import pytest
import zmq
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize

from tests.daemon import Daemon, free_port, wait_until

TONE = {"name": "tests.engines.faulty:load"}
KEYS = [f"sk-together-{n:02}-0123456789" for n in range(4)]
# 9,900 characters, each "。" a sentence's end: about 75 ms of the tick each. A slow first
# sentence keeps the worker busy, so that the jobs stay queued (their splitting is the test).
SLOW_TO_SPLIT = "SLOW@60 x. " + (("a" + "。" * 299) * 33)
EACH = 12  # texts from each intake
ZMQ_DEALERS = 4


# No tick of 0.5 s is a bound on wall time: run alone.
@pytest.mark.serial
def test_a_burst_on_every_intake_at_once_holds_no_tick(tmp_path: Path) -> None:
    keys = tmp_path / "api_keys"
    keys.write_text("".join(f"client-{n} {key}\n" for n, key in enumerate(KEYS)))
    http_port, wyoming_port = free_port(), free_port()
    daemon = Daemon(tmp_path / "d", engine=TONE,
                    http={"listen": f"127.0.0.1:{http_port}", "api_keys_file": str(keys)},
                    wyoming={"listen": f"tcp://127.0.0.1:{wyoming_port}"})
    daemon.start()
    dealers: list[zmq.Socket[bytes]] = []
    try:
        staged = tmp_path / "staged"
        staged.mkdir()
        for n in range(EACH):
            (staged / f"slow-{n:02}.txt").write_text(SLOW_TO_SPLIT)
        for _ in range(ZMQ_DEALERS):
            dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(daemon.endpoint)
            dealers.append(dealer)
        asyncio.run(_burst(daemon, staged, dealers, http_port, wyoming_port))
        wait_until(lambda: len(daemon.log_events("job_queued")) >= 4 * EACH, 120,
                   "every text to be queued")
        held = [line for line in daemon.log_events("tick_slow") if "intakes" in line["steps"]]
        assert not held, held
    finally:
        for dealer in dealers:
            dealer.close(linger=0)
        daemon.stop()


async def _burst(daemon: Daemon, staged: Path, dealers: list[zmq.Socket[bytes]],
                 http_port: int, wyoming_port: int) -> None:
    """All four at once; the HTTP and Wyoming clients wait only until their texts are
    queued (their audio is not the test's), then hang up."""
    wyoming = [AsyncTcpClient("127.0.0.1", wyoming_port) for _ in range(EACH)]
    for client in wyoming:
        await client.connect()
    async with aiohttp.ClientSession() as session:
        for path in sorted(staged.iterdir()):
            os.rename(path, daemon.inbox / path.name)
        for n in range(EACH):
            dealers[n % ZMQ_DEALERS].send(json.dumps(
                {"v": 1, "op": "synthesize", "format": "pcm_s16le",
                 "text": SLOW_TO_SPLIT, "id": f"zmq-{n}"}).encode())
        for client in wyoming:
            await client.write_event(Synthesize(text=SLOW_TO_SPLIT).event())
        posts = [asyncio.create_task(session.post(
            f"http://127.0.0.1:{http_port}/v1/audio/speech",
            headers={"Authorization": f"Bearer {KEYS[n % len(KEYS)]}"},
            json={"model": "tts-1", "voice": "tone", "input": SLOW_TO_SPLIT,
                  "response_format": "pcm"})) for n in range(EACH)]
        await asyncio.to_thread(wait_until, lambda: len(daemon.log_events("job_queued"))
                                >= 4 * EACH, 120, "every text to be queued")
        for post in posts:
            post.cancel()
        await asyncio.gather(*posts, return_exceptions=True)
    for client in wyoming:
        await client.disconnect()
