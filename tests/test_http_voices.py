"""Voices over HTTP (`/v1/audio/voices`, a speech request's one-off `clone`) with the
official `openai` client, on the real daemon, and the one store they share with ZeroMQ,
Wyoming and the drop folder.

The cloning engine (tests/engines/faulty.py) speaks a tone for the text, then its voice's
prompt audio as a tone of the same length: so each test sees which voice spoke, and that
its audio arrived whole.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import openai
import pytest
import soundfile
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

from cosyvoiced import config
from cosyvoiced.admission import MAX_UPLOADS_AT_ONCE
from cosyvoiced.client import Client
from tests.daemon import Daemon, free_port, wait_until
from tests.engines.faulty import SAMPLE_RATE, SECONDS_PER_CHAR

KEY = "sk-voices-0123456789"
TEXT = "Hello there."
TIMEOUT_S = 60.0
MAX_BODY = 64 << 10  # http.max_body_bytes of the cloning daemon
MAX_UPLOAD = 1 << 20  # http.max_upload_bytes
SAMPLE_TOLERANCE = 2  # resampled prompt lengths may round differently


def recording(seconds: float, rate: int = 16000, fmt: str = "WAV") -> bytes:
    """A speech-loud tone as an audio file, standing in for a voice recording."""
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.3 * np.sin(2 * np.pi * 180 * t), rate, format=fmt)
    return buffer.getvalue()


def spoken_samples(text: str, prompt_s: float = 0.0) -> int:
    """What the cloning engine makes for one sentence in a voice of prompt_s seconds."""
    return int(len(text) * SECONDS_PER_CHAR * SAMPLE_RATE) + round(prompt_s * SAMPLE_RATE)


def assert_spoken(wav: bytes, text: str, prompt_s: float) -> None:
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    assert rate == SAMPLE_RATE
    assert abs(len(samples) - spoken_samples(text, prompt_s)) <= SAMPLE_TOLERANCE, \
        (len(samples), spoken_samples(text, prompt_s))
    assert float(np.sqrt(np.mean(np.square(samples)))) > 0.1


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("voices")
    (root / "api_keys").write_text(f"{KEY}\n")
    running = Daemon(root, engine={"name": "tests.engines.faulty:cloning"},
                     engine__cosyvoice={"speakers_file": str(root / "state" / "speakers.json")},
                     http={"listen": f"127.0.0.1:{free_port()}",
                           "api_keys_file": str(root / "api_keys"),
                           "max_body_bytes": MAX_BODY, "max_upload_bytes": MAX_UPLOAD},
                     wyoming={"listen": f"tcp://127.0.0.1:{free_port()}"})
    running.start()
    yield running
    running.stop()


def _client(daemon: Daemon, key: str = KEY) -> openai.OpenAI:
    listen = config.load(daemon.config_path).http.listen
    return openai.OpenAI(base_url=f"http://{listen}/v1", api_key=key, max_retries=0,
                         timeout=TIMEOUT_S)


@pytest.fixture
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with _client(daemon) as connected:
        yield connected


def register(client: openai.OpenAI, name: str, audio: bytes, text: str | None = "Words.",
             **extra: Any) -> Any:
    """POST /v1/audio/voices with the SDK's own method (OpenAI's audio_sample and consent;
    our transcript in extra_body)."""
    body = {"text": text, **extra} if text is not None else extra
    return client.audio.voices.create(audio_sample=(f"{name}.wav", audio, "audio/wav"),
                                      consent="cons_not_checked", name=name, extra_body=body)


def get(client: openai.OpenAI, path: str) -> dict[str, Any]:
    """A GET of our API's JSON with the SDK's own client (it has no method for these)."""
    return cast(dict[str, Any], client.get(path, cast_to=object))


def voices(client: openai.OpenAI) -> dict[str, Any]:
    return {v["name"]: v for v in get(client, "/audio/voices")["voices"]}


def speak(client: openai.OpenAI, voice: str, text: str = TEXT, **extra: Any) -> bytes:
    return client.audio.speech.create(model="tts-1", voice=voice, input=text,
                                      response_format="wav", extra_body=extra or None).content


def refusal(caught: pytest.ExceptionInfo[openai.APIStatusError]) -> tuple[int, str, str | None]:
    error = caught.value.body
    assert isinstance(error, dict), error
    return caught.value.status_code, error["code"], error["param"]


def test_a_voice_is_registered_listed_read_spoken_and_removed(client: openai.OpenAI) -> None:
    made = register(client, "alice", recording(2.0), "My name is Alice.", language="en")
    assert (made.id, made.name, made.object, made.type) == ("alice", "alice", "audio.voice",
                                                            "audio_sample")
    listed = voices(client)["alice"]
    assert (listed["kind"], listed["language"], listed["sample_rate"]) == \
        ("registered", "en", SAMPLE_RATE)
    assert get(client, "/audio/voices/alice")["name"] == "alice"
    assert_spoken(speak(client, "alice"), TEXT, 2.0)
    # Registering the name again replaces the voice.
    register(client, "alice", recording(1.5, 44100), "Alice again.")
    assert_spoken(speak(client, "alice"), TEXT, 1.5)
    assert client.audio.voices.delete("alice").deleted
    assert "alice" not in voices(client)
    with pytest.raises(openai.NotFoundError) as caught:
        client.audio.voices.delete("alice")
    assert refusal(caught) == (404, "not_found", "name")
    with pytest.raises(openai.NotFoundError):
        get(client, "/audio/voices/alice")
    with pytest.raises(openai.BadRequestError) as unknown:
        speak(client, "alice")
    assert refusal(unknown)[1] == "unknown_voice"


@pytest.mark.parametrize(("audio", "text", "extra", "expected"), [
    (recording(0.5), "Short.", {}, ("prompt_audio_too_short", "audio")),
    (recording(31.0, 8000), "Long.", {}, ("prompt_audio_too_long", "audio")),
    (b"RIFF this is not audio at all" * 100, "Noise.", {}, ("prompt_audio_unreadable",
                                                            "audio")),
    (recording(2.0), None, {}, ("missing_field", "text")),
    (recording(2.0), "  ", {}, ("missing_field", "text")),
    (recording(2.0), "Words.", {"language": "not a tag!"}, ("invalid_field", "language")),
    (recording(2.0), "Words.", {"type": "prompt"}, ("not_supported", "type")),
    (recording(2.0), "Words.", {"colour": "blue"}, ("unknown_field", "colour")),
])
def test_bad_registrations_get_the_drop_folder_codes(
        client: openai.OpenAI, audio: bytes, text: str | None, extra: dict[str, str],
        expected: tuple[str, str]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        register(client, "bad", audio, text, **extra)
    assert refusal(caught) == (400, *expected)
    assert "bad" not in voices(client)


def test_bad_names_bodies_and_sizes_are_refused(daemon: Daemon,
                                                client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad_name:
        register(client, "no/slashes", recording(2.0))
    assert refusal(bad_name) == (400, "invalid_field", "name")
    with pytest.raises(openai.APIStatusError) as as_json:
        client.post("/audio/voices", body={"name": "json"}, cast_to=object)
    assert refusal(as_json) == (415, "unsupported_media_type", None)
    with pytest.raises(openai.APIStatusError) as huge:
        register(client, "huge", recording(40.0, 48000))  # 3.7 MB, over max_upload_bytes
    assert refusal(huge)[:2] == (413, "request_too_large")
    with _client(daemon, "sk-wrong") as stranger, \
            pytest.raises(openai.AuthenticationError):
        register(stranger, "intruder", recording(2.0))
    assert {"bad", "huge", "intruder", "json"}.isdisjoint(voices(client))


def stalled_upload(daemon: Daemon, key: str = KEY) -> socket.socket:
    """A registration whose body never comes: it holds an upload slot."""
    host, port = config.load(daemon.config_path).http.listen.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/audio/voices HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
                 + key.encode() + b"\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n--b\r\n")
    return sock


def test_uploads_read_at_once_are_bounded(daemon: Daemon, client: openai.OpenAI) -> None:
    def refused_busy() -> bool:
        """A cheap request that takes a slot first: 429 when none is free, else 415."""
        with pytest.raises(openai.APIStatusError) as caught:
            client.post("/audio/voices", body={}, cast_to=object)
        status = caught.value.status_code
        assert status in (415, 429), caught.value
        assert status == 415 or caught.value.response.headers["retry-after"]
        return status == 429

    stalled = [stalled_upload(daemon) for _ in range(MAX_UPLOADS_AT_ONCE)]
    try:
        wait_until(refused_busy, 10, "the fifth upload refused")
    finally:
        for sock in stalled:
            sock.close()
    wait_until(lambda: not refused_busy(), 10, "the slots given back")
    register(client, "after", recording(1.0))
    client.audio.voices.delete("after")


def test_uploads_are_decoded_in_the_encoder_process(daemon: Daemon,
                                                    client: openai.OpenAI) -> None:
    """With the encoder process stopped, a registration (HTTP or ZeroMQ) waits for it: the
    supervisor decodes nothing itself. Let go, both complete."""
    encoder_pid = daemon.log_events("encoder_started")[-1]["pid"]
    os.kill(encoder_pid, signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            over_http = pool.submit(register, client, "held", recording(1.0))
            over_zmq = pool.submit(_zmq_register, daemon, "held-too", recording(1.0))
            for pending in (over_http, over_zmq):
                with pytest.raises(concurrent.futures.TimeoutError):
                    pending.result(timeout=1.0)
            os.kill(encoder_pid, signal.SIGCONT)
            assert over_http.result(TIMEOUT_S).name == "held"
            assert over_zmq.result(TIMEOUT_S)["name"] == "held-too"
    finally:
        os.kill(encoder_pid, signal.SIGCONT)
    client.audio.voices.delete("held")
    with Client(daemon.endpoint, timeout_s=TIMEOUT_S) as zmq_client:  # anonymous clients'
        zmq_client.remove_voice("held-too")


def _zmq_register(daemon: Daemon, name: str, audio: bytes) -> dict[str, Any]:
    with Client(daemon.endpoint, timeout_s=TIMEOUT_S) as zmq_client:
        return zmq_client.register_voice(name, audio, "Some words.")


def _wyoming_speak(daemon: Daemon, voice: str) -> tuple[int, int, list[str]]:
    """(rate, samples) of a Wyoming synthesize in `voice`, and the voices `describe` lists."""
    host, port = config.load(daemon.config_path).wyoming.listen.rsplit("/", 1)[1].split(":")

    async def run() -> tuple[int, int, list[str]]:
        async with AsyncTcpClient(host, int(port)) as wyoming:
            await wyoming.write_event(Describe().event())
            info = Info.from_event(await asyncio.wait_for(wyoming.read_event(), TIMEOUT_S))
            await wyoming.write_event(Synthesize(TEXT, SynthesizeVoice(name=voice)).event())
            rate, samples = 0, 0
            while (event := await asyncio.wait_for(wyoming.read_event(), TIMEOUT_S)) \
                    is not None and event.type != "audio-stop":
                assert event.type != "error", event.data
                if AudioStart.is_type(event.type):
                    rate = AudioStart.from_event(event).rate
                elif AudioChunk.is_type(event.type):
                    samples += len(AudioChunk.from_event(event).audio) // 2
            return rate, samples, [v.name for v in info.tts[0].voices]

    return asyncio.run(run())


def test_one_store_for_every_intake_that_survives_a_restart(daemon: Daemon,
                                                             client: openai.OpenAI) -> None:
    register(client, "bob", recording(2.0), "I am Bob.")
    with Client(daemon.endpoint, timeout_s=TIMEOUT_S) as zmq_client:
        assert "bob" in [v["name"] for v in zmq_client.voices()]
        assert_spoken(zmq_client.synthesize(TEXT, voice="bob", format="wav").audio, TEXT, 2.0)
        zmq_client.register_voice("carol", recording(1.5, 22050), "I am Carol.")
    rate, samples, listed = _wyoming_speak(daemon, "bob")
    assert rate == SAMPLE_RATE
    assert abs(samples - spoken_samples(TEXT, 2.0)) <= SAMPLE_TOLERANCE
    assert {"bob", "carol"} <= set(listed)
    daemon.drop_job("by-bob", text=TEXT, voice="bob", format="wav")
    daemon.wait_done("by-bob.json")
    assert_spoken((daemon.outbox / "by-bob.wav").read_bytes(), TEXT, 2.0)
    # ...and the reverse: a voice registered over ZeroMQ, over HTTP.
    assert voices(client)["carol"]["kind"] == "registered"
    assert_spoken(speak(client, "carol"), TEXT, 1.5)
    daemon.stop()
    daemon.start()
    assert {"bob", "carol"} <= set(voices(client))
    assert_spoken(speak(client, "bob"), TEXT, 2.0)
    client.audio.voices.delete("bob")
    with Client(daemon.endpoint, timeout_s=TIMEOUT_S) as zmq_client:  # anonymous clients'
        zmq_client.remove_voice("carol")


def test_a_one_off_clone_speaks_without_registering(daemon: Daemon,
                                                    client: openai.OpenAI) -> None:
    before = set(voices(client))
    clone = {"audio": base64.b64encode(recording(2.5, 24000)).decode(), "text": "Me."}
    # `voice` is required by the SDK; with a clone it is not used.
    assert_spoken(speak(client, "alloy", clone=clone), TEXT, 2.5)
    assert set(voices(client)) == before
    wait_until(lambda: not any((daemon.spool / "prompts").iterdir()), 10,
               "the one-off prompt to be removed")
    # Bigger than http.max_body_bytes, within max_upload_bytes: taken with a clone only.
    big = {"audio": base64.b64encode(recording(20.0, 16000)).decode()}
    assert MAX_BODY < len(big["audio"]) < MAX_UPLOAD
    assert_spoken(speak(client, "alloy", clone=big), TEXT, 20.0)
    with pytest.raises(openai.APIStatusError) as too_large:
        speak(client, "alloy", text="x" * MAX_BODY)
    assert refusal(too_large)[:2] == (413, "request_too_large")
    with pytest.raises(openai.BadRequestError) as caught:
        speak(client, "alloy", clone={"audio": base64.b64encode(recording(0.4)).decode()})
    assert refusal(caught) == (400, "prompt_audio_too_short", "clone")
    with pytest.raises(openai.BadRequestError) as caught:
        speak(client, "alloy", clone={"audio": "not base64!"})
    assert refusal(caught) == (400, "invalid_field", "clone")


def test_openai_voice_names_speak_with_the_default_voice(client: openai.OpenAI) -> None:
    for name in ("alloy", "nova", "verse"):
        assert_spoken(speak(client, name), TEXT, 0.0)
    with pytest.raises(openai.BadRequestError) as caught:
        speak(client, "nobody-we-know")
    assert refusal(caught)[1] == "unknown_voice"
    # A voice of ours with an OpenAI name is that voice (Open WebUI sends "alloy").
    register(client, "nova", recording(1.0), "I am Nova.")
    assert_spoken(speak(client, "nova"), TEXT, 1.0)
    client.audio.voices.delete("nova")


def test_piper_cannot_clone_and_speaks_openai_names_on_the_shipped_config(
        tmp_path: Path) -> None:
    """The embedded Piper voice, with no [http.voices] at all (as etc/cosyvoiced.toml)."""
    piper = Daemon(tmp_path / "piper", http={"listen": f"127.0.0.1:{free_port()}"})
    piper.start()
    try:
        with _client(piper, "any") as piper_client:
            reply = piper_client.audio.speech.create(model="tts-1", voice="alloy",
                                                     input="Hello from the default voice.",
                                                     response_format="wav")
            samples, rate = soundfile.read(io.BytesIO(reply.content))
            assert rate == 22050
            assert len(samples) > rate // 2
            with pytest.raises(openai.BadRequestError) as caught:
                register(piper_client, "alice", recording(2.0))
            assert refusal(caught)[:2] == (400, "not_supported")
            clone = {"audio": base64.b64encode(recording(2.0)).decode(), "text": "Me."}
            with pytest.raises(openai.BadRequestError) as caught:
                speak(piper_client, "alloy", clone=clone)
            assert refusal(caught) == (400, "not_supported", "clone")
        assert not piper.log_events("voice_registered")
    finally:
        piper.stop()
