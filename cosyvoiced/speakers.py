"""Registered voices: zero-shot speakers kept as their source material (prompt text and
audio), not as one model's features, so they survive a model upgrade.

One JSON file (`engine.cosyvoice.speakers_file`, in the state directory) names them, with
each voice's audio (FLAC) in a file of its own beside it, `<file's stem>.audio/<SHA-256>.flac`:
the supervisor writes them when a client registers or removes a voice; each worker reads
them when it starts and again whenever the JSON file changes.

The audio once lived in the JSON file itself, base64 (`audio_flac`): 32 voices of 30 s made
it 56 MB, and each registration parsed, rewrote and fsynced all of it on the supervisor's
tick (1.2 s on a test VM, for every client). Such a file is still read, and `upgrade` moves
its audio out at the daemon's start.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from cosyvoiced import logs
from cosyvoiced.job import ErrorCode, JobFailure
from cosyvoiced.prompt import Samples, read_prompt
from cosyvoiced.spool import atomic_write, remove_temp_files

# Kept at 24 kHz, the highest rate any CosyVoice model reads a prompt at.
STORED_RATE = 24000
# What 30 s of prompt audio says, with room to spare; every use of the voice reads it.
MAX_PROMPT_TEXT_CHARS = 1000
_NAME = re.compile(r"^[\w][\w .-]{0,63}$")
_LANGUAGE = re.compile(r"^([A-Za-z]{2,8}([-_][A-Za-z0-9]{1,8})*)?$")
_AUDIO_FILE = re.compile(r"[0-9a-f]{64}\.flac")  # fullmatch
INLINE_AUDIO = "audio_flac"  # the audio in the JSON file (base64), as once written
FORMAT_VERSION = 2  # 1: the audio inline
_LOAD_TRIES = 3

log = logs.get_logger("cosyvoiced.speakers")


@dataclass(frozen=True)
class Speaker:
    name: str
    prompt_text: str
    audio: Samples  # mono float32 at STORED_RATE
    language: str = ""  # what the registering client said it speaks, if anything


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name != name.strip():
        raise JobFailure(ErrorCode.INVALID_FIELD, "name: a voice name is 1-64 letters, "
                         f"digits, spaces, '.', '_' or '-'; got {name!r}", "name")
    return name


def check_prompt_text(prompt_text: Any) -> str:
    if not isinstance(prompt_text, str) or not prompt_text.strip():
        raise JobFailure(ErrorCode.MISSING_FIELD, "prompt_text: the words spoken in the "
                         "prompt audio are required to register a voice", "prompt_text")
    if len(prompt_text.strip()) > MAX_PROMPT_TEXT_CHARS:
        raise JobFailure(ErrorCode.INVALID_FIELD, "prompt_text: the words of at most 30 s of "
                         f"audio, at most {MAX_PROMPT_TEXT_CHARS} characters; got "
                         f"{len(prompt_text.strip())}", "prompt_text")
    return prompt_text.strip()


def check_language(language: Any) -> str:
    if not isinstance(language, str) or not _LANGUAGE.match(language):
        raise JobFailure(ErrorCode.INVALID_FIELD, "language: expected a language tag such "
                         f"as \"en\" or \"zh-CN\"; got {language!r}"[:200], "language")
    return language


def prepare(audio: bytes) -> bytes:
    """The stored form of prompt audio: FLAC, mono at STORED_RATE. `JobFailure` (the drop
    folder's prompt_audio codes) for what is not 1-30 s of audio soundfile reads. Native
    codecs: the daemon runs it in the encoder process (`Encoder.read_prompt`)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, read_prompt(audio, STORED_RATE), STORED_RATE, format="FLAC",
                    subtype="PCM_16")
    return buffer.getvalue()


def _decode_flac(data: bytes) -> Samples:
    samples, _rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return np.asarray(samples, dtype=np.float32)


def audio_identity(entry: dict[str, Any]) -> str:
    """What names a stored voice's audio: its file's name (a digest of the audio) or, for
    audio stored in the JSON file, that base64 text."""
    return str(entry.get("audio") or entry[INLINE_AUDIO])


class SpeakerStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.audio_dir = self.path.with_name(self.path.stem + ".audio")
        # Each voice's audio as decoded, by its file's name: a worker takes up a new voice
        # without decoding the others again (32 voices of 30 s: 0.3 s of its CPU, for each
        # registration of any client).
        self._decoded: dict[str, Samples] = {}
        self._seen: tuple[int, int, int] | None = None
        # The owners as of the file's (inode, mtime, size): every registration and removal
        # is checked against them, and parsing the file (32 voices: tens of MB of base64)
        # for each request of a flood held the tick for seconds.
        self._owners: tuple[tuple[int, int, int] | None, dict[str, str]] | None = None

    def _entries(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        entries: dict[str, dict[str, Any]] = data["speakers"]
        return entries

    def names(self) -> list[str]:
        return sorted(self._entries())

    def remove_temp_files(self) -> list[str]:
        """Temp copies of the file, and of voices' audio, that a write cut short left."""
        return remove_temp_files(self.path.parent, self.path.name) + \
            [f"{self.audio_dir.name}/{name}" for name in remove_temp_files(self.audio_dir)]

    def load(self) -> list[Speaker]:
        """Every voice, with its audio. A voice replaced meanwhile deletes the audio file the
        JSON file just read named: read again then. A voice whose audio is still missing (a
        file restored without its audio directory) is left out and logged; the others load."""
        for _ in range(_LOAD_TRIES - 1):
            speakers, missing = self._load()
            if not missing:
                return speakers
        speakers, missing = self._load()
        if missing:
            log.warning("voice_audio_missing", voices=missing, audio_dir=str(self.audio_dir),
                        message="these voices are unknown until they are registered again")
        return speakers

    def _load(self) -> tuple[list[Speaker], list[str]]:
        speakers, missing, decoded = [], [], {}
        for name, entry in sorted(self._entries().items()):
            try:
                samples = self._samples(entry)
            except FileNotFoundError:
                missing.append(name)
                continue
            if "audio" in entry:
                decoded[str(entry["audio"])] = samples
            speakers.append(Speaker(name, entry["prompt_text"], samples,
                                    entry.get("language", "")))
        self._decoded = decoded  # the voices gone let theirs go
        return speakers, missing

    def _samples(self, entry: dict[str, Any]) -> Samples:
        known = self._decoded.get(str(entry.get("audio")))
        if known is not None:
            return known
        samples = _decode_flac(self._audio(entry))
        samples.flags.writeable = False  # shared by every load that finds it unchanged
        return samples

    def _audio(self, entry: dict[str, Any]) -> bytes:
        if INLINE_AUDIO in entry:
            return base64.b64decode(entry[INLINE_AUDIO])
        name = str(entry["audio"])
        if not _AUDIO_FILE.fullmatch(name):  # never a path out of the directory
            raise ValueError(f"a voice's audio is not named by its digest: {name!r}")
        return (self.audio_dir / name).read_bytes()

    def upgrade(self) -> int:
        """Move audio stored in the JSON file into files of its own (once, at the daemon's
        start); returns how many voices moved."""
        entries = self._entries()
        inline = [name for name, entry in entries.items() if INLINE_AUDIO in entry]
        for name in inline:
            entry = entries[name]
            entry["audio"] = self._write_audio(base64.b64decode(entry.pop(INLINE_AUDIO)))
        if inline:
            self._write(entries)
        return len(inline)

    def owners(self) -> dict[str, str]:
        """Who owns each registered voice (`clients.Identity.voice_owner`); "" for one
        stored before voices had owners. Read again only when the file changed (every
        write replaces it: a new inode)."""
        version = self._version()
        if self._owners is None or version is None or self._owners[0] != version:
            owners = {name: entry.get("owner", "") for name, entry in self._entries().items()}
            self._owners = (version, owners)
        return dict(self._owners[1])

    def _version(self) -> tuple[int, int, int] | None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return info.st_ino, info.st_mtime_ns, info.st_size

    def languages(self) -> dict[str, str]:
        """Each registered voice's language ("" when none was given), without its audio."""
        return {name: entry.get("language", "") for name, entry in self._entries().items()}

    def changed(self) -> bool:
        """Whether the file changed since the last call (True the first time)."""
        seen = self._version()
        changed, self._seen = seen != self._seen, seen
        return changed

    def add(self, name: str, prompt_text: str, audio: bytes) -> None:
        """Register (or replace) `name` from an audio file, decoded here; raises
        `JobFailure` for a bad name, text or audio."""
        check_name(name)
        check_prompt_text(prompt_text)
        self.store(name, prompt_text, prepare(audio))

    def store(self, name: str, prompt_text: str, audio_flac: bytes, language: str = "",
              owner: str = "") -> None:
        """Register `name`, owned by `owner`, or replace it (keeping its owner) from audio
        already `prepare`d; raises `JobFailure` for a bad name, text or language."""
        check_name(name)
        entries = self._entries()
        entry = {"prompt_text": check_prompt_text(prompt_text),
                 "audio": self._write_audio(audio_flac),
                 "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "owner": entries[name].get("owner", "") if name in entries else owner}
        if check_language(language):
            entry["language"] = language
        entries[name] = entry
        self._write(entries)

    def remove(self, name: str) -> bool:
        entries = self._entries()
        if entries.pop(name, None) is None:
            return False
        self._write(entries)
        return True

    def _write_audio(self, audio_flac: bytes) -> str:
        """Keep a voice's audio in its own file (before the JSON file names it); its name."""
        name = hashlib.sha256(audio_flac).hexdigest() + ".flac"
        if not (self.audio_dir / name).is_file():
            self.audio_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.audio_dir, name, audio_flac)
        return name

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path.parent, self.path.name,
                     json.dumps({"version": FORMAT_VERSION, "speakers": entries},
                                indent=1).encode())
        self._forget_unnamed_audio(entries)

    def _forget_unnamed_audio(self, entries: dict[str, dict[str, Any]]) -> None:
        """Delete the audio files no voice names any more (replaced or removed)."""
        named = {entry.get("audio") for entry in entries.values()}
        try:
            files = [f for f in os.scandir(self.audio_dir) if _AUDIO_FILE.fullmatch(f.name)]
        except FileNotFoundError:
            return
        for file in files:
            if file.name not in named:
                Path(file.path).unlink(missing_ok=True)
