"""Encoding synthesized audio into the formats a job can ask for."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import soundfile
import soxr

from cosyvoiced.job import PCM_FORMAT, ResultAudio

# Frames per libsndfile write call: 256 KiB of float32, far below any thread's stack.
BLOCK_FRAMES = 1 << 16
# format name -> (soundfile container, subtype)
_CONTAINERS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
}


def join(chunks: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def whole(made: ResultAudio) -> npt.NDArray[np.float32]:
    """A result's audio at its rate, in one array: for a sink that must send it at once."""
    return resample(join(list(made.chunks)), made.made_rate, made.rate)


def float32_parts(made: ResultAudio, part_bytes: int) -> Iterator[bytes]:
    """A result's samples at its rate as float32 little-endian bytes, in parts of
    `part_bytes` (a whole number of samples; the last part is shorter): made a chunk at a
    time, so that no more than one part and one chunk are ever copied at once, and the
    thread that makes them never holds the GIL for more than one chunk's copy."""
    resampler = stream_resampler(made.made_rate, made.rate)
    part = bytearray()
    for index, chunk in enumerate(made.chunks):
        piece = chunk if resampler is None else \
            resampler.resample_chunk(chunk, last=index == len(made.chunks) - 1)
        data = np.ascontiguousarray(piece, dtype="<f4").data.cast("B")
        while len(data):
            room = part_bytes - len(part)
            part += data[:room]
            data = data[room:]
            if len(part) == part_bytes:
                yield bytes(part)
                part.clear()
    if part:
        yield bytes(part)


def stream_resampler(rate_in: int, rate_out: int) -> soxr.ResampleStream | None:
    """soxr's resampler for audio that comes in pieces; None when the rates are the same."""
    return None if rate_in == rate_out else soxr.ResampleStream(rate_in, rate_out, 1,
                                                                dtype="float32")


def resample(samples: npt.NDArray[np.float32], rate_in: int,
             rate_out: int) -> npt.NDArray[np.float32]:
    if rate_in == rate_out or not len(samples):
        return samples
    resampled: npt.NDArray[np.float32] = soxr.resample(samples, rate_in, rate_out).astype(
        np.float32)
    return resampled


def frames_from(chunks: tuple[npt.NDArray[np.float32], ...], start: int,
                count: int) -> npt.NDArray[np.float32]:
    """Frames [start, start + count) of the audio `chunks` make one after another."""
    pieces, offset = [], 0
    for chunk in chunks:
        end = offset + len(chunk)
        if end > start and offset < start + count:
            pieces.append(chunk[max(0, start - offset):start + count - offset])
        offset = end
        if offset >= start + count:
            break
    return pieces[0] if len(pieces) == 1 else join(pieces)


def to_pcm16(samples: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
    """The one float -> 16-bit conversion, so streamed chunks and whole files agree exactly."""
    pcm: npt.NDArray[np.int16] = np.rint(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    return pcm


def _open_to_write(path: str) -> int:
    """A file its caller made, from its start: never a link, never created here."""
    return os.open(path, os.O_RDWR | os.O_TRUNC | os.O_NOFOLLOW)


class FileWriter:
    """One file of format `fmt` (a FILE_FORMATS name or PCM_FORMAT), written block by block.

    libsndfile 1.2.2's Vorbis encoder keeps all the frames of one `write` call on the stack:
    one call of about 2**21 frames (95 s at 22050 Hz, an 8 MiB stack) segfaults. So every
    write is cut into blocks of BLOCK_FRAMES, whatever the caller hands in.
    """

    def __init__(self, sample_rate: int, fmt: str, into: str | None = None) -> None:
        """`into`: an existing file to write (from its start), rather than bytes in memory."""
        self._pcm: list[bytes] | None = None
        self._buffer = io.BytesIO()
        self._file: soundfile.SoundFile | None = None
        self._pcm16 = True
        self._frames = 0
        self._flac = fmt == "flac"
        if fmt == PCM_FORMAT:
            if into is not None:  # (a drop-folder file is one of FILE_FORMATS)
                raise ValueError("raw PCM is a reply's bytes, never written into a file")
            self._pcm = []
            return
        container, subtype = _CONTAINERS[fmt]
        self._pcm16 = subtype == "PCM_16"
        target = self._buffer if into is None else _open_to_write(into)
        self._file = soundfile.SoundFile(target, "w", samplerate=sample_rate, channels=1,
                                         subtype=subtype, format=container, closefd=True)

    def write(self, samples: npt.NDArray[np.float32]) -> None:
        self._frames += len(samples)
        for start in range(0, len(samples), BLOCK_FRAMES):
            block = samples[start:start + BLOCK_FRAMES]
            if self._pcm is not None:
                self._pcm.append(to_pcm16(block).tobytes())
            elif self._file is not None:
                self._file.write(to_pcm16(block) if self._pcm16 else np.clip(block, -1.0, 1.0))

    def finish(self) -> bytes:
        """The complete file (none where it was written `into` a file); the writer is spent."""
        if self._pcm is not None:
            return b"".join(self._pcm)
        assert self._file is not None, "a container format opens its file"
        if self._flac and not self._frames:
            # libsndfile writes no FLAC at all for no frames (0 bytes, "not a FLAC file"):
            # one silent frame (45 us at 22.05 kHz) makes it a file every player opens.
            self.write(np.zeros(1, dtype=np.float32))
        self._file.close()  # writes the headers that need the length (WAV sizes, STREAMINFO)
        return self._buffer.getvalue()  # empty where it was written `into` a file


def encode(samples: npt.NDArray[np.float32], sample_rate: int, fmt: str) -> bytes:
    """Mono float32 samples in [-1, 1] as a complete file of format `fmt`."""
    writer = FileWriter(sample_rate, fmt)
    writer.write(samples)
    return writer.finish()
