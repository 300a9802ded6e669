"""The result cache without processes: the store on a temp directory, and the keys, hits and
recorded misses of `ResultCache` through a sink that keeps what it is given."""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile

from cosyvoiced import audio
from cosyvoiced.cache import ENTRY_CAP, SUFFIX, CorruptEntry, Entry, Store, decode, encode
from cosyvoiced.config import CacheConfig, Config, EngineConfig, PiperConfig
from cosyvoiced.job import ErrorCode, Job, JobError, JobResult, ResultAudio, Sink
from cosyvoiced.metrics import Metrics
from cosyvoiced.resultcache import ResultCache, Served, engine_identity, normalise_text
from cosyvoiced.speakers import SpeakerStore

RATE = 22050
Samples = npt.NDArray[np.float32]



def _serve(cache: ResultCache, made: Job, sink: Sink, *, record: bool = True) -> Served | None:
    """What the service does with a job: find its entry (recording a miss), then play it."""
    entry = cache.find(made, record=record)
    return None if entry is None else cache.play(made, sink, entry, time.monotonic())

def tone(seconds: float, rate: int = RATE, pitch: float = 220.0) -> Samples:
    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    samples: Samples = (0.3 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)
    return samples


def entry(seconds: float = 0.5, voice: str = "v") -> Entry:
    return Entry(RATE, voice, audio.to_pcm16(tone(seconds)))


def opened(directory: Path, max_bytes: int = 1 << 20) -> Store:
    store = Store(directory, max_bytes)
    store.open()
    return store


# -- the store --------------------------------------------------------------------------
def test_an_entry_comes_back_as_it_went_in(tmp_path: Path) -> None:
    store = opened(tmp_path)
    stored = entry()
    assert store.put("a", stored)
    got = store.get("a")
    assert got is not None
    assert (got.sample_rate, got.voice) == (RATE, "v")
    assert np.array_equal(got.pcm, stored.pcm)
    # Samples as floats turn back into exactly the same 16-bit audio.
    assert np.array_equal(audio.to_pcm16(got.samples()), stored.pcm)
    assert store.get("b") is None
    figures = store.figures()
    assert (figures["hits"], figures["misses"], figures["stores"], figures["entries"]) == (
        1, 1, 1, 1)
    assert figures["bytes"] == (tmp_path / f"a{SUFFIX}").stat().st_size


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_a_damaged_entry_is_a_miss_and_is_deleted(tmp_path: Path, damage: str) -> None:
    store = opened(tmp_path)
    store.put("a", entry())
    path = tmp_path / f"a{SUFFIX}"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[:len(data) - 7]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"RIFF" + os.urandom(500))
    path.write_bytes(bytes(data))
    assert store.get("a") is None
    assert not path.exists()
    assert "a" not in store
    assert (store.counters.corrupt, store.counters.misses, store.bytes) == (1, 1, 0)


def test_decode_checks_the_header_against_the_audio() -> None:
    good = encode(entry())
    with pytest.raises(CorruptEntry, match="checksum"):
        decode(good[:-2])
    with pytest.raises(CorruptEntry, match="magic"):
        decode(b"CVDCACH2" + good[8:])
    assert decode(good).voice == "v"


def test_least_recently_used_go_first_at_the_size_limit(tmp_path: Path) -> None:
    size = len(encode(entry()))
    store = opened(tmp_path, max_bytes=3 * size)
    for name in "abc":
        assert store.put(name, entry())
    assert store.get("a") is not None  # used: now the newest
    assert store.put("d", entry())
    assert store.names() == ["c", "a", "d"]
    assert not (tmp_path / f"b{SUFFIX}").exists()
    assert store.counters.evictions == 1
    assert store.bytes == 3 * size
    store.resize(size)
    assert store.names() == ["d"]
    assert store.counters.evictions == 3


def test_the_use_order_and_entries_survive_a_reopen(tmp_path: Path) -> None:
    store = opened(tmp_path)
    for n, name in enumerate("abc"):
        store.put(name, entry())
        os.utime(tmp_path / f"{name}{SUFFIX}", ns=(n * 10**9, n * 10**9))  # a, b, c in age
    assert store.get("a") is not None  # touched now: the newest
    again = opened(tmp_path)
    assert again.names() == ["b", "c", "a"]
    assert again.bytes == store.bytes
    assert again.get("b") is not None


def test_open_removes_interrupted_writes_and_ignores_strangers(tmp_path: Path) -> None:
    (tmp_path / f".a{SUFFIX}.0123abcd.tmp").write_bytes(b"half an entry")
    (tmp_path / "notes.txt").write_text("not ours")
    store = opened(tmp_path)
    assert not (tmp_path / f".a{SUFFIX}.0123abcd.tmp").exists()
    assert (tmp_path / "notes.txt").exists()
    assert len(store) == 0


def test_an_entry_over_its_share_of_the_cache_is_not_stored(tmp_path: Path) -> None:
    small = opened(tmp_path, max_bytes=len(encode(entry(0.5))))
    assert not small.put("long", entry(0.5))  # more than half the cache
    assert len(small) == 0
    assert opened(tmp_path, max_bytes=1 << 40).max_entry_bytes == ENTRY_CAP


