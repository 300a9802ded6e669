"""The daemon with the real batched CosyVoice2/3 engine: several clients at once are served
by one worker, whose streams `stats` shows, and each gets its whole audio. CosyVoice-300M
(v1) serves one segment at a time, and says so."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from cosyvoiced.client import Client
from tests.cosyvoice.test_cosyvoice import LONG, NATIVE_RATE, TIMEOUT_S, assert_audio
from tests.daemon import Daemon, wait_until

CLIENTS = 3
VOICE = "English Female"


def _worker(client: Client) -> dict[str, Any]:
    (worker,) = client.stats()["workers"]
    return dict(worker)


def test_one_worker_streams_to_several_clients_at_once(daemon: Daemon,
                                                       model_version: int) -> None:
    with Client(daemon.endpoint, timeout_s=TIMEOUT_S,
                admin_token=daemon.admin_token()) as watcher:
        streams = _worker(watcher)["max_streams"]
        assert streams == (1 if model_version == 1 else 4)  # the CPU's default
        heard: dict[int, tuple[np.ndarray[Any, np.dtype[np.float32]], int]] = {}
        failures: list[BaseException] = []
        most = [0]

        def listen(n: int) -> None:
            try:
                with Client(daemon.endpoint, timeout_s=TIMEOUT_S) as client, \
                        client.stream(f"{LONG} Number {n}.", voice=VOICE) as stream:
                    pcm = b"".join(stream)
                    heard[n] = (np.frombuffer(pcm, "<i2").astype(np.float32) / np.float32(32768),
                                int(stream.start["sample_rate"]))
            except BaseException as error:  # noqa: BLE001 - raised in the test's thread
                failures.append(error)

        threads = [threading.Thread(target=listen, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()

        def all_heard() -> bool:
            most[0] = max(most[0], _worker(watcher)["streams"])
            return not any(thread.is_alive() for thread in threads)

        wait_until(all_heard, TIMEOUT_S, "every client's audio")
    assert not failures, failures
    assert sorted(heard) == list(range(CLIENTS))
    for samples, rate in heard.values():
        assert_audio(samples, rate, NATIVE_RATE[model_version])
    assert most[0] >= (1 if streams == 1 else 2), "never more than one stream at once"
