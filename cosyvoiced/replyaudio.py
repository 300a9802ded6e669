"""A whole reply's audio while its job is made: in the supervisor's memory up to
IN_MEMORY_BYTES, on disk beyond (as nginx buffers a response, then spills it to a temp file).

A drop-folder job of 20,000 characters makes about 20 minutes of audio: 100 MB of float32
at 22,050 Hz. `scheduling.max_active_jobs` of them are made at once, a segment each in
turn, so kept in memory they held a gigabyte and more in the supervisor until they ended.
Beyond the bound, each finished segment's samples go to an unnamed file in the spool's
directory (O_TMPFILE: a crash leaves nothing to clean up, and its disk space returns when
the last map of it goes), and the finished reply is read through a map of that file: its
pages are the kernel's page cache, read as the encoder takes them, not the supervisor's heap.
"""

from __future__ import annotations

import mmap
import tempfile
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

from cosyvoiced.job import ResultAudio

Samples = npt.NDArray[np.float32]
# About 47 s of audio at 22,050 Hz: a usual reply (a paragraph) never touches the disk.
IN_MEMORY_BYTES = 4 << 20


class ReplyAudio:
    """The complete segments' audio of one job, chunk by chunk, as the engine made them."""

    def __init__(self, directory: Path, in_memory_bytes: int = IN_MEMORY_BYTES) -> None:
        self._directory = directory
        self._in_memory_bytes = in_memory_bytes
        self._held: list[Samples] = []  # not written out (yet)
        self._held_bytes = 0
        self._file: IO[bytes] | None = None
        self._written: list[int] = []  # frames of each chunk in the file, in order

    @property
    def memory_bytes(self) -> int:
        return self._held_bytes

    @property
    def disk_bytes(self) -> int:
        return 4 * sum(self._written)

    def add(self, chunks: list[Samples]) -> None:
        """A finished segment's chunks. Raises OSError where the disk refuses them."""
        self._held.extend(chunks)
        self._held_bytes += sum(chunk.nbytes for chunk in chunks)
        if self._file is not None or self._held_bytes > self._in_memory_bytes:
            self._write_out()

    def _write_out(self) -> None:
        if self._file is None:
            # Open for the job's life, closed by take() or discard().
            self._file = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115
        for chunk in self._held:
            self._file.write(np.ascontiguousarray(chunk, dtype="<f4").data)
            self._written.append(len(chunk))
        self._held, self._held_bytes = [], 0

    def take(self, rate: int) -> ResultAudio:
        """All of it, made and owed at `rate`, chunk by chunk (read-only views of the file's
        map, where it went to disk). The last call: the file is closed; the map keeps its
        data while it is read. Raises OSError where the disk fails."""
        if self._file is None:
            held, self._held = self._held, []
            return ResultAudio(tuple(held), rate, rate)
        try:
            self._file.flush()
            frames = sum(self._written)
            if not frames:
                return ResultAudio((), rate, rate)
            mapped = mmap.mmap(self._file.fileno(), 4 * frames, access=mmap.ACCESS_READ)
            ends = np.cumsum(self._written)[:-1]
            chunks = np.split(np.frombuffer(mapped, dtype="<f4"), ends)
            return ResultAudio(tuple(chunks), rate, rate, mapped)
        finally:
            self.discard()

    def discard(self) -> None:
        """The job ended without its audio (or it was taken): let it go now."""
        self._held, self._held_bytes, self._written = [], 0, []
        if self._file is not None:
            self._file.close()
            self._file = None