def test_a_store_into_a_removed_directory_makes_it_again(tmp_path: Path) -> None:
    store = opened(tmp_path / "cache")
    (tmp_path / "cache").rmdir()
    assert store.put("a", entry())
    assert store.get("a") is not None


# -- the key ----------------------------------------------------------------------------
def test_whitespace_is_normalised() -> None:
    assert normalise_text("  Hello,\n\tworld.  ") == "Hello, world."


def test_the_engine_identity_follows_settings_that_change_the_audio(tmp_path: Path) -> None:
    base = EngineConfig()
    assert engine_identity(base) == engine_identity(EngineConfig())
    # Threads and the memory arena change speed, not audio.
    assert engine_identity(base) == engine_identity(
        replace(base, piper=PiperConfig(threads=3, memory_arena=False)))
    assert engine_identity(base) != engine_identity(
        replace(base, piper=PiperConfig(noise_scale=0.0)))
    assert engine_identity(base) != engine_identity(replace(base, voice="other"))
    voice = tmp_path / "v.onnx"
    voice.write_bytes(b"model")
    (tmp_path / "v.onnx.json").write_text("{}")
    with_voice = replace(base, piper=PiperConfig(voices=[str(voice)]))
    before = engine_identity(with_voice)
    voice.write_bytes(b"a retrained model")
    assert engine_identity(with_voice) != before


def test_a_cosyvoice_model_directory_is_identified_by_its_files(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "cosyvoice2.yaml").write_text("v2")
    (model / "sub" / "llm.pt").write_bytes(b"weights")
    engine = EngineConfig(name="cosyvoice")
    engine = replace(engine, cosyvoice=replace(engine.cosyvoice, model_dir=str(model)))
    before = engine_identity(engine)
    (model / "flow.decoder.estimator.fp16.plan").write_bytes(b"built on first start")
    assert engine_identity(engine) == before
    (model / "sub" / "llm.pt").write_bytes(b"other weights")
    assert engine_identity(engine) != before


# -- ResultCache: hits, misses, recordings ----------------------------------------------
@dataclass
class KeptSink:
    """A test double of the supervisor's Sink: keeps every call."""

    rate: int = 0
    chunks: list[Samples] = field(default_factory=list)
    delivered: list[tuple[JobResult, Samples]] = field(default_factory=list)
    failed: list[JobError] = field(default_factory=list)

    def started(self, job: Job, sample_rate: int) -> None:
        self.rate = sample_rate

    def chunk(self, job: Job, seq: int, samples: Samples) -> None:
        assert seq == len(self.chunks)
        self.chunks.append(samples)

    def deliver(self, job: Job, result: JobResult, made: ResultAudio,
                timings: dict[str, float]) -> str:
        self.delivered.append((result, audio.whole(made)))
        return f"out:{job.id}"

    def fail_job(self, job: Job, error: JobError) -> str:
        self.failed.append(error)
        return "failed"

    def cancelled(self, job: Job) -> None:
        """Nothing to keep."""


def make_cache(tmp_path: Path, **engine: Any) -> tuple[ResultCache, SpeakerStore]:
    speakers = SpeakerStore(tmp_path / "speakers.json")
    settings = Config(engine=EngineConfig(**engine),
                      cache=CacheConfig(dir=str(tmp_path / "cache"), max_bytes=1 << 24))
    return ResultCache(settings, speakers, Metrics()), speakers


def job(text: str = "Hello there.", **fields: Any) -> Job:
    return Job(id=fields.pop("id", "j1"), source="test", origin="o", text=text, **fields)


def synthesize(cache: ResultCache, made: Job, samples: Samples, rate: int = RATE,
               chunk_s: float = 0.3) -> KeptSink:
    """What the supervisor does with a miss: the worker's audio through the sink."""
    sink = KeptSink()
    assert _serve(cache, made, sink) is None
    worker_job = cache.worker_job(made)
    assert worker_job.sample_rate is None  # the worker makes the engine's own audio
    recorded = cache.sink(made, sink)
    recorded.started(made, rate)
    if made.stream:
        step = int(chunk_s * rate)
        for seq, start in enumerate(range(0, len(samples), step)):
            recorded.chunk(made, seq, samples[start:start + step])
        whole = np.zeros(0, dtype=np.float32)
    else:
        whole = samples
    result = JobResult(made.id, "v", rate, len(samples), 1.0, 0.1)
    recorded.deliver(made, result, ResultAudio.of(whole, rate), {})
    assert cache.sink(made, sink) is sink  # the recording has ended
    return sink


