"""Native codecs never run in the supervisor: a result that used to crash libsndfile in the
daemon's own process (one long Ogg Vorbis write) is made in the encoder process, in
blocks, and an encoder that dies costs one job at most, never the service."""

from __future__ import annotations

import io
import itertools
import os
import signal
import time

import httpx2  # the `openai` client's HTTP library
import openai
import pytest
import soundfile

from cosyvoiced import config
from cosyvoiced.client import Client
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, free_port, wait_until

FAULTY = "tests.engines.faulty:load"
SECONDS_PER_CHAR = 0.05  # the tone engine's
LONG = " ".join(["A long paragraph that goes on and on for the Ogg encoder."] * 44)  # 2.5 k


def _tone_daemon(make_daemon: DaemonFactory) -> Daemon:
    daemon = make_daemon(engine={"name": FAULTY}, spool={"max_text_chars": 20_000})
    daemon.start()
    return daemon


def test_a_long_ogg_result_is_written_and_the_daemon_lives(
        make_daemon: DaemonFactory) -> None:
    """2,500 characters as Ogg: the drop folder and a ZeroMQ reply (this killed the
    supervisor with SIGSEGV, and again at every restart, when it encoded in-process)."""
    daemon = _tone_daemon(make_daemon)
    assert daemon.process is not None
    pid = daemon.process.pid
    daemon.drop_job("long", text=LONG, format="ogg")
    record = daemon.wait_done("long.json", timeout_s=120)
    samples, rate = soundfile.read(daemon.outbox / record["file"], dtype="float32")
    assert rate == 22050
    spoken = len(LONG.replace(". ", "."))  # the tone engine drops the space between
    assert abs(len(samples) / rate - SECONDS_PER_CHAR * spoken) < 0.1
    assert samples.std() > 0.1
    with Client(daemon.endpoint, timeout_s=120) as client:
        result = client.synthesize(LONG, format="ogg")
    assert result.header["format"] == "ogg"
    assert result.audio[:4] == b"OggS"
    assert daemon.process.poll() is None
    assert daemon.process.pid == pid


@pytest.mark.parametrize("cache", [0, "64MiB"], ids=["no-cache", "cache"])
def test_an_encoder_that_dies_twice_on_a_file_fails_its_job_and_nothing_else(
        make_daemon: DaemonFactory, cache: int | str) -> None:
    """With the result cache on (the default), the job's recording ended at its delivery:
    failing it after that raised KeyError in the tick, and the daemon exited (code 5)."""
    daemon = make_daemon(engine={"name": FAULTY}, spool={"max_text_chars": 20_000},
                         cache={"max_bytes": cache})
    daemon.start()
    killed: set[int] = set()

    def kill_each_new_encoder() -> bool:
        """Kill every encoder process as it starts; done once the job has an outcome."""
        for event in daemon.log_events("encoder_started"):
            if event["pid"] not in killed and len(killed) < 10:
                killed.add(event["pid"])
                os.kill(event["pid"], signal.SIGKILL)
        return daemon.outcome("doomed.json") is not None

    daemon.drop_job("doomed", text=LONG, format="flac")
    wait_until(kill_each_new_encoder, 120, "the doomed job to end")
    record = daemon.wait_failed("doomed.json")
    assert record["code"] == "encode_failed"
    assert "died 2 times" in record["message"]
    lost = [e for e in daemon.log_events("encoder_lost") if e.get("key")]
    assert len(lost) == 2
    # The daemon lives, and the next job (the encoder is back) is served.
    assert daemon.process is not None
    assert daemon.process.poll() is None
    daemon.drop_job("after", text="A short one after.", format="ogg")
    daemon.wait_done("after.json")


