"""Prompt audio sent before the engine is ready gets one answer, whichever intake it came by.
A worker's engine says whether it clones only once it is loaded: until then the one rule
(Service.check_prompt) leaves the audio to the worker, as an unknown voice is left to it.
The reply intakes (HTTP's clone) had a rule of their own, and refused every clone in that
window with "the X engine cannot clone voices", on a CosyVoice daemon still loading too;
ZeroMQ queued it. A voice registered in that window is refused as `busy` (retry), not as
`not_supported`. A real daemon whose cloning engine loads when the test says so, the openai
client and ours.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import socket
import time
from pathlib import Path

import openai
import pytest

from cosyvoiced import config
from cosyvoiced.client import Client, DaemonError
from cosyvoiced.config import EngineConfig
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port, wait_until
from tests.engines import faulty
from tests.test_http_voices import TEXT, assert_spoken, recording, refusal, register, speak

GATE_ENV = "COSYVOICED_TEST_LOAD_GATE"  # a file: the engine loads once it exists
GATE_WAIT_S = 60.0  # so that a test that died does not leave its worker waiting for good
GATED_CLONING = {"name": "tests.test_prompt_before_ready:gated_cloning"}
PROMPT_S = 1.5
TIMEOUT_S = 60.0


def gated_cloning(engine: EngineConfig) -> faulty.CloningToneEngine:
    """The cloning tone engine, loaded once the gate file exists: until then the daemon is
    up, its intakes listen, and no engine is ready (as while CosyVoice loads its model)."""
    gate = Path(os.environ[GATE_ENV])
    deadline = time.monotonic() + GATE_WAIT_S
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return faulty.cloning(engine)


def _listening(daemon: Daemon) -> bool:
    host, port = config.load(daemon.config_path).http.listen.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def test_prompt_audio_before_the_engine_is_ready_is_queued_by_http_as_by_zeromq(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """Sent while the engine loads, a clone is queued by HTTP as by ZeroMQ, and spoken in
    the prompt's voice once the engine is ready. HTTP answered at once: 400 not_supported,
    "clone: the tests.test_prompt_before_ready:gated_cloning engine cannot clone voices"."""
    gate = tmp_path / "gate"
    daemon = make_daemon(engine=GATED_CLONING, http={"listen": f"127.0.0.1:{free_port()}"})
    daemon.start(extra_env={GATE_ENV: str(gate)}, wait_ready=False)
    wait_until(lambda: _listening(daemon), 30, "HTTP to listen")
    listen = config.load(daemon.config_path).http.listen
    clone = {"audio": base64.b64encode(recording(PROMPT_S)).decode(), "text": "Me."}
    with openai.OpenAI(base_url=f"http://{listen}/v1", api_key="unused", max_retries=0,
                       timeout=TIMEOUT_S) as speech, \
            Client(daemon.endpoint, timeout_s=TIMEOUT_S, retries=0) as ours, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        over_http = pool.submit(speak, speech, "alloy", clone=clone)
        over_zmq = pool.submit(ours.synthesize, TEXT, recording(PROMPT_S), format="wav")
        try:
            wait_until(lambda: over_http.done() or over_zmq.done()
                       or len(daemon.log_events("job_queued")) >= 2, 30, "both to be queued")
            assert not over_http.done(), over_http.result()  # raises the refusal, if any
            assert not over_zmq.done(), over_zmq.result()
            assert daemon.notify is not None
            assert not daemon.notify.seen("READY=1")  # the engine has not loaded yet
        finally:
            gate.touch()  # else a failure waits out the requests' timeouts
        assert_spoken(over_http.result(), TEXT, PROMPT_S)
        assert_spoken(over_zmq.result().audio, TEXT, PROMPT_S)


def test_a_voice_registered_while_the_engine_loads_is_told_to_retry(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """Whether the engine clones is known once it is loaded: a registration before that is
    `busy` (HTTP 429 with Retry-After; ZeroMQ's busy), which a client retries, and the same
    registration is stored once the engine is ready. It was `not_supported`, "cannot clone
    voices (or has not started yet)", on a CosyVoice daemon still loading too: a script that
    set up its voices at boot took that as final."""
    gate = tmp_path / "gate"
    daemon = make_daemon(engine=GATED_CLONING, http={"listen": f"127.0.0.1:{free_port()}"},
                         engine__cosyvoice={"speakers_file": str(tmp_path / "speakers.json")})
    daemon.start(extra_env={GATE_ENV: str(gate)}, wait_ready=False)
    try:
        wait_until(lambda: _listening(daemon), 30, "HTTP to listen")
        listen = config.load(daemon.config_path).http.listen
        with openai.OpenAI(base_url=f"http://{listen}/v1", api_key="unused", max_retries=0,
                           timeout=TIMEOUT_S) as http, \
                Client(daemon.endpoint, timeout_s=TIMEOUT_S, retries=0) as ours:
            with pytest.raises(openai.RateLimitError) as over_http:
                register(http, "early", recording(PROMPT_S))
            assert refusal(over_http)[:2] == (429, "busy")
            assert over_http.value.response.headers["Retry-After"] == "2"
            assert "still loading" in over_http.value.message
            with pytest.raises(DaemonError) as over_zmq:
                ours.register_voice("early-too", recording(PROMPT_S), "Words.")
            assert over_zmq.value.code == "busy", over_zmq.value.header
            gate.touch()
            assert daemon.notify is not None
            wait_until(lambda: daemon.notify is not None and daemon.notify.seen("READY=1"), 60,
                       "the engine to load")
            assert register(http, "early", recording(PROMPT_S)).name == "early"
            assert ours.register_voice("early-too", recording(PROMPT_S), "Words.")["name"] \
                == "early-too"
    finally:
        gate.touch()
