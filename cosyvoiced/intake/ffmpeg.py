"""Streamed MP3, Ogg Opus, AAC (ADTS) and FLAC on FFmpeg's libraries (PyAV).

Imported only by the encoder process (`codecs.encoder`): the supervisor loads no codec
library. Each encoder muxes into memory and hands back, after every call, the bytes made
so far, so a client has its first bytes after the first chunk. The output is not seekable,
so nothing is patched at the end: MP3 goes without its Xing frame (it is constant-bitrate,
so a player still gets the length right), a FLAC file's STREAMINFO says "length unknown"
(FFmpeg and libFLAC read it; libsndfile does not), and ADTS has no header to patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import av
import numpy as np
import numpy.typing as npt
from av.audio.stream import AudioStream

from cosyvoiced import audio

BIT_RATE = 64000  # MP3 and AAC: constant, plenty for speech
# Ogg's default is a page a second: the first audio would wait that long. A page every
# 100 ms costs about 300 bytes a second of page headers.
OGG_PAGE_US = 100_000


@dataclass(frozen=True)
class Muxing:
    container: str  # FFmpeg's muxer
    codec: str
    options: dict[str, str] = field(default_factory=dict)  # the muxer's
    bit_rate: int | None = None


MUXINGS = {
    "mp3": Muxing("mp3", "libmp3lame", {"write_xing": "0", "id3v2_version": "0"}, BIT_RATE),
    "opus": Muxing("ogg", "libopus", {"page_duration": str(OGG_PAGE_US)}),
    "aac": Muxing("adts", "aac", {}, BIT_RATE),
    "flac": Muxing("flac", "flac"),
}


class _Taken:
    """A write-only, unseekable file whose bytes are taken as they come."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def write(self, data: bytes) -> int:
        self._pending += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._pending)
        self._pending.clear()
        return data


class MuxedStream:
    """One streamed file of `fmt` (a MUXINGS name) at `sample_rate`, mono.

    Raises av.FFmpegError (a ValueError) at once for a rate the codec does not take (Opus:
    8, 12, 16, 24 or 48 kHz; MP3: 8 to 48 kHz)."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        muxing = MUXINGS[fmt]
        self._rate = sample_rate
        self._file = _Taken()
        self._container = av.open(self._file, "w", format=muxing.container,
                                  container_options=muxing.options)
        try:
            stream = self._container.add_stream(muxing.codec, rate=sample_rate, layout="mono")
            assert isinstance(stream, AudioStream), f"{muxing.codec} is an audio codec"
            self._stream = stream
            if muxing.bit_rate is not None:
                self._stream.bit_rate = muxing.bit_rate
            self._container.start_encoding()  # opens the codec: a bad rate fails here
        except BaseException:
            self._container.close()
            raise
        self._pts = 0

    def encode(self, samples: npt.NDArray[np.float32]) -> bytes:
        # In blocks: one frame of a long result would be converted whole in memory.
        for start in range(0, len(samples), audio.BLOCK_FRAMES):
            block = np.clip(samples[start:start + audio.BLOCK_FRAMES], -1.0, 1.0)
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(block, dtype=np.float32)[np.newaxis, :], format="flt",
                layout="mono")
            frame.sample_rate = self._rate
            frame.pts = self._pts
            self._pts += len(block)
            self._mux(frame)
        return self._file.take()

    def finish(self) -> bytes:
        self._mux(None)  # the codec's delayed frames
        self._container.close()  # the muxer's trailer
        return self._file.take()

    def _mux(self, frame: av.AudioFrame | None) -> None:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
