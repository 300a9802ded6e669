"""The result cache's store: audio entries on disk by name, least recently used out first.

One file per entry, `<name>.entry`:

    MAGIC (8 bytes) | SHA-256 of the rest (32) | header length (4, big-endian)
    | header (JSON: sample_rate, samples, voice) | audio (16-bit little-endian PCM, mono)

Entries are written to a temp name and renamed into place, so a reader never sees half of
one; they are not fsynced: the checksum catches what a crash or a bad disk leaves behind,
and a bad entry is deleted and counted, never served. The index of names, sizes and use
order lives in memory; a hit touches the file's mtime, so the order survives a restart.
Owned by the supervisor's thread; the counters may be read from another (metrics).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cosyvoiced import logs
from cosyvoiced.spool import remove_temp_files

MAGIC = b"CVDCACH1"
SUFFIX = ".entry"
_DIGEST_BYTES = 32
_PREFIX_BYTES = len(MAGIC) + _DIGEST_BYTES + 4
# One entry may take at most this share of the cache (and never more than ENTRY_CAP), so a
# single long text cannot flush everything else, and a long streamed job is not held in
# memory to be cached. A hit is played at once, as float32 at the job's rate: at 48 kHz an
# entry of 22.05 kHz 16-bit audio grows 4.4x, and must still fit under the 64 MiB a client
# may leave unread (intake/reply.py), or a client that reads would be cut off.
ENTRY_SHARE = 2
ENTRY_CAP = 12 << 20  # about 4.75 minutes of 22.05 kHz audio

log = logs.get_logger("cosyvoiced.cache")

Pcm = npt.NDArray[np.int16]


class CorruptEntry(ValueError):
    """The bytes of an entry do not hold what they claim (truncated, altered, not ours)."""


@dataclass(frozen=True)
class Entry:
    """A cached result: the engine's audio at its own rate, and the voice it reported."""

    sample_rate: int
    voice: str
    pcm: Pcm  # mono, 16-bit

    def samples(self) -> npt.NDArray[np.float32]:
        """As float32 in [-1, 1]; `audio.to_pcm16` turns them back into exactly `pcm`."""
        floats: npt.NDArray[np.float32] = self.pcm.astype(np.float32) / np.float32(32767.0)
        return floats


def encode(entry: Entry) -> bytes:
    header = json.dumps({"sample_rate": entry.sample_rate, "samples": len(entry.pcm),
                         "voice": entry.voice}).encode()
    body = len(header).to_bytes(4, "big") + header + entry.pcm.astype("<i2").tobytes()
    return MAGIC + hashlib.sha256(body).digest() + body