def test_an_http_stream_whose_encoder_dies_ends_as_an_error_and_the_next_one_plays(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(engine={"name": FAULTY}, spool={"max_text_chars": 20_000},
                         http={"listen": f"127.0.0.1:{free_port()}"})
    daemon.start()
    listen = config.load(daemon.config_path).http.listen
    text = " ".join(f"SLOW@0.3 Sentence {n} of a streamed answer." for n in range(20))
    with openai.OpenAI(base_url=f"http://{listen}/v1", api_key="none", max_retries=0,
                       timeout=60) as client:
        # A body cut short, without its last chunk: the client reports it as an error.
        with pytest.raises(httpx2.RemoteProtocolError, match="incomplete chunked read"):
            _kill_the_encoder_while_streaming(daemon, client, text)
        failed = wait_until(lambda: daemon.log_events("encode_failed"), 30, "encode_failed")
        assert failed[0]["source"] == "http"
        wait_until(lambda: [e for e in daemon.log_events("job") if e["outcome"] == "cancelled"],
                   30, "the job to be cancelled: its audio can no longer be sent")
        wait_until(lambda: len(daemon.log_events("encoder_started")) == 2, 30, "a new encoder")
        played = client.audio.speech.create(model="tts-1", voice="tone", input="Again.",
                                            response_format="mp3")
    samples, rate = soundfile.read(io.BytesIO(played.content), dtype="float32")
    assert abs(len(samples) / rate - SECONDS_PER_CHAR * len("Again.")) < 0.15
    assert daemon.process is not None
    assert daemon.process.poll() is None


def _kill_the_encoder_while_streaming(daemon: Daemon, client: openai.OpenAI, text: str) -> None:
    """Kills the encoder once, at the stream's first bytes (the bytes already on their way
    are read after that: killing at each would kill the encoder started in its place)."""
    encoder: int | None = daemon.log_events("encoder_started")[-1]["pid"]
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="tone", input=text, response_format="mp3") as reply:
        for _bytes in reply.iter_bytes(1024):
            if encoder is not None:
                os.kill(encoder, signal.SIGKILL)  # while the stream is open in it
                encoder = None


# How late a WATCHDOG=1 may come past WatchdogSec/2 on this shared 2-core machine: the
# tick's own sleep and scheduling, not the encoding (a tick that waits for the encoder is
# seconds late).
PING_JITTER_S = 0.35
LONG_FILE_TEXT = " ".join(["A very long text for a very long file, made of tone."] * 370)


@pytest.mark.serial
@pytest.mark.parametrize(("file_format", "speed", "sample_rate", "cache"), [
    ("ogg", 1.0, None, 0), ("flac", 0.5, None, 0), ("wav", 0.5, 48000, "512MiB")],
    ids=["ogg", "flac-long", "wav-48k-cached"])
def test_the_watchdog_is_pinged_on_time_while_a_long_file_is_made(
        make_daemon: DaemonFactory, file_format: str, speed: float, sample_rate: int | None,
        cache: int | str) -> None:
    """No tick does a whole long result's work: while 16 or 32 minutes of audio are joined,
    resampled (a reply at another rate, recorded for the cache at the engine's), encoded and
    written, WATCHDOG=1 keeps coming every WatchdogSec/2, as from an idle daemon. The tick
    joined the audio (2.1 s for 32 minutes, on this VM's fresh memory), resampled it for the
    cache's recording, and wrote and fsynced the file (0.3 s for 30 MB here). The WAV is of
    32 minutes too: the encoder process writes it to disk itself now, and 16 minutes took it
    0.61 s, too little to tell a late ping."""
    daemon = make_daemon(engine={"name": FAULTY}, spool={"max_text_chars": 20_000},
                         cache={"max_bytes": cache})
    daemon.start(extra_env={"WATCHDOG_USEC": "1000000"})
    notify = daemon.notify
    assert notify is not None
    dropped = time.monotonic()
    daemon.drop_job("long-file", text=LONG_FILE_TEXT, format=file_format, speed=speed,
                    **({"sample_rate": sample_rate} if sample_rate else {}))
    record = daemon.wait_done("long-file.json", timeout_s=180)
    summary = wait_until(lambda: daemon.log_events("job"), 10, "the job's summary line")[-1]
    assert summary["encode_s"] > 0.5 + PING_JITTER_S, \
        f"encoding took {summary['encode_s']:.2f} s: too short to tell a late ping"
    pings = [at for at in notify.times("WATCHDOG=1") if at >= dropped]
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    assert len(gaps) >= 2, f"{len(pings)} pings from the drop to the result"
    assert max(gaps) < 0.5 + PING_JITTER_S, f"the longest gap between pings was {max(gaps):.2f} s"
    assert record["format"] == file_format
    info = soundfile.info(daemon.outbox / record["file"])
    assert info.samplerate == record["sample_rate"] == (sample_rate or 22050)
    assert abs(info.frames / info.samplerate - record["audio_s"]) < 0.01
