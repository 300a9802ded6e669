"""Encoders that turn a job's chunks into the bytes of an HTTP body as they are made.

MP3, Ogg Opus, AAC (ADTS) and FLAC are streamed on FFmpeg's libraries (`ffmpeg.py`, PyAV),
imported only where they run: in the encoder process. Each sends its bytes after the first
chunk. WAV streams with the sizes in its header set to 0xFFFFFFFF (unknown), as OpenAI's
does; PCM is raw. Whole files (drop folder, ZeroMQ) stay on soundfile (`audio.py`).
"""

from __future__ import annotations

import struct
from typing import Protocol

import numpy as np
import numpy.typing as npt

from cosyvoiced import audio

CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",  # Ogg Opus (RFC 7845)
    "aac": "audio/aac",  # AAC-LC in ADTS frames
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
FORMATS = tuple(CONTENT_TYPES)
# Rates a format fixes. OpenAI's `pcm` is raw 16-bit little-endian mono at 24 kHz; Ogg Opus
# takes 8, 12, 16, 24 or 48 kHz. The others keep the voice's own rate.
FIXED_RATES = {"pcm": 24000, "opus": 24000}
# Formats encoded by FFmpeg, in the encoder process.
COMPRESSED = ("mp3", "opus", "aac", "flac")
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


def encoder(fmt: str, sample_rate: int) -> StreamEncoder:
    """A fresh encoder of `fmt` (one of FORMATS) at `sample_rate`."""
    if fmt == "pcm":
        return _Pcm()
    if fmt == "wav":
        return _Wav(sample_rate)
    if fmt in COMPRESSED:
        from cosyvoiced.intake import ffmpeg  # noqa: PLC0415 - only the encoder process

        return ffmpeg.MuxedStream(fmt, sample_rate)
    raise ValueError(f"no encoder for {fmt!r}")