def decode(data: bytes) -> Entry:
    """The entry in `data`; `CorruptEntry` unless every byte checks out."""
    if len(data) < _PREFIX_BYTES or not data.startswith(MAGIC):
        raise CorruptEntry("not a cache entry (bad magic or too short)")
    digest, body = data[len(MAGIC):len(MAGIC) + _DIGEST_BYTES], data[len(MAGIC) + _DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptEntry("checksum mismatch")
    header_bytes = int.from_bytes(body[:4], "big")
    try:
        header = json.loads(body[4:4 + header_bytes])
        rate, count, voice = int(header["sample_rate"]), int(header["samples"]), header["voice"]
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptEntry(f"bad header: {error}") from None
    audio = body[4 + header_bytes:]
    if len(audio) != 2 * count or rate <= 0 or not isinstance(voice, str):
        raise CorruptEntry(f"header says {count} samples at {rate} Hz; the file holds "
                           f"{len(audio) // 2}")
    return Entry(rate, voice, np.frombuffer(audio, dtype="<i2").astype(np.int16))


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    corrupt: int = 0  # entries found bad, deleted, and counted as misses
    store_failures: int = 0


class Store:
    """Entries in one directory, at most `max_bytes` of them (LRU)."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.counters = Counters()
        self._index: OrderedDict[str, int] = OrderedDict()  # name -> bytes, oldest use first
        self.bytes = 0

    @property
    def max_entry_bytes(self) -> int:
        return min(self.max_bytes // ENTRY_SHARE, ENTRY_CAP)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        """Least recently used first."""
        return list(self._index)

    def _path(self, name: str) -> Path:
        return self.directory / (name + SUFFIX)

    def open(self) -> None:
        """Create the directory if need be, clear what interrupted writes left, and index
        the entries by last use. Raises OSError if the directory cannot be used."""
        self.directory.mkdir(parents=True, exist_ok=True)
        removed = remove_temp_files(self.directory)
        if removed:
            log.info("cache_temp_files_removed", files=removed)
        found: list[tuple[int, str, int]] = []
        with os.scandir(self.directory) as entries:
            for item in entries:
                if not item.name.endswith(SUFFIX) or item.name.startswith("."):
                    continue
                info = item.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode):
                    found.append((info.st_mtime_ns, item.name[:-len(SUFFIX)], info.st_size))
        self._index.clear()
        for _mtime, name, size in sorted(found):
            self._index[name] = size
        self.bytes = sum(self._index.values())
        self._evict()

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._evict()

    def get(self, name: str) -> Entry | None:
        """The entry, marked as just used; None (a miss) if absent or bad."""
        if name not in self._index:
            self.counters.misses += 1
            return None
        path = self._path(name)
        try:
            entry = decode(path.read_bytes())
        except FileNotFoundError:  # deleted behind our back (tmpfiles, an operator)
            self._forget(name)
            self.counters.misses += 1
            return None
        except (OSError, CorruptEntry) as error:
            log.warning("cache_entry_corrupt", entry=name, error=str(error),
                        message="deleted; the text is synthesized again")
            self.counters.corrupt += 1
            self.counters.misses += 1
            self.remove(name)
            return None
        self._index.move_to_end(name)
        with contextlib.suppress(OSError):  # the order after a restart: best effort
            os.utime(path)
        self.counters.hits += 1
        return entry

    def put(self, name: str, entry: Entry) -> bool:
        """Store `entry` (replacing one of that name); False if too big or not written."""
        data = encode(entry)
        if len(data) > self.max_entry_bytes:
            return False
        try:
            self._write(name, data)
        except OSError as error:
            self.counters.store_failures += 1
            log.warning("cache_store_failed", entry=name, error=str(error),
                        message="the result was delivered; it is not cached")
            return False
        self._forget(name)
        self._index[name] = len(data)
        self.bytes += len(data)
        self.counters.stores += 1
        self._evict()
        return True

    def _write(self, name: str, data: bytes) -> None:
        temp = self.directory / f".{name}{SUFFIX}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:  # the directory was removed (a cache may be wiped)
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
            os.rename(temp, self._path(name))
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def remove(self, name: str) -> None:
        self._forget(name)
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()

    def remove_where(self, doomed: Callable[[str], bool]) -> int:
        """Delete every entry whose name `doomed` accepts; how many went."""
        names = [name for name in self._index if doomed(name)]
        for name in names:
            try:
                self.remove(name)
            except OSError as error:
                log.warning("cache_remove_failed", entry=name, error=str(error))
        return len(names)

    def _forget(self, name: str) -> None:
        self.bytes -= self._index.pop(name, 0)

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._index:
            name = next(iter(self._index))
            try:
                self.remove(name)
            except OSError as error:  # not deleted, but out of the index: not served again
                log.warning("cache_remove_failed", entry=name, error=str(error))
            self.counters.evictions += 1

    def figures(self) -> dict[str, Any]:
        counters = self.counters
        lookups = counters.hits + counters.misses
        return {"entries": len(self._index), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": counters.hits, "misses": counters.misses, "stores": counters.stores,
                "evictions": counters.evictions, "corrupt": counters.corrupt,
                "store_failures": counters.store_failures,
                "hit_rate": round(counters.hits / lookups, 4) if lookups else None}
