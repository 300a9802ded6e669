"""Encoders that turn a job's chunks into the bytes of an HTTP body as they are made.

libsndfile (through soundfile) does the compressed formats: MP3 (LAME) and Ogg Opus stream
frame by frame. It seeks back at the end to patch headers (MP3's Xing/Info frame): bytes
already sent cannot change, so those patches are dropped; the file plays without them. MP3
is constant-bitrate for that reason, so that a decoder that estimates the length from the
size and the bitrate (libsndfile's) gets it right without the Xing frame.

FLAC is the exception: a streamed FLAC file cannot say how long it is (its STREAMINFO is
written last), and libsndfile refuses such files, so FLAC is encoded whole at the end.
WAV streams with the sizes in its header set to 0xFFFFFFFF (unknown), as OpenAI's does.
"""

from __future__ import annotations

import struct
from typing import Protocol

import numpy as np
import numpy.typing as npt
import soundfile

from cosyvoiced import audio

CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",  # Ogg Opus (RFC 7845)
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
FORMATS = tuple(CONTENT_TYPES)
# Rates a format fixes. OpenAI's `pcm` is raw 16-bit little-endian mono at 24 kHz; Ogg Opus
# takes 8, 12, 16, 24 or 48 kHz. The others keep the voice's own rate.
FIXED_RATES = {"pcm": 24000, "opus": 24000}
# Formats whose encoding costs enough to keep it off the event loop.
COMPRESSED = ("mp3", "opus", "flac")
MP3_COMPRESSION = 0.6  # libsndfile's 0..1 scale: 64 kbit/s constant for speech rates
UNKNOWN_SIZE = 0xFFFFFFFF


class StreamEncoder(Protocol):
    def encode(self, samples: npt.NDArray[np.float32]) -> bytes:
        """The bytes to send for these samples (may be empty while the encoder buffers)."""
        ...

    def finish(self) -> bytes:
        """The last bytes of the file."""
        ...


class _Pcm:
    def encode(self, samples: npt.NDArray[np.float32]) -> bytes:
        return audio.to_pcm16(samples).tobytes()

    def finish(self) -> bytes:
        return b""


def wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length."""
    return (b"RIFF" + struct.pack("<I", UNKNOWN_SIZE) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
            + b"data" + struct.pack("<I", UNKNOWN_SIZE))


class _Wav(_Pcm):
    def __init__(self, sample_rate: int) -> None:
        self._header = wav_header(sample_rate)

    def _take_header(self) -> bytes:
        header, self._header = self._header, b""
        return header

    def encode(self, samples: npt.NDArray[np.float32]) -> bytes:
        return self._take_header() + super().encode(samples)

    def finish(self) -> bytes:
        return self._take_header()


class _Pipe:
    """A write-only file for libsndfile whose bytes are taken as they come.

    It keeps only what has not been taken yet; a write over bytes already taken (a header
    patched at close) keeps just the part that has not been sent.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._taken = 0  # file offset of _pending[0]
        self._position = 0

    def write(self, data: bytes) -> int:
        start = self._position - self._taken
        size = len(data)
        if start + size > 0:
            if start < 0:
                data, start = data[-start:], 0
            if start > len(self._pending):
                self._pending.extend(bytes(start - len(self._pending)))
            self._pending[start:start + len(data)] = data
        self._position += size
        return size

    def seek(self, offset: int, whence: int = 0) -> int:
        end = self._taken + len(self._pending)
        self._position = offset + (0, self._position, end)[whence]
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, _size: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        data = bytes(self._pending)
        self._taken += len(data)
        self._pending.clear()
        return data


class _Libsndfile:
    def __init__(self, sample_rate: int, container: str, subtype: str,
                 **options: object) -> None:
        self._pipe = _Pipe()
        self._file = soundfile.SoundFile(self._pipe, "w", samplerate=sample_rate, channels=1,
                                         format=container, subtype=subtype, **options)

    def encode(self, samples: npt.NDArray[np.float32]) -> bytes:
        # In blocks: libsndfile's encoders may keep one call's frames on the stack (audio.py).
        for start in range(0, len(samples), audio.BLOCK_FRAMES):
            self._file.write(np.clip(samples[start:start + audio.BLOCK_FRAMES], -1.0, 1.0))
        return self._pipe.take()

    def finish(self) -> bytes:
        self._file.close()
        return self._pipe.take()


class _Whole:
    """Encodes as the chunks come, but sends the file only at the end (FLAC: see above)."""

    def __init__(self, sample_rate: int, fmt: str) -> None:
        self._writer = audio.FileWriter(sample_rate, fmt)

    def encode(self, samples: npt.NDArray[np.float32]) -> bytes:
        self._writer.write(samples)
        return b""

    def finish(self) -> bytes:
        return self._writer.finish()


def encoder(fmt: str, sample_rate: int) -> StreamEncoder:
    """A fresh encoder of `fmt` (one of FORMATS) at `sample_rate`."""
    if fmt == "pcm":
        return _Pcm()
    if fmt == "wav":
        return _Wav(sample_rate)
    if fmt == "mp3":
        return _Libsndfile(sample_rate, "MP3", "MPEG_LAYER_III", bitrate_mode="CONSTANT",
                           compression_level=MP3_COMPRESSION)
    if fmt == "opus":
        return _Libsndfile(sample_rate, "OGG", "OPUS")
    if fmt == "flac":
        return _Whole(sample_rate, "flac")
    raise ValueError(f"no encoder for {fmt!r}")