def test_a_repeat_is_a_hit_in_pieces_and_other_settings_miss(tmp_path: Path) -> None:
    cache, _speakers = make_cache(tmp_path)
    speech = tone(1.6)
    synthesize(cache, job(), speech)
    sink = KeptSink()
    served = _serve(cache, job("  Hello \n there. ", id="j2", stream=True), sink)
    assert served is not None
    assert served.result.cached
    assert served.summary["cached"] is True
    assert sink.rate == RATE
    assert len(sink.chunks) == 4  # 0.5 s pieces, not one blob
    assert np.array_equal(audio.to_pcm16(np.concatenate(sink.chunks)), audio.to_pcm16(speech))
    for other in (job(speed=1.5), job(voice="en_US-joe-medium"), job(instruct="Slowly."),
                  job(language="en"), job("Hello there!"), job(cache=False)):
        assert _serve(cache, other, KeptSink(), record=False) is None, other
    figures = cache.figures()
    assert (figures["hits"], figures["misses"]) == (1, 6)  # cache=False is not a lookup


def test_a_hit_is_resampled_for_the_rate_asked(tmp_path: Path) -> None:
    cache, _speakers = make_cache(tmp_path)
    synthesize(cache, job(), tone(1.0))
    sink = KeptSink()
    served = _serve(cache, job(id="j2", sample_rate=16000), sink)
    assert served is not None
    result, samples = sink.delivered[0]
    assert (sink.rate, result.sample_rate) == (16000, 16000)
    assert abs(len(samples) - 16000) < 10


@pytest.mark.parametrize("stream", [False, True])
def test_a_miss_at_another_rate_is_cached_at_the_engine_rate(tmp_path: Path,
                                                             stream: bool) -> None:
    cache, _speakers = make_cache(tmp_path)
    sink = synthesize(cache, job(sample_rate=8000, stream=stream), tone(1.0))
    result, samples = sink.delivered[0]
    assert (sink.rate, result.sample_rate) == (8000, 8000)
    made = np.concatenate(sink.chunks) if stream else samples
    assert abs(len(made) - 8000) < 10
    assert result.samples == len(made)
    again = KeptSink()
    assert _serve(cache, job(id="j2"), again) is not None
    assert again.rate == RATE  # the entry holds the engine's 22.05 kHz audio
    assert abs(len(again.delivered[0][1]) - RATE) < 2


def test_a_failed_or_too_long_miss_is_not_cached(tmp_path: Path) -> None:
    cache, _speakers = make_cache(tmp_path)
    made = job()
    assert _serve(cache, made, KeptSink()) is None
    cache.sink(made, KeptSink()).fail_job(made, JobError(ErrorCode.ENGINE_ERROR, "no"))
    assert _serve(cache, made, KeptSink(), record=False) is None
    settings = Config(cache=CacheConfig(dir=str(tmp_path / "small"), max_bytes=100_000))
    small = ResultCache(settings, SpeakerStore(tmp_path / "none.json"), Metrics())
    synthesize(small, job(stream=True), tone(3.0))  # 130 kB: over half the cache
    assert _serve(small, job(id="j2"), KeptSink(), record=False) is None
    assert small.figures()["stores"] == 0


def test_a_changed_engine_deletes_the_entries(tmp_path: Path) -> None:
    cache, _speakers = make_cache(tmp_path)
    synthesize(cache, job(), tone(0.5))
    assert cache.figures()["entries"] == 1
    cache.configure(Config(engine=EngineConfig(piper=PiperConfig(noise_scale=0.0)),
                           cache=CacheConfig(dir=str(tmp_path / "cache"), max_bytes=1 << 24)))
    assert cache.figures()["entries"] == 0
    assert not list((tmp_path / "cache").iterdir())


def _wav(seconds: float, pitch: float) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(seconds, 24000, pitch), 24000, format="WAV")
    return buffer.getvalue()


def test_a_removed_or_changed_registered_voice_deletes_its_entries(tmp_path: Path) -> None:
    cache, speakers = make_cache(tmp_path)
    speakers.add("alice", "What alice says.", _wav(2.0, 200.0))
    speakers.add("bob", "What bob says.", _wav(2.0, 300.0))
    synthesize(cache, job(voice="alice"), tone(0.5))
    synthesize(cache, job(voice="bob"), tone(0.5))
    synthesize(cache, job(), tone(0.5))
    assert cache.figures()["entries"] == 3
    assert _serve(cache, job(voice="alice", id="j2"), KeptSink(), record=False) is not None
    speakers.add("alice", "What alice says now.", _wav(2.0, 250.0))  # changed
    cache.voices_changed()
    assert cache.figures()["entries"] == 2
    assert _serve(cache, job(voice="alice", id="j3"), KeptSink(), record=False) is None
    speakers.remove("bob")
    cache.voices_changed()
    assert cache.figures()["entries"] == 1  # the default voice's
    assert _serve(cache, job(id="j4"), KeptSink(), record=False) is not None


def test_an_unusable_directory_runs_without_a_cache(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    settings = Config(cache=CacheConfig(dir=str(tmp_path / "file" / "cache")))
    cache = ResultCache(settings, SpeakerStore(tmp_path / "none.json"), Metrics())
    assert not cache.enabled
    assert cache.figures() == {"enabled": False}
    assert _serve(cache, job(), KeptSink()) is None
