"""A whole reply's audio while its job is made: in memory while it is short, on disk beyond
(replyaudio.py), so that long drop-folder jobs made at once do not grow the supervisor."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile

from cosyvoiced.client import Client
from cosyvoiced.memory import heap_bytes, rss_bytes
from cosyvoiced.replyaudio import IN_MEMORY_BYTES, ReplyAudio
from tests.conftest import DaemonFactory
from tests.daemon import free_port, peak_rss_bytes, wait_until
from tests.engines.faulty import SECONDS_PER_CHAR

MiB = 1 << 20
RATE = 22050
MAPPED_FRAMES = 16 << 20  # 64 MiB of float32


def _chunks(count: int, frames: int, start: int = 0) -> list[np.ndarray]:
    return [np.arange(start + n * frames, start + (n + 1) * frames, dtype=np.float32)
            for n in range(count)]


def test_a_short_reply_stays_in_memory_as_its_chunks(tmp_path: Path) -> None:
    audio = ReplyAudio(tmp_path, in_memory_bytes=1000)
    chunks = _chunks(3, 50)  # 600 bytes
    audio.add(chunks[:2])
    audio.add(chunks[2:])
    assert not audio.disk_bytes
    taken = audio.take(RATE)
    assert (taken.made_rate, taken.rate, taken.mapped) == (RATE, RATE, None)
    assert all(a is b for a, b in zip(taken.chunks, chunks, strict=True))


def test_a_long_reply_goes_to_an_unnamed_file_and_comes_back_chunk_for_chunk(
        tmp_path: Path) -> None:
    audio = ReplyAudio(tmp_path, in_memory_bytes=1000)
    first, second = _chunks(2, 100), _chunks(3, 70, start=200)
    audio.add(first)  # 800 bytes: held
    assert not audio.disk_bytes
    audio.add(second)  # over the bound: all of it goes to disk
    assert audio.disk_bytes == 4 * (200 + 210)
    assert os.listdir(tmp_path) == [], "the file has no name: a crash leaves nothing"
    taken = audio.take(RATE).chunks
    assert [len(chunk) for chunk in taken] == [100, 100, 70, 70, 70]
    assert np.array_equal(np.concatenate(taken), np.concatenate(first + second))
    assert all(chunk.dtype == np.float32 and not chunk.flags.writeable for chunk in taken)


def test_pages_of_audio_read_from_disk_leave_the_process_once_sent(tmp_path: Path) -> None:
    """The encoder reads a long reply a block at a time through the map: the blocks sent
    stayed resident in the supervisor until the whole result was let go (its RSS grew by
    each file being encoded: 358 MiB over its heap for 8 long drops)."""
    audio = ReplyAudio(tmp_path, in_memory_bytes=0)
    audio.add([np.full(MAPPED_FRAMES, 0.5, dtype=np.float32)])
    made = audio.take(RATE)
    (chunk,) = made.chunks
    before = rss_bytes()
    assert float(chunk[::1024].sum()) == MAPPED_FRAMES // 1024 * 0.5  # read, page by page
    assert rss_bytes() - before > 4 * MAPPED_FRAMES // 2, "the pages were not read in"
    made.let_read_pages_go(MAPPED_FRAMES)
    assert rss_bytes() - before < 4 * MAPPED_FRAMES // 8
    assert float(chunk[-1]) == 0.5, "read again, from the page cache"


def test_audio_let_go_on_disk_closes_its_file(tmp_path: Path) -> None:
    audio = ReplyAudio(tmp_path, in_memory_bytes=0)
    audio.add(_chunks(1, 10))
    opened = len(os.listdir("/proc/self/fd"))
    audio.discard()
    assert len(os.listdir("/proc/self/fd")) == opened - 1
    assert audio.take(RATE).chunks == ()


def test_a_disk_that_refuses_the_audio_is_an_os_error(tmp_path: Path) -> None:
    audio = ReplyAudio(tmp_path / "gone", in_memory_bytes=0)
    with pytest.raises(OSError):  # noqa: PT011 - whichever the disk gives
        audio.add(_chunks(1, 10))


# -- the daemon ------------------------------------------------------------------------------
TONE = {"name": "tests.engines.faulty:load"}
JOBS = 4
SENTENCE = "A long text dropped into the folder, one of several made at once. "
TEXT = SENTENCE * (8000 // len(SENTENCE))  # 390 s of tone each: 35 MB of float32
SPOKEN_S = TEXT.count(SENTENCE) * len(SENTENCE.strip()) * SECONDS_PER_CHAR
FILE_RATE = 48000  # a 37 MB WAV file each
# Measured on the 2-core machine, the supervisor's anonymous memory (memory.heap_bytes) over
# its start while the four were made and encoded: 335-337 MiB when it held each one's audio
# until it ended and each file's bytes came up the encoder's pipe; 63-70 MiB with the audio
# on disk and the bytes still coming up; 13-14 MiB with the encoder process writing the
# files itself.
GREW_AT_MOST = 40 * MiB
# Its RSS, the pages of the audio it read through the map included: 159-163 MiB over its
# start while those of the blocks sent stayed resident until the result was let go, 19 MiB
# with them let go as they are sent.
RESIDENT_AT_MOST = 64 * MiB


def test_long_drops_made_at_once_keep_their_audio_out_of_the_supervisor(
        make_daemon: DaemonFactory) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    daemon = make_daemon(engine=TONE, metrics={"listen": metrics})
    daemon.start()
    assert daemon.process is not None
    pid = daemon.process.pid
    started_with, peak, on_disk = heap_bytes(pid), 0, 0
    resident_at_start = rss_bytes(pid)
    for n in range(JOBS):
        daemon.drop_job(f"long{n}", text=TEXT, sample_rate=FILE_RATE)
    with Client(daemon.endpoint) as client:

        def all_done() -> bool:
            nonlocal peak, on_disk
            peak = max(peak, heap_bytes(pid))
            on_disk = max(on_disk, client.stats()["reply_audio_bytes"]["disk"])
            return sum(daemon.outcome_counts().values()) == JOBS

        wait_until(all_done, 120, "the long drops' outcomes")
        assert client.stats()["reply_audio_bytes"] == {"memory": 0, "disk": 0}
    for n in range(JOBS):
        record = daemon.wait_done(f"long{n}.json")
        info = soundfile.info(daemon.outbox / record["file"])
        assert info.samplerate == FILE_RATE
        assert info.frames == pytest.approx(SPOKEN_S * FILE_RATE, rel=1e-3)
    grew = peak - started_with
    assert grew < GREW_AT_MOST, f"the supervisor grew {grew / MiB:.0f} MiB"
    resident = peak_rss_bytes(pid) - resident_at_start  # its heap and the pages it read
    assert resident < RESIDENT_AT_MOST, f"its RSS grew {resident / MiB:.0f} MiB"
    assert on_disk > IN_MEMORY_BYTES, "stats tells the operator where the audio is"
    assert not [name for name in os.listdir(daemon.spool) if name.startswith("tmp")]
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as scraped:
        text = scraped.read().decode()
    assert 'cosyvoiced_reply_audio_bytes{where="disk"} 0.0' in text
